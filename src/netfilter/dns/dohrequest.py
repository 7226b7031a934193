"""What a DNS-over-HTTPS request means (RFC 8484), for either HTTP version: the one
path, GET with the query in `?dns=` (base64url, no padding) or POST with an
`application/dns-message` body, and a plain HTTP error for anything else: 404 (another
path), 405 (another method), 415 (another content type), 413 (a message over 65535
octets), 400 (anything else malformed). `DohAnswerer` is what the HTTP/1.1 and HTTP/2
sessions (`doh_h1`, `doh_h2`) need of the listener (`doh.DohListener`), so they stand
below it.
"""

from __future__ import annotations

import binascii
from base64 import urlsafe_b64decode
from collections import Counter
from collections.abc import Callable
from typing import Protocol
from urllib.parse import parse_qs

from netfilter.config import DnsSettings
from netfilter.dns.streamslots import Held

__all__ = ["CONTENT_TYPE", "MAX_HEADERS", "MAX_MESSAGE", "MAX_TARGET", "PATH", "Deliver",
           "DohAnswerer", "HttpError", "query_of", "response_headers"]

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


class DohAnswerer(Protocol):
    """The listener as an HTTP session sees it."""

    settings: DnsSettings
    stats: Counter[str]

    def answer(self, method: str, target: str, content_type: str | None, body: bytes,
               held: Held, deliver: Deliver) -> None:
        """Answer one request through `deliver` (once)."""
