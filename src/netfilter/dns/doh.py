"""DNS over HTTPS (RFC 8484): the listener that picks the HTTP version by ALPN
(HTTP/2 in `doh_h2`, HTTP/1.1 in `doh_h1`) and answers each request (`dohrequest` says
what a request means). The answer is the DnsServer's, as over UDP (a blocked name
carries the same Extended DNS Error), padded to a multiple of 468 octets when the
query carried the padding option (RFC 8467).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter

from netfilter.config import DnsSettings
from netfilter.dns.asking import Handler, ask
from netfilter.dns.dohrequest import Deliver, HttpError, query_of
from netfilter.dns.padding import pad, wants_padding
from netfilter.dns.streamslots import Held, StreamSlots
from netfilter.dns.tlsaccept import TlsAcceptor

__all__ = ["DohListener"]


class DohListener:
    """DoH on the `dns.doh_listen` sockets: HTTP/2 when ALPN chose "h2", else
    HTTP/1.1; answers through `resolver`."""

    def __init__(self, resolver: Handler, settings: DnsSettings, context: ssl.SSLContext,
                 stats: Counter[str]) -> None:
        self.resolver = resolver
        self.settings = settings
        self.stats = stats
        slots = StreamSlots(settings.tcp_max_connections, settings.tcp_per_client, stats,
                            "doh")
        self.acceptor = TlsAcceptor(context, slots, self.session,
                                    handshake_timeout=settings.tls_handshake_timeout,
                                    stats=stats, prefix="doh", fault=resolver.fault)

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      held: Held) -> None:
        tls = writer.get_extra_info("ssl_object")
        alpn = tls.selected_alpn_protocol() if tls is not None else None
        if alpn == "h2":
            from netfilter.dns.doh_h2 import serve_h2

            self.stats["doh_connections_h2"] += 1
            await serve_h2(self, reader, writer, held)
        else:
            from netfilter.dns.doh_h1 import serve_h1

            self.stats["doh_connections_http1"] += 1
            await serve_h1(self, reader, writer, held)

    def answer(self, method: str, target: str, content_type: str | None, body: bytes,
               held: Held, deliver: Deliver) -> None:
        """Answer one request through `deliver` (once): the DNS answer, or an HTTP
        error."""
        try:
            data = query_of(method, target, content_type, body)
        except HttpError as e:
            self.stats[f"doh_http_{e.status}"] += 1
            deliver(e.status, (e.reason + "\n").encode())
            return
        self.stats["doh_queries"] += 1
        padded = wants_padding(data)
        done = False

        def respond(answer: bytes) -> None:
            nonlocal done
            if done:
                return
            done = True
            held.busy -= 1
            held.touch()
            if not answer:  # dropped by the server: a response, not a query
                self.stats["doh_http_400"] += 1
                deliver(400, b"not a DNS query\n")
            else:
                deliver(200, pad(answer) if padded else answer)

        held.busy += 1
        ask(self.resolver, data, held.client, respond, "doh query")
