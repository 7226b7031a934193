"""ICAP (RFC 3507) message heads and the HTTP request inside them: pure parsing and
formatting on bytes. Strict: anything malformed is an IcapError with the status to
answer (400, 404, 405, 505), never a traceback.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import formatdate

__all__ = [
    "Encapsulated",
    "HttpHead",
    "IcapError",
    "IcapRequest",
    "format_head",
    "parse_encapsulated",
    "parse_http_request",
    "parse_icap_head",
]

MAX_FIELDS = 100  # header fields in one head
ICAP_REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request",
    404: "ICAP Service Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    500: "Server Error",
    503: "Service Overloaded", 505: "ICAP Version Not Supported",
}
_TOKEN_TEXT = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+").fullmatch
_SECTION = re.compile(r"\s*(req-hdr|res-hdr|req-body|res-body|null-body|opt-body)=([0-9]{1,9})\s*")


class IcapError(Exception):
    """A request the server answers with `status` (and then closes the connection)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_WHITESPACE = " \t\r\n\x0b\x0c"  # what bytes.strip strips (str.strip strips more)


def _fields(text: str, what: str) -> dict[str, list[str]]:
    """Header fields from the lines of a head after its first, decoded as latin-1
    (names must be tokens, so ASCII)."""
    if not text:
        return {}
    lines = text.split("\r\n")
    if len(lines) > MAX_FIELDS:
        raise IcapError(400, f"more than {MAX_FIELDS} {what} header fields")
    out: dict[str, list[str]] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN_TEXT(name):
            raise IcapError(400, f"malformed {what} header field")
        key = name.lower()
        values = out.get(key)
        if values is None:
            out[key] = [value.strip(_WHITESPACE)]
        else:
            values.append(value.strip(_WHITESPACE))
    return out


@dataclass(frozen=True)
class IcapRequest:
    """An ICAP request line and its header fields (names lowercase)."""

    method: str
    service: str  # the URI's path, e.g. /reqmod
    fields: dict[str, list[str]] = field(default_factory=dict)

    def field(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None


def parse_icap_head(head: bytes) -> IcapRequest:
    """`METHOD icap://host[:port]/service ICAP/1.0` and fields (head without the blank
    line that ends it)."""
    first, _, rest_of_head = head.decode("latin-1").partition("\r\n")
    parts = first.split(" ")
    if len(parts) != 3 or not _TOKEN_TEXT(parts[0]):
        raise IcapError(400, "malformed ICAP request line")
    method, uri, version = parts
    if version != "ICAP/1.0":
        raise IcapError(505, "only ICAP/1.0 is spoken")
    if uri[:7].lower() != "icap://":
        raise IcapError(400, "the request URI is not icap://")
    rest = uri[7:]
    slash = rest.find("/")
    service = "/" if slash < 0 else rest[slash:].partition("?")[0]
    return IcapRequest(method, service, _fields(rest_of_head, "ICAP"))


@dataclass(frozen=True)
class Encapsulated:
    """Offsets of the encapsulated sections; `body` is the body section's name."""

    req_hdr: int | None
    body: str  # req-body, null-body (or res-*, opt-body: refused for REQMOD)
    body_offset: int


_encapsulated: dict[str, Encapsulated] = {}  # a client sends few distinct values
_ENCAPSULATED_CACHE = 1024  # values (of 64 characters at most) kept parsed


def parse_encapsulated(value: str | None) -> Encapsulated:
    """The Encapsulated field of a REQMOD request (RFC 3507 4.4.1)."""
    if value is None:
        raise IcapError(400, "no Encapsulated header field")
    known = _encapsulated.get(value)
    if known is None:
        known = _parse_encapsulated(value)
        if len(value) <= 64:
            if len(_encapsulated) >= _ENCAPSULATED_CACHE:
                _encapsulated.clear()
            _encapsulated[value] = known
    return known


def _parse_encapsulated(value: str) -> Encapsulated:
    sections: list[tuple[str, int]] = []
    for item in value.split(","):
        m = _SECTION.fullmatch(item)
        if m is None:
            raise IcapError(400, "malformed Encapsulated header field")
        sections.append((m[1], int(m[2])))
    offsets = [o for _, o in sections]
    if offsets != sorted(offsets) or not sections:
        raise IcapError(400, "Encapsulated offsets out of order")
    names = [n for n, _ in sections]
    body, body_offset = sections[-1]
    if body not in ("req-body", "null-body") or names[:-1] not in ([], ["req-hdr"]):
        raise IcapError(400, "REQMOD carries req-hdr and req-body or null-body only")
    req_hdr = sections[0][1] if names[0] == "req-hdr" else None
    if req_hdr is not None and req_hdr != 0:
        raise IcapError(400, "req-hdr must come first")
    return Encapsulated(req_hdr, body, body_offset)


@dataclass(frozen=True)
class HttpHead:
    """The encapsulated HTTP request: its line and fields (names lowercase)."""

    method: str
    target: str
    fields: dict[str, list[str]]

    def field(self, name: str) -> str | None:
        values = self.fields.get(name)
        return ", ".join(values) if values else None


def parse_http_request(head: bytes) -> HttpHead:
    """`METHOD target HTTP/1.x` and fields (without the blank line)."""
    first, _, rest = head.decode("latin-1").partition("\r\n")
    parts = first.split(" ")
    if len(parts) != 3 or not _TOKEN_TEXT(parts[0]) or not parts[2].startswith("HTTP/"):
        raise IcapError(400, "malformed encapsulated HTTP request line")
    if not parts[1].isascii():
        raise IcapError(400, "a non-ASCII HTTP request target")
    return HttpHead(parts[0], parts[1], _fields(rest, "HTTP"))


_date: tuple[int, str] = (0, "")


def _now() -> str:
    """The Date field's value, formatted once a second."""
    global _date
    second = int(time.time())
    if _date[0] != second:
        _date = (second, formatdate(second, usegmt=True))
    return _date[1]


def format_head(status: int, fields: Iterable[tuple[str, str]]) -> bytes:
    """An ICAP response head, blank line included."""
    lines = [f"ICAP/1.0 {status} {ICAP_REASONS.get(status, 'Error')}",
             f"Date: {_now()}", "Service: netfilter"]
    lines.extend(f"{name}: {value}" for name, value in fields)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
