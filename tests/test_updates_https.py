"""List updates from an HTTPS source: a real TLS server on 127.0.0.1 with a test CA
(made here with `cryptography`) pinned in the config; conditional requests (the second
check is a 304 and rewrites nothing); TLS always verified; https only."""

from __future__ import annotations

import hashlib
import http.server
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from netfilter.events import MemorySink
from tests.conftest import BuildBundle
from tests.support import HOST
from tests.test_updates import Node


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca_and_server(directory: Path, label: str = "test") -> tuple[Path, Path, Path]:
    """(CA cert, server cert, server key) PEM files: a CA and a cert for 127.0.0.1."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(f"{label} CA")).issuer_name(
        _name(f"{label} CA")).public_key(ca_key.public_key()).serial_number(
        x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                     crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(HOST)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / f"{label}-ca.pem", directory / f"{label}-server.pem",
             directory / f"{label}-server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@dataclass
class Publisher:
    """An authority's HTTPS mirror: serves `files` with ETag and Last-Modified and
    answers conditional requests; keeps (path, request headers, status) per request."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str], int]] = field(default_factory=list)
    redirects: dict[str, str] = field(default_factory=dict)
    always_304: bool = False  # a broken (or hostile) mirror
    port: int = 0
    modified: str = field(default_factory=lambda: formatdate(usegmt=True))

    def put(self, name: str, data: bytes) -> None:
        self.files[name] = data
        self.modified = formatdate(usegmt=True)

    def url(self, path: str = "/") -> str:
        return f"https://{HOST}:{self.port}{path}"


def _handler(pub: Publisher) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            if self.path in pub.redirects:
                status = 302
                self.send_response(status)
                self.send_header("Location", pub.redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path.lstrip("/") not in pub.files:
                status = 404
                self.send_error(status)
            else:
                data = pub.files[self.path.lstrip("/")]
                etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
                if headers.get("if-none-match") == etag or pub.always_304:
                    status = 304
                    self.send_response(status)
                    self.send_header("ETag", etag)
                    self.end_headers()
                else:
                    status = 200
                    self.send_response(status)
                    self.send_header("ETag", etag)
                    self.send_header("Last-Modified", pub.modified)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
            pub.requests.append((self.path, headers, status))

        def log_message(self, format: str, *args: object) -> None:
            return None

    return Handler


@pytest.fixture
def https(tmp_path: Path) -> Iterator[tuple[Publisher, Path]]:
    """(the mirror, its pinned CA file), serving on 127.0.0.1 over TLS."""
    ca, cert, key = make_ca_and_server(tmp_path / "tls")
    pub = Publisher()
    server = http.server.ThreadingHTTPServer((HOST, 0), _handler(pub))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    pub.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield pub, ca
    finally:
        server.shutdown()
        server.server_close()


def test_conditional_requests_over_pinned_tls(tmp_path: Path, authority: tuple[Path, Path],
                                              build: BuildBundle,
                                              https: tuple[Publisher, Path]) -> None:
    pub, ca = https
    node = Node(tmp_path, authority[1], source=pub.url("/lists/"), updates={"ca": str(ca)})
    pub.put("lists/test.nfl", build(version=1).read_bytes())
    sink = MemorySink()
    updater = node.updater(sink)
    [first] = updater.run_once()
    assert (first.outcome, first.version, first.source) == (
        "installed", 1, pub.url("/lists/test.nfl"))
    assert node.target.read_bytes() == pub.files["lists/test.nfl"]
    path, headers, status = pub.requests[-1]
    assert (path, status) == ("/lists/test.nfl", 200)
    assert "if-none-match" not in headers and "netfilter/" in headers["user-agent"]

    before = node.target.stat()
    [second] = updater.run_once()
    assert (second.outcome, second.not_modified) == ("current", True)
    path, headers, status = pub.requests[-1]
    assert status == 304
    assert headers["if-none-match"].startswith('"') and headers["if-modified-since"]
    after = node.target.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino, before.st_mtime_ns, before.st_size)  # nothing rewritten
    assert not node.stages()

    pub.put("lists/test.nfl", build(version=2).read_bytes())
    [third] = updater.run_once()
    assert (third.outcome, third.version, third.previous) == ("installed", 2, 1)
    assert pub.requests[-1][2] == 200
    assert [(e.type, e.action, e.version) for e in sink.events] == [
        ("list-loaded", "install", 1), ("list-loaded", "install", 2)]
    updater.close()


def test_tls_is_verified_without_the_pin(tmp_path: Path, authority: tuple[Path, Path],
                                         build: BuildBundle,
                                         https: tuple[Publisher, Path]) -> None:
    pub, _ = https
    pub.put("test.nfl", build(version=1).read_bytes())
    node = Node(tmp_path, authority[1], source=pub.url("/test.nfl"))  # system CAs only
    [result] = node.updater().run_once()
    assert result.outcome == "failed" and "CERTIFICATE_VERIFY_FAILED" in result.reason
    assert not node.target.exists() and pub.requests == []


def test_another_ca_pinned_is_refused(tmp_path: Path, authority: tuple[Path, Path],
                                      build: BuildBundle,
                                      https: tuple[Publisher, Path]) -> None:
    pub, _ = https
    other_ca, _, _ = make_ca_and_server(tmp_path / "other", label="other")
    pub.put("test.nfl", build(version=1).read_bytes())
    node = Node(tmp_path, authority[1], source=pub.url("/test.nfl"),
                updates={"ca": str(other_ca)})
    [result] = node.updater().run_once()
    assert result.outcome == "failed" and "certificate" in result.reason.lower()
    assert not node.target.exists()


def test_http_errors_and_plain_http_redirects_fail(tmp_path: Path,
                                                   authority: tuple[Path, Path],
                                                   https: tuple[Publisher, Path]) -> None:
    pub, ca = https
    pub.redirects["/moved.nfl"] = f"http://{HOST}:{pub.port}/test.nfl"
    for path, words in (("/absent.nfl", "HTTP 404"), ("/moved.nfl", "https only")):
        node = Node(tmp_path / path.strip("/"), authority[1], source=pub.url(path),
                    updates={"ca": str(ca)})
        [result] = node.updater().run_once()
        assert result.outcome == "failed" and words in result.reason, result
        assert not node.target.exists()


def test_a_body_larger_than_max_size_is_refused(tmp_path: Path, authority: tuple[Path, Path],
                                                build: BuildBundle,
                                                https: tuple[Publisher, Path]) -> None:
    pub, ca = https
    pub.put("test.nfl", build(version=1).read_bytes())
    node = Node(tmp_path, authority[1], source=pub.url("/test.nfl"),
                updates={"ca": str(ca), "max_size": 1024})
    [result] = node.updater().run_once()
    assert result.outcome == "failed" and "max_size" in result.reason
    assert not node.target.exists() and not node.stages()


def test_not_modified_to_an_unconditional_request_is_a_failure(
        tmp_path: Path, authority: tuple[Path, Path], build: BuildBundle,
        https: tuple[Publisher, Path]) -> None:
    pub, ca = https
    pub.put("test.nfl", build(version=1).read_bytes())
    pub.always_304 = True
    node = Node(tmp_path, authority[1], source=pub.url("/test.nfl"), updates={"ca": str(ca)})
    [result] = node.updater().run_once()
    assert result.outcome == "failed" and "unconditional" in result.reason
    assert not node.target.exists() and not node.stages()
