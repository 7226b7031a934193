"""Helpers for the proxy front-end's tests: a netfilter config over the demo bundle,
counting origin servers (HTTP and HTTPS with a self-signed certificate), a real
`mitmdump` with the addon, and curl.

Everything runs on 127.0.0.1. The test names (*.example, *.test) resolve nowhere: the
proxy reaches the origins through the addon's `netfilter_resolve` routes, curl through
the proxy, and the proxy refuses every destination outside 127.0.0.0/8.
"""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support import (
    DEMO_ALLOW,
    DEMO_LIST,
    DEMO_PUB,
    HOST,
    REPO,
    ChildProcess,
    free_port,
    listening,
    read_events,
    wait_for,
)
from tests.support import require_tools as _require_tools

__all__ = [
    "ADDON",
    "DEMO_ALLOW",
    "DEMO_LIST",
    "DEMO_PUB",
    "HOST",
    "MITMDUMP",
    "OPERATOR_URL",
    "Curl",
    "CurlResult",
    "Mitmdump",
    "Origin",
    "free_port",
    "make_certificate",
    "read_events",
    "require_tools",
    "wait_for",
    "write_config",
]

ADDON = REPO / "addons" / "netfilter_proxy.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"
OPERATOR_URL = "https://operator.test/netfilter"

START_BOUND = 30.0  # seconds mitmdump may take to listen
STOP_BOUND = 10.0


# ---------------------------------------------------------------- config


def write_config(directory: Path, *, confdir: Path | None = None, intercept: str | None = None,
                 allowed: Sequence[str] | None = ("127.0.0.0/8",), audit: bool = True,
                 name: str = "netfilter.yaml", extra_proxy: dict[str, Any] | None = None) -> Path:
    """A netfilter config over the demo bundle, its exceptions, a stop page operator
    (so the page carries a Link header) and an audit log in `directory`."""
    proxy: dict[str, Any] = {"listen": f"{HOST}:0"}
    if confdir is not None:
        proxy["confdir"] = str(confdir)
    if intercept is not None:
        proxy["intercept"] = intercept
    if allowed is not None:
        proxy["allowed_destinations"] = list(allowed)
    proxy.update(extra_proxy or {})
    config: dict[str, Any] = {
        "node": {"id": "proxy-test", "key": str(directory / "node.key")},
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
        "local": {"allow": str(DEMO_ALLOW)},
        "proxy": proxy,
        "stoppage": {"operator": "Test School IT", "operator_url": OPERATOR_URL},
    }
    if audit:
        config["audit"] = {"path": str(directory / "audit.sqlite"), "client": "truncated",
                           "checkpoint_interval": 3600}
    path = directory / name
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------- origins


def make_certificate(directory: Path, names: Sequence[str],
                     common_name: str = "netfilter test origin") -> tuple[Path, Path]:
    """A self-signed certificate (its own issuer) for `names` and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans.append(x509.IPAddress(ipaddress.ip_address(HOST)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "origin-cert.pem"
    key_path = directory / "origin-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class Seen:
    method: str
    path: str
    host: str
    body: bytes


@dataclass
class Origin:
    """A counting origin on 127.0.0.1: every accepted connection and request is kept."""

    tls: tuple[Path, Path] | None = None
    connections: int = 0
    requests: list[Seen] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)  # TLS SNI, per handshake

    def __post_init__(self) -> None:
        origin = self
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                with lock:
                    origin.requests.append(Seen(self.command, self.path,
                                                self.headers.get("host", ""), body))
                text = f"hello from the origin: {self.path}\n".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(text)

            do_GET = do_POST = do_HEAD = _reply

            def log_message(self, format: str, *args: Any) -> None:
                return None

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request: Any, client_address: Any) -> bool:
                with lock:
                    origin.connections += 1
                return True

        self.server = Server((HOST, 0), Handler)
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))

            def sni(_sock: Any, name: str | None, _context: Any) -> None:
                with lock:
                    origin.server_names.append(name)

            context.sni_callback = sni
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def snapshot(self) -> tuple[int, int]:
        return self.connections, len(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- mitmdump


class Mitmdump(ChildProcess):
    """`mitmdump -s addons/netfilter_proxy.py` on a free loopback port."""

    name = "mitmdump"
    start_bound = START_BOUND
    stop_bound = STOP_BOUND

    def __init__(self, directory: Path, config: Path, confdir: Path, *,
                 routes: Sequence[str] = ("*.example=127.0.0.1", "*.test=127.0.0.1"),
                 extra: Sequence[str] = ()) -> None:
        self.directory = directory
        self.config = config
        self.confdir = confdir
        self.port = free_port()
        self.log_path = directory / "mitmdump.log"
        # Not -q: it forces termlog_verbosity=error over any --set, and the tests read
        # the addon's info lines (ready, SNI mismatch, reload). flow_detail=0 is quiet
        # about flows.
        args = [str(MITMDUMP), "--listen-host", HOST, "-p", str(self.port),
                "--set", "flow_detail=0",
                "--set", f"confdir={confdir}", "--set", "connection_strategy=lazy",
                "--set", "ssl_insecure=true", "--set", "termlog_verbosity=info",
                "-s", str(ADDON), "--set", f"netfilter_config={config}"]
        for route in routes:
            args += ["--set", f"netfilter_resolve={route}"]
        self.args = [*args, *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mitmdump:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONUNBUFFERED"] = "1"  # the log is read while it runs
        self.popen(self.args, env=env, new_session=True)
        self.wait_until(lambda: listening(self.port) and "entries in force" in self.log())
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


# ---------------------------------------------------------------- curl


@dataclass
class CurlResult:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    stderr: str
    http_version: str
    connect_status: int

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass
class Curl:
    """curl through the proxy, one process per request."""

    proxy: str
    directory: Path
    counter: int = 0

    def __call__(self, url: str, *args: str, timeout: float = 15.0) -> CurlResult:
        self.counter += 1
        body = self.directory / f"curl-{self.counter}.body"
        head = self.directory / f"curl-{self.counter}.head"
        cmd = ["curl", "-sS", "-v", "--proxy", self.proxy, "--max-time", "10",
               "-o", str(body), "-D", str(head),
               "-w", "%{http_code} %{http_version} %{http_connect}", *args, url]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False, env=env)
        code, version, connect = [*done.stdout.split(), "0", "0", "0"][:3]
        headers: dict[str, list[str]] = {}
        raw = head.read_text("latin-1") if head.exists() else ""
        # -D holds the CONNECT answer too; keep the last response's fields only.
        blocks = [b for b in raw.replace("\r\n", "\n").split("\n\n") if b.strip()]
        for line in (blocks[-1].splitlines()[1:] if blocks else []):
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        return CurlResult(int(code), headers, body.read_bytes() if body.exists() else b"",
                          done.stderr, version, int(connect))


def require_tools(*tools: str) -> None:
    """Skip (with the reason) when a command-line tool the tests drive is missing."""
    _require_tools(*tools, why="Debian: apt-get install curl chromium; the proxy "
                               "integration tests drive it")
