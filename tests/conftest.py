"""Shared fixtures: a throw-away authority key and small real bundles built through
the same code path an authority uses."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from netfilter.keys import PrivateKey, generate_keypair, load_private_key

SOURCE = """\
issuer: Test Authority
legal_basis: Test Act s. 1
contact: mailto:appeals@authority.test
appeal_url: https://appeals.authority.test/
hotline_url: https://hotline.test/
translations:
  de: {issuer: Testbehörde}
entries:
  - {domain: blocked.example, ref: T-1, category: csam}
  - {url: "http://partly.example/dir/", ref: T-2, category: csam}
  - {url: "http://partly.example/one/page.html?id=7", ref: T-3, category: csam}
  - {url: "http://www.mixed.example/a/b/c.html", ref: T-4, category: other}
  - {domain: 192.0.2.66, ref: T-5, category: csam}
  - {url: "http://198.51.100.7/files/", ref: T-6, category: csam}
  - {domain: deep.sub.blocked.invalid, ref: T-7, category: csam}
  - {url: "http://whole.example/", ref: T-8, category: csam}
"""


@pytest.fixture(scope="session")
def authority(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private key path, public key path) of a test authority."""
    base = tmp_path_factory.mktemp("authority") / "auth"
    return generate_keypair(base)


@pytest.fixture(scope="session")
def authority_key(authority: tuple[Path, Path]) -> PrivateKey:
    return load_private_key(authority[0])


BuildBundle = Callable[..., Path]


@pytest.fixture
def build(tmp_path: Path, authority_key: PrivateKey) -> BuildBundle:
    """Build a bundle from YAML text (default: SOURCE); returns its path."""
    from netfilter.listfile import build_bundle

    counter = iter(range(1000))

    def _build(text: str = SOURCE, *, list_id: str = "test", version: int = 1,
               expires: datetime | None = None, host_index: bool = True,
               hash_name: str = "sha256", hmac_key: bytes | None = None,
               name: str | None = None) -> Path:
        n = next(counter)
        source = tmp_path / f"source-{n}.yaml"
        source.write_text(text, encoding="utf-8")
        out = tmp_path / (name or f"list-{n}.nfl")
        build_bundle(source, out, key=authority_key, list_id=list_id, version=version,
                     expires=expires, host_index=host_index, hash_name=hash_name,  # type: ignore[arg-type]
                     hmac_key=hmac_key)
        return out

    return _build


@pytest.fixture(scope="session")
def dohclient_python() -> Path:
    """The python of a venv of its own with dnspython[doh] (tests/dohclient_venv.py),
    made once under .cache/; the test skips when no package index can be reached."""
    from tests.dohclient_venv import dohclient_python as make

    return make()
