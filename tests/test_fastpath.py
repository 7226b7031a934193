"""The C hot loop gives exactly what the Python path gives: digests and candidates."""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from netfilter import matcher
from netfilter.bloom import BlockedBloom
from netfilter.keys import load_public_key
from netfilter.listfile import open_bundle
from tests.conftest import BuildBundle

fastpath = pytest.importorskip("netfilter._fastpath",
                               reason="the C extension was not built (no compiler)")

CHECK_SHA = """
import hashlib, os, sys
from netfilter import _fastpath
for n in list(range(0, 300)) + [1000, 4096, 5003]:
    data = os.urandom(n)
    assert _fastpath.sha256(data) == hashlib.sha256(data).digest(), n
print(_fastpath.backend())
"""


@pytest.mark.parametrize("portable", ["0", "1"])
def test_sha256_matches_hashlib(portable: str) -> None:
    """Both compressions: the CPU's SHA extensions (where present) and the portable code."""
    env = {**os.environ, "NETFILTER_PORTABLE_SHA": portable}
    result = subprocess.run([sys.executable, "-c", CHECK_SHA], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    backend = result.stdout.strip()
    assert backend == "portable" if portable == "1" else backend in ("sha-ni", "portable")


@pytest.mark.parametrize("key", [None, b"k" * 16, b"x" * 64, b"y" * 100])
def test_candidates_match_the_python_path(key: bytes | None) -> None:
    rng = random.Random(7)
    hosts = [f"h{rng.randrange(10**6)}.example" for _ in range(40)] + ["x" * 300]
    tails = ["/", "/a/", "/a/b.html", "/q?" + "z" * 90, "/ü/"]
    digest = ((lambda e: hmac.digest(key, e.encode(), "sha256")) if key
              else (lambda e: hashlib.sha256(e.encode()).digest()))
    members = [digest(h + t) for h in hosts[::3] for t in tails[::2]]
    noise = [os.urandom(32) for _ in range(3000)]
    bloom = BlockedBloom(np.frombuffer(b"".join(members + noise), np.uint8).reshape(-1, 32))
    fast = matcher._fast_pairs(bloom.words, key)
    assert fast is not None
    slow = matcher._python_pairs(bloom.words, bloom.nwords, key)
    got = fast(hosts, tails)
    assert got == list(slow(hosts, tails))
    assert {d for _, _, d in got} >= set(members)


def test_matcher_verdicts_equal_with_and_without_c(build: BuildBundle,
                                                   authority: tuple[Path, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = build()
    trusted = [load_public_key(authority[1])]
    with_c = matcher.ListMatcher.from_bundle(open_bundle(path, trusted))
    monkeypatch.setattr(matcher, "_fastpath", None)
    without_c = matcher.ListMatcher.from_bundle(open_bundle(path, trusted))
    rng = random.Random(3)
    hosts = ["blocked.example", "a.blocked.example", "partly.example", "x.partly.example",
             "www.mixed.example", "clean.example", "192.0.2.66", "198.51.100.7"]
    segments = ["dir", "one", "page.html?id=7", "a", "b", "c.html", "files", "x"]
    for _ in range(500):
        host = rng.choice(hosts)
        path_ = "/" + "/".join(rng.choice(segments) for _ in range(rng.randrange(4)))
        expected = without_c.check_parts(host, path_, None)
        assert with_c.check_parts(host, path_, None) == expected, (host, path_)
