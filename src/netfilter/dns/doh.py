"""DNS over HTTPS (RFC 8484): what a request means, and the listener that picks the
HTTP version by ALPN (HTTP/2 in `doh_h2`, HTTP/1.1 in `doh_h1`).

Only `/dns-query` is served: GET with the query in `?dns=` (base64url, no padding) and
POST with an `application/dns-message` body. A request that is not one of these gets a
plain HTTP error and the connection goes on: 404 (another path), 405 (another method),
415 (another content type), 413 (a message over 65535 octets), 400 (anything else
malformed, or a DNS message that is not a query). The answer is the DnsServer's, as
over UDP (a blocked name carries the same Extended DNS Error), padded to a multiple of
468 octets when the query carried the padding option (RFC 8467).
"""

from __future__ import annotations

import asyncio
import binascii
import ssl
from base64 import urlsafe_b64decode
from collections import Counter
from collections.abc import Callable
from urllib.parse import parse_qs

from netfilter.config import DnsSettings
from netfilter.dns.asking import Handler, ask
from netfilter.dns.padding import pad, wants_padding
from netfilter.dns.streamslots import Held, StreamSlots
from netfilter.dns.tlsaccept import TlsAcceptor

__all__ = ["CONTENT_TYPE", "PATH", "DohListener", "HttpError", "query_of"]

PATH = "/dns-query"
CONTENT_TYPE = "application/dns-message"
MAX_MESSAGE = 65535
MAX_TARGET = 2 + 4 * MAX_MESSAGE // 3 + len(PATH) + 8  # "?dns=" and a whole message
MAX_HEADERS = 16 * 1024  # octets of a request head (HTTP/1.1) or header list (HTTP/2)
_B64URL = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
Deliver = Callable[[int, bytes], None]  # status, body


class HttpError(Exception):
    """A request answered with an HTTP error: `status` and a short plain-text reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def query_of(method: str, target: str, content_type: str | None, body: bytes) -> bytes:
    """The DNS query a request carries, or HttpError saying why there is none."""
    path, _, params = target.partition("?")
    if path != PATH:
        raise HttpError(404, f"DNS queries are served at {PATH}")
    if method == "GET":
        values = parse_qs(params, keep_blank_values=True).get("dns", [])
        if len(values) != 1:
            raise HttpError(400, "GET needs exactly one dns= parameter")
        encoded = values[0].encode("ascii", "replace")
        if not encoded or not _B64URL.issuperset(encoded):
            raise HttpError(400, "dns= must be base64url without padding")
        if len(encoded) * 3 // 4 > MAX_MESSAGE:
            raise HttpError(413, "a DNS message has at most 65535 octets")
        try:
            data = urlsafe_b64decode(encoded + b"=" * (-len(encoded) % 4))
        except (binascii.Error, ValueError):
            raise HttpError(400, "dns= must be base64url without padding") from None
    elif method == "POST":
        kind = (content_type or "").split(";")[0].strip().lower()
        if kind != CONTENT_TYPE:
            raise HttpError(415, f"POST needs Content-Type: {CONTENT_TYPE}")
        if len(body) > MAX_MESSAGE:
            raise HttpError(413, "a DNS message has at most 65535 octets")
        data = body
    else:
        raise HttpError(405, "only GET and POST")
    if len(data) < 12:
        raise HttpError(400, "not a DNS message")
    return data


def response_headers(status: int, body: bytes) -> list[tuple[str, str]]:
    """Headers of an answer (200) or an error."""
    if status == 200:
        kind = CONTENT_TYPE
        cache = "max-age=0"  # answers may change with the next list version
    else:
        kind = "text/plain; charset=utf-8"
        cache = "no-store"
    headers = [("content-type", kind), ("content-length", str(len(body))),
               ("cache-control", cache)]
    if status == 405:
        headers.append(("allow", "GET, POST"))
    return headers


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
