"""DoT/DoH configuration and the pure parts of the encrypted listeners.

`netfilter config check` and `serve`: a missing, unreadable or mismatched certificate or
key, or DoT/DoH without one, is one line naming the key (exit 2); a DoT or DoH port in
use is named by its key (`dns.dot_listen[0]`) and nothing starts. Then RFC 8467 padding
and RFC 8484 request parsing, as functions, on tables of cases.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.rrset
import pytest
import yaml

from netfilter.dns.dohrequest import HttpError, query_of
from netfilter.dns.padding import BLOCK, pad, wants_padding
from netfilter.dns.tlsconfig import generate_self_signed
from tests.support import DEMO_LIST, DEMO_PUB, HOST, free_port


def _netfilter(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netfilter.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("netfilter: error: "), result.stderr
    return lines[0]


def _config(tmp_path: Path, **dns_settings: Any) -> Path:
    data = {
        "node": {"id": "tls-test", "key": "node.key"},
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
        "dns": {"listen": [f"{HOST}:{free_port()}"], "upstreams": [f"{HOST}:9"],
                **dns_settings},
        "audit": {"path": "audit.sqlite", "client": "none"},
    }
    path = tmp_path / "nf.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    generate_self_signed(cert, key)
    return cert, key


def test_generated_key_is_private(pair: tuple[Path, Path]) -> None:
    assert pair[1].stat().st_mode & 0o777 == 0o600
    assert b"BEGIN CERTIFICATE" in pair[0].read_bytes()


def test_a_good_config_checks(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    config = _config(tmp_path, dot_listen=[f"{HOST}:{free_port()}"],
                     doh_listen=[f"{HOST}:{free_port()}"], tls_certificate=str(pair[0]),
                     tls_key=str(pair[1]))
    result = _netfilter("config", "check", config)
    assert result.returncode == 0, result.stderr


def _other_key(tmp_path: Path) -> Path:
    other = tmp_path / "other"
    other.mkdir()
    generate_self_signed(other / "c.pem", other / "k.pem")
    return other / "k.pem"


@pytest.mark.parametrize(("case", "expected"), [
    ("no certificate", ("dns", "dot_listen and doh_listen need tls_certificate and tls_key")),
    ("missing certificate", ("dns.tls_certificate", "absent.pem: no such file")),
    ("missing key", ("dns.tls_key", "absent.pem: no such file")),
    ("key of another certificate", ("dns.tls_key", "cannot be used together")),
    ("not PEM", ("dns.tls_key", "cannot be used together")),
])
def test_config_check_names_the_key(tmp_path: Path, pair: tuple[Path, Path], case: str,
                                    expected: tuple[str, ...]) -> None:
    cert, key = str(pair[0]), str(pair[1])
    settings: dict[str, Any] = {"doh_listen": [f"{HOST}:{free_port()}"],
                                "tls_certificate": cert, "tls_key": key}
    if case == "no certificate":
        del settings["tls_certificate"]
    elif case == "missing certificate":
        settings["tls_certificate"] = str(tmp_path / "absent.pem")
    elif case == "missing key":
        settings["tls_key"] = str(tmp_path / "absent.pem")
    elif case == "key of another certificate":
        settings["tls_key"] = str(_other_key(tmp_path))
    else:
        junk = tmp_path / "junk.pem"
        junk.write_text("not a certificate\n", encoding="utf-8")
        settings["tls_certificate"] = str(junk)
    config = _config(tmp_path, **settings)
    for args in (("config", "check", config), ("serve", "dns", "--config", config)):
        line = _one_line(_netfilter(*args))
        for part in expected:
            assert part in line, line


@pytest.mark.parametrize("kind", ["dot_listen", "doh_listen"])
def test_a_port_in_use_is_named_and_nothing_starts(tmp_path: Path, pair: tuple[Path, Path],
                                                   kind: str) -> None:
    with socket.create_server((HOST, 0)) as taken:
        port = taken.getsockname()[1]
        config = _config(tmp_path, **{kind: [f"{HOST}:{free_port()}", f"{HOST}:{port}"]},
                         tls_certificate=str(pair[0]), tls_key=str(pair[1]))
        for args in (("config", "check", config), ("serve", "dns", "--config", config)):
            line = _one_line(_netfilter(*args))
            assert f"dns.{kind}[1]" in line and "already in use" in line, line
    assert not (tmp_path / "audit.sqlite").exists()


# ---------------------------------------------------------------- padding (RFC 8467)


def _response(name: str, *, edns: bool, padded_query: bool = False) -> bytes:
    query = dns.message.make_query(name, "TXT", use_edns=0 if edns else False,
                                   pad=128 if padded_query else 0)
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(name + ".", 300, "IN", "TXT", '"' + "x" * 40 + '"'))
    response.pad = 0
    return response.to_wire()


@pytest.mark.parametrize("edns", [True, False])
@pytest.mark.parametrize("name", ["a.example", "long." * 20 + "example"])
def test_pad_to_a_multiple_of_468(name: str, edns: bool) -> None:
    padded = pad(_response(name, edns=edns))
    assert len(padded) % BLOCK == 0
    message = dns.message.from_wire(padded)
    assert [o.otype for o in message.options] == [dns.edns.OptionType.PADDING]
    assert message.answer[0][0].strings == (b"x" * 40,)


def test_pad_leaves_padded_and_malformed_alone() -> None:
    once = pad(_response("a.example", edns=True))
    assert pad(once) == once
    for junk in (b"", b"\x00" * 11, _response("a.example", edns=True)[:-3]):
        assert pad(junk) == junk


def test_wants_padding() -> None:
    assert wants_padding(dns.message.make_query("a.example", "A", use_edns=0,
                                                pad=128).to_wire())
    assert not wants_padding(dns.message.make_query("a.example", "A", use_edns=0).to_wire())
    assert not wants_padding(dns.message.make_query("a.example", "A").to_wire())
    assert not wants_padding(b"\x00" * 5)


# ---------------------------------------------------------------- DoH requests (RFC 8484)

QUERY = dns.message.make_query("a.example", "A").to_wire()
B64 = base64.urlsafe_b64encode(QUERY).rstrip(b"=").decode()
CT = "application/dns-message"


def test_query_of_good_requests() -> None:
    assert query_of("GET", f"/dns-query?dns={B64}", None, b"") == QUERY
    assert query_of("GET", f"/dns-query?ct&dns={B64}", None, b"") == QUERY
    assert query_of("POST", "/dns-query", CT, QUERY) == QUERY
    assert query_of("POST", "/dns-query", "Application/DNS-Message; x=1", QUERY) == QUERY


@pytest.mark.parametrize(("method", "target", "content_type", "body", "status"), [
    ("GET", "/", None, b"", 404),
    ("GET", f"/dns-query/x?dns={B64}", None, b"", 404),
    ("DELETE", "/dns-query", None, b"", 405),
    ("GET", "/dns-query", None, b"", 400),
    ("GET", f"/dns-query?dns={B64}&dns={B64}", None, b"", 400),
    ("GET", f"/dns-query?dns={B64}==", None, b"", 400),
    ("GET", "/dns-query?dns=a+b", None, b"", 400),
    ("GET", "/dns-query?dns=AAAA", None, b"", 400),
    ("GET", "/dns-query?dns=" + "A" * 90000, None, b"", 413),
    ("POST", "/dns-query", None, QUERY, 415),
    ("POST", "/dns-query", "application/json", QUERY, 415),
    ("POST", "/dns-query", CT, b"\x00" * 65536, 413),
    ("POST", "/dns-query", CT, b"\x00" * 11, 400),
])
def test_query_of_bad_requests(method: str, target: str, content_type: str | None,
                               body: bytes, status: int) -> None:
    with pytest.raises(HttpError) as caught:
        query_of(method, target, content_type, body)
    assert caught.value.status == status
