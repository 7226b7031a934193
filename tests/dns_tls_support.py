"""Helpers for the DoT and DoH tests: a certificate, `netfilter serve dns` with DoT and
DoH listeners in front of a real unbound, kdig, and TLS client contexts that verify
the server's certificate (self-signed, for 127.0.0.1 and localhost).

Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dns.edns
import dns.message

from netfilter.dns.tlsconfig import generate_self_signed
from tests.dns_support import HOST, Netfilter, Unbound, free_port, require_tools, running

__all__ = ["EncryptedNetfilter", "certificate", "client_context", "closed_by_server",
           "ede_of", "kdig", "running_unbound", "serving", "tls_connect"]


def certificate(directory: Path) -> tuple[Path, Path]:
    """A new self-signed pair (certificate, key) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "tls.crt", directory / "tls.key"
    generate_self_signed(cert, key)
    return cert, key


class EncryptedNetfilter(Netfilter):
    """`netfilter serve dns` with one DoT and one DoH listener beside UDP/TCP."""

    def __init__(self, directory: Path, cert: Path, key: Path, *,
                 upstreams: Sequence[str], **settings: Any) -> None:
        self.dot_port = free_port()
        self.doh_port = free_port()
        super().__init__(directory, upstreams=upstreams,
                         dot_listen=[f"{HOST}:{self.dot_port}"],
                         doh_listen=[f"{HOST}:{self.doh_port}"],
                         tls_certificate=str(cert), tls_key=str(key), **settings)
        self.cert = cert

    @property
    def doh_url(self) -> str:
        return f"https://{HOST}:{self.doh_port}/dns-query"


@contextmanager
def running_unbound(directory: Path) -> Iterator[Unbound]:
    """The upstream of the encrypted listeners' tests (skips without unbound or kdig)."""
    require_tools("unbound", "kdig")
    server = Unbound(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def serving(directory: Path, unbound: Unbound, pair: tuple[Path, Path],
            **settings: Any) -> Iterator[EncryptedNetfilter]:
    """A running EncryptedNetfilter in front of `unbound`; its stderr shown on failure."""
    with running(EncryptedNetfilter(directory, *pair, upstreams=[unbound.address],
                                    **settings)) as server:
        yield server


def client_context(cert: Path, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """A client context that trusts only `cert` (and checks the name 127.0.0.1)."""
    context = ssl.create_default_context(cafile=str(cert))
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def tls_connect(port: int, cert: Path, *, source: str = HOST,
                alpn: Sequence[str] = ()) -> ssl.SSLSocket:
    """A TLS connection to HOST:port from `source`, handshake done."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(5.0)
    raw.bind((source, 0))
    raw.connect((HOST, port))
    return client_context(cert, alpn).wrap_socket(raw, server_hostname=HOST)


def closed_by_server(sock: socket.socket, bound: float = 5.0) -> bool:
    """Does the server end the connection (EOF, reset, TLS close) within `bound`
    seconds? What it sends before is read and discarded. For plain TCP too."""
    deadline = time.monotonic() + bound
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True
    return False


def kdig(*args: str, timeout: float = 15.0) -> str:
    """Run kdig (no retry, 3 s) and return its output."""
    cmd = ["kdig", "+retry=0", "+timeout=3", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    return done.stdout + done.stderr


def ede_of(response: dns.message.Message) -> list[tuple[int, str]]:
    """The Extended DNS Errors of an answer: (code, text)."""
    return [(int(o.code), str(o.text)) for o in response.options
            if isinstance(o, dns.edns.EDEOption)]
