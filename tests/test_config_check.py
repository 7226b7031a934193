"""`netfilter config check FILE`: every user mistake is one line naming the key or file
and the reason, exit 2, no traceback; `serve` runs the same checks before it starts
anything. examples/netfilter.yaml names every key of the settings model, and checks.

Real `netfilter` subprocesses; the ports are taken by real sockets of this test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from netfilter.config import Settings, load_config
from netfilter.configcheck import check_config
from netfilter.keys import generate_keypair
from tests.conftest import BuildBundle
from tests.support import HOST, REPO, free_port

EXAMPLE = REPO / "examples" / "netfilter.yaml"


def _netfilter(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netfilter.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("netfilter: error: "), result.stderr
    return lines[0]


class Rig:
    """A valid config in tmp_path; each case spoils one thing."""

    def __init__(self, tmp_path: Path, build: BuildBundle, pub: Path) -> None:
        self.dir = tmp_path
        self.build = build
        self.list = build(name="good.nfl")
        self.data: dict[str, Any] = {
            "node": {"id": "check-test.example", "key": "node.key"},
            "lists": [{"path": str(self.list), "trust": [str(pub)]}],
            "audit": {"path": "audit.sqlite", "client": "none"},
        }

    def write(self, text: str | None = None) -> Path:
        config = self.dir / "netfilter.yaml"
        config.write_text(text if text is not None else yaml.safe_dump(self.data),
                          encoding="utf-8")
        return config


Case = Callable[[Rig], tuple[Path, tuple[str, ...]]]


def _unknown_key(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    rig.data["dns"] = {"listn": [f"{HOST}:5353"]}
    return rig.write(), ("dns.listn", "unknown key")


def _wrong_type(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    rig.data["dns"] = {"timeout": "fast"}
    return rig.write(), ("dns.timeout", "'fast'")


def _missing_config(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    return rig.dir / "absent.yaml", ("absent.yaml",)


def _config_is_a_directory(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    return rig.dir, (str(rig.dir),)


def _not_yaml(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    return rig.write("dns: [unclosed\n"), ("netfilter.yaml",)


def _missing_list(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    rig.data["lists"][0]["path"] = "absent.nfl"
    return rig.write(), ("lists[0].path", "absent.nfl", "no such file")


def _list_is_a_directory(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    (rig.dir / "lists.nfl").mkdir()
    rig.data["lists"][0]["path"] = "lists.nfl"
    return rig.write(), ("lists[0].path", "lists.nfl", "not a file")


def _keyed_list_without_hmac_key(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    keyed = rig.build(name="keyed.nfl", hash_name="hmac-sha256", hmac_key=b"k" * 32)
    rig.data["lists"][0]["path"] = str(keyed)
    return rig.write(), ("lists[0].hmac_key", "keyed.nfl", "required")


def _wrong_hmac_key(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    keyed = rig.build(name="keyed.nfl", hash_name="hmac-sha256", hmac_key=b"k" * 32)
    (rig.dir / "other.key").write_bytes(b"o" * 32)
    rig.data["lists"][0].update(path=str(keyed), hmac_key="other.key")
    return rig.write(), ("lists[0].hmac_key", "other.key", "keyed.nfl")


def _missing_trust_key(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    rig.data["lists"][0]["trust"] = ["absent.pub"]
    return rig.write(), ("lists[0].trust[0]", "absent.pub", "no such file")


def _trust_key_not_a_key(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    (rig.dir / "junk.pub").write_text("not a key\n", encoding="utf-8")
    rig.data["lists"][0]["trust"] = ["junk.pub"]
    return rig.write(), ("lists[0].trust", "junk.pub", "not a PEM public key")


def _untrusted_list(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    _, other = generate_keypair(rig.dir / "other")
    rig.data["lists"][0]["trust"] = [str(other)]
    return rig.write(), ("lists[0].path", "good.nfl", "trusted")


def _expired_list_under_stop(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    old = rig.build(name="old.nfl", list_id="old", expires=datetime(2020, 1, 1, tzinfo=UTC))
    rig.data["lists"][0].update(path=str(old), on_expiry="stop")
    return rig.write(), ("lists[0]", "old.nfl", "expired", "on_expiry is stop")


def _hmac_key_for_a_sha256_list(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    (rig.dir / "list.key").write_bytes(b"k" * 32)
    rig.data["lists"][0]["hmac_key"] = "list.key"
    return rig.write(), ("lists[0].hmac_key", "sha256")


def _node_key_readable_by_others(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    key, _ = generate_keypair(rig.dir / "node")
    key.chmod(0o644)
    return rig.write(), ("node.key", str(key), "0644")


def _missing_local_list(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    rig.data["local"] = {"allow": "absent-allow.yaml"}
    return rig.write(), ("local.allow", "absent-allow.yaml")


def _malformed_local_list(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    (rig.dir / "block.yaml").write_text("entries: {not: a list}\n", encoding="utf-8")
    rig.data["local"] = {"block": "block.yaml"}
    return rig.write(), ("local.block", "block.yaml")


def _missing_templates(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    rig.data["stoppage"] = {"listen": f"{HOST}:0", "templates": "absent-templates"}
    return rig.write(), ("stoppage.templates", "absent-templates", "no such directory")


def _tiles_listen_without_tiles(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    rig.data["audit"]["tiles_listen"] = f"{HOST}:0"
    return rig.write(), ("audit.tiles_listen", "audit.tiles")


def _unknown_group(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    rig.data["audit"]["group"] = "no-such-group-nf"
    return rig.write(), ("audit.group", "no-such-group-nf")


def _missing_protected_names(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    rig.data["updates"] = {"protected_names": "absent-protected.yaml"}
    return rig.write(), ("updates.protected_names", "absent-protected.yaml")


def _malformed_protected_names(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    (rig.dir / "protected.yaml").write_text(
        "- www.essential.example\n- {name: x.example, private: maybe}\n", encoding="utf-8")
    rig.data["updates"] = {"protected_names": "protected.yaml"}
    return rig.write(), ("updates.protected_names", "protected.yaml", "[1]", "true or false")


def _pinned_ca_not_a_certificate(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    (rig.dir / "ca.pem").write_text("not a certificate\n", encoding="utf-8")
    rig.data["updates"] = {"ca": "ca.pem"}
    return rig.write(), ("updates.ca", "ca.pem", "not a PEM certificate")


def _canaries_not_a_boolean(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    rig.data["dns"] = {"listen": [f"{HOST}:0"], "canaries": "yes"}
    return rig.write(), ("dns.canaries", "'yes'")


def _canaries_with_a_certificate_naming_no_resolver(rig: Rig) -> tuple[Path, tuple[str, ...]]:
    """resolver.arpa's SVCB needs a TargetName: a certificate with addresses only."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "addresses only")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(1)
                   .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
                   .sign(key, hashes.SHA256()))
    (rig.dir / "ip.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (rig.dir / "ip.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    rig.data["dns"] = {"listen": [f"{HOST}:0"], "dot_listen": [f"{HOST}:0"],
                       "tls_certificate": "ip.pem", "tls_key": "ip.key", "canaries": True}
    return rig.write(), ("dns.canaries", "ip.pem", "no DNS name")


CASES: dict[str, Case] = {
    "unknown key": _unknown_key,
    "wrong type": _wrong_type,
    "missing config": _missing_config,
    "config is a directory": _config_is_a_directory,
    "config not YAML": _not_yaml,
    "missing list": _missing_list,
    "list is a directory": _list_is_a_directory,
    "keyed list without hmac_key": _keyed_list_without_hmac_key,
    "wrong hmac_key": _wrong_hmac_key,
    "missing trust key": _missing_trust_key,
    "trust key not a key": _trust_key_not_a_key,
    "list by an untrusted key": _untrusted_list,
    "expired list under on_expiry stop": _expired_list_under_stop,
    "hmac_key for a sha256 list": _hmac_key_for_a_sha256_list,
    "node key readable by others": _node_key_readable_by_others,
    "missing local list": _missing_local_list,
    "malformed local list": _malformed_local_list,
    "missing templates directory": _missing_templates,
    "tiles_listen without tiles": _tiles_listen_without_tiles,
    "unknown audit group": _unknown_group,
    "missing protected names": _missing_protected_names,
    "malformed protected names": _malformed_protected_names,
    "pinned CA not a certificate": _pinned_ca_not_a_certificate,
    "canaries not true or false": _canaries_not_a_boolean,
    "canaries with a certificate naming no resolver":
        _canaries_with_a_certificate_naming_no_resolver,
}


@pytest.fixture
def rig(tmp_path: Path, build: BuildBundle, authority: tuple[Path, Path]) -> Rig:
    return Rig(tmp_path, build, authority[1])


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_mistake_is_one_line_exit_2(rig: Rig, case: Case) -> None:
    config, needles = case(rig)
    line = _one_line(_netfilter("config", "check", config))
    for needle in needles:
        assert needle in line, line
    assert not (rig.dir / "audit.sqlite").exists()  # nothing was started


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_list_is_one_line(rig: Rig) -> None:
    rig.list.chmod(0)
    line = _one_line(_netfilter("config", "check", rig.write()))
    assert "lists[0].path" in line and "not readable" in line, line


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM], ids=["udp", "tcp"])
def test_a_dns_port_in_use_is_one_line(rig: Rig, kind: int) -> None:
    port = free_port()
    rig.data["dns"] = {"listen": [f"{HOST}:0", f"{HOST}:{port}"], "upstreams": [f"{HOST}:9"]}
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind((HOST, port))
        if kind == socket.SOCK_STREAM:
            taken.listen()
        line = _one_line(_netfilter("config", "check", rig.write()))
    assert line == (f"netfilter: error: dns.listen[1]: cannot listen on {HOST} port {port} "
                    "(address already in use)")


