"""The encrypted DNS listeners of one DNS server: DoT and DoH on their bound sockets,
one TLS context each, their counters in one place.

A part of `netfilter serve` beside the DnsServer it asks (started after it, stopped
before it). Its counters are `netfilter_dns_encrypted_*` on /metrics: queries, HTTP
errors, handshakes failed, connections refused or closed, per transport prefix (dot_,
doh_).
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from netfilter.config import DnsSettings
from netfilter.dns.asking import Handler
from netfilter.dns.doh import DohListener
from netfilter.dns.dot import DotListener
from netfilter.dns.tlsconfig import ALPN_DOH, ALPN_DOT, server_context

__all__ = ["EncryptedDns"]

log = logging.getLogger(__name__)


class EncryptedDns:
    """DoT on `dot` sockets and DoH on `doh` sockets (bound by `netfilter serve`,
    closed at stop), answering through `resolver`. `base` resolves relative
    certificate and key paths. ConfigError at construction when they do not load."""

    def __init__(self, resolver: Handler, settings: DnsSettings, *, base: Path,
                 dot: Sequence[socket.socket] = (), doh: Sequence[socket.socket] = ()) -> None:
        assert settings.tls_certificate is not None and settings.tls_key is not None
        self.certificate = _resolved(base, settings.tls_certificate)
        self.key = _resolved(base, settings.tls_key)
        self.stats: Counter[str] = Counter()
        self._dot_sockets = list(dot)
        self._doh_sockets = list(doh)
        self.dot = DotListener(resolver, settings,
                               server_context(self.certificate, self.key, ALPN_DOT),
                               self.stats)
        self.doh = DohListener(resolver, settings,
                               server_context(self.certificate, self.key, ALPN_DOH),
                               self.stats)
        self.addresses: list[tuple[str, str, int]] = []  # (transport, host, port)

    async def start(self) -> None:
        for kind, sockets, acceptor in (("dot", self._dot_sockets, self.dot.acceptor),
                                        ("doh", self._doh_sockets, self.doh.acceptor)):
            while sockets:  # each leaves the list once the loop serves it
                sock = sockets[0]
                host, port = sock.getsockname()[:2]
                await acceptor.serve(sock)
                self.addresses.append((kind, str(host), int(port)))
                log.info("dns: serving %s on %s port %d", "DNS over TLS" if kind == "dot"
                         else "DNS over HTTPS (/dns-query)", host, port)
                sockets.pop(0)

    async def stop(self) -> None:
        await self.dot.acceptor.stop()
        await self.doh.acceptor.stop()
        for sock in self._dot_sockets + self._doh_sockets:  # not served: start failed
            sock.close()
        log.info("dns: encrypted listeners stopped; %s", ", ".join(
            f"{key} {value}" for key, value in sorted(self.stats.items())) or "no connections")

    def reload_certificate(self) -> None:
        """Load the configured certificate and key again (renewed files) for new
        connections; ConfigError, and the pair in force stays, when they do not load."""
        server_context(self.certificate, self.key, ALPN_DOT)  # check first
        for acceptor in (self.dot.acceptor, self.doh.acceptor):
            acceptor.context.load_cert_chain(self.certificate, self.key)

    def counts(self) -> dict[str, int]:
        return dict(self.stats)


def _resolved(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else base / path