def test_two_parts_on_one_address_are_caught(rig: Rig) -> None:
    port = free_port()
    rig.data["stoppage"] = {"listen": f"{HOST}:{port}"}
    rig.data["metrics"] = {"listen": f"{HOST}:{port}"}
    line = _one_line(_netfilter("config", "check", rig.write()))
    assert line.startswith(f"netfilter: error: metrics.listen: cannot listen on {HOST} "
                           f"port {port}"), line


def test_a_good_config_is_ok(rig: Rig) -> None:
    rig.data["stoppage"] = {"listen": f"{HOST}:{free_port()}"}
    result = _netfilter("config", "check", rig.write())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK ") and result.stderr == ""


def test_serve_runs_the_checks_first(rig: Rig) -> None:
    rig.data["lists"][0]["path"] = "absent.nfl"
    rig.data["stoppage"] = {"listen": f"{HOST}:{free_port()}"}
    line = _one_line(_netfilter("serve", "--config", rig.write()))
    assert "lists[0].path" in line and "absent.nfl" in line, line
    assert not (rig.dir / "audit.sqlite").exists() and not (rig.dir / "node.key").exists()


# ---------------------------------------------------------------- examples/netfilter.yaml


def _section(annotation: Any) -> type[BaseModel] | None:
    """The settings model inside `X`, `X | None` or `list[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (list, Union, types.UnionType):
        for arg in get_args(annotation):
            if (found := _section(arg)) is not None:
                return found
    return None


def _compare(model: type[BaseModel], data: Any, where: str) -> list[str]:
    """Keys of `model` missing from `data`, and keys of `data` the model lacks."""
    assert isinstance(data, dict), f"{where}: not a mapping"
    fields = {n: f for n, f in model.model_fields.items() if not f.exclude}
    problems = [f"{where}{n}: missing" for n in fields if n not in data]
    problems += [f"{where}{k}: not in {model.__name__}" for k in data if k not in fields]
    for name, field in fields.items():
        inner = _section(field.annotation)
        if inner is None or data.get(name) is None:
            continue
        items = data[name] if isinstance(data[name], list) else [data[name]]
        assert items, f"{where}{name}: give one item, to show its keys"
        for item in items:
            problems += _compare(inner, item, f"{where}{name}.")
    return problems


def test_the_example_names_every_key_and_no_other() -> None:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert _compare(Settings, data, "") == []


# Where the example departs from a model default on purpose (its comment says why).
NOT_DEFAULT = {("local", "block"), ("local", "allow"), ("proxy", "intercept")}


def test_the_example_shows_the_defaults() -> None:
    settings = load_config(EXAMPLE)
    for name, field in Settings.model_fields.items():
        model = _section(field.annotation)
        if field.exclude or model is None or name == "lists":
            continue
        got, default = getattr(settings, name).model_dump(), model().model_dump()
        for key, value in default.items():
            if (name, key) not in NOT_DEFAULT:
                assert got[key] == value, f"{name}.{key}: {got[key]!r}, default {value!r}"


def test_the_example_passes_the_checks() -> None:
    pytest.importorskip("mitmproxy")  # it has a proxy section
    # Its ports are the defaults, which another program on a test machine may hold:
    # the listen checks are covered above on free ports.
    check_config(load_config(EXAMPLE), listen=False)
    assert not (EXAMPLE.parent / "var").exists()  # a check creates nothing
