"""One HTTP/1.x request head, read strictly: what every listener of the node's web stack
checks before the stack (uvicorn) sees a byte of it.

A pure function on bytes (`parse_head`), so the guard can run it on a whole buffered
head: request line and header fields only, at most `MAX_HEAD` bytes, no obsolete line
folding, no control characters; anything else is `Refused` with the status to answer
(400, 431, 505). `canonical` writes the head back in the one form the stack then parses
(CRLF, origin-form target, the Host a target's authority names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["MAX_FIELDS", "MAX_HEAD", "Refused", "Request", "canonical", "check_first_line",
           "head_end",
           "parse_head", "request_host", "split_host"]

MAX_HEAD = 8192  # request line and header fields together, bytes
MAX_FIELDS = 100

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r?\n")
_OTHER_VERSION = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/[0-9]+\.[0-9]+\r?\n")
_FIELD_NAME = re.compile(_TOKEN)
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_PORT = re.compile(r"[0-9]{0,5}")
_HEAD_END = re.compile(rb"\r?\n\r?\n")


class Refused(Exception):
    """The request cannot be read; answer with this status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: tuple[int, int]
    fields: list[tuple[str, str]]  # lowercased names, values as received (decoded)
    raw: list[tuple[bytes, bytes]]  # the same fields as bytes

    def get(self, name: str) -> list[str]:
        return [v for n, v in self.fields if n == name]

    def first(self, name: str) -> str | None:
        values = self.get(name)
        return ", ".join(values) if values else None


def decode(value: bytes) -> str:
    """A field value: UTF-8 where it is (some clients send raw UTF-8 names), else
    ISO-8859-1 as HTTP/1.1 historically reads it."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def head_end(data: bytes, seen: int = 0) -> int:
    """Where the head in `data` ends (after its blank line), or -1 while it is not
    whole; -2 for more blank lines before it than a client sends (RFC 9112 2.2 allows
    some). `seen`: bytes already looked at in an earlier call (not scanned again)."""
    start = len(data) - len(data.lstrip(b"\r\n"))
    if start > 8:
        return -2
    match = _HEAD_END.search(data, max(start, seen - 3))
    return -1 if match is None else match.end()


def check_first_line(data: bytes) -> None:
    """Refused at once when the request line, whole but not the head yet, is garbage
    (a TLS hello, a binary probe): no need to wait for the rest."""
    newline = data.find(b"\n")
    if newline >= 0:
        first = data[:newline + 1]
        if (_REQUEST_LINE.fullmatch(first) is None
                and _OTHER_VERSION.fullmatch(first) is None):
            raise Refused(400, "malformed request line")


def parse_head(data: bytes) -> Request:
    """The request line and header fields of a whole head (see `head_end`)."""
    if len(data) > MAX_HEAD:
        raise Refused(431, "request head too large")
    lines = data.lstrip(b"\r\n").split(b"\n")
    first = lines[0] + b"\n"
    match = _REQUEST_LINE.fullmatch(first)
    if match is None:
        if _OTHER_VERSION.fullmatch(first) is not None:
            raise Refused(505, "HTTP version not supported")
        raise Refused(400, "malformed request line")
    method, target, major, minor = match.groups()
    if major != b"1":
        raise Refused(505, "HTTP version not supported")
    fields: list[tuple[str, str]] = []
    raw: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        line = line.removesuffix(b"\r")
        if not line:
            break
        if len(fields) >= MAX_FIELDS:
            raise Refused(431, "too many header fields")
        if line[:1] in (b" ", b"\t"):
            raise Refused(400, "obsolete line folding")
        name, colon, value = line.partition(b":")
        if not colon or _FIELD_NAME.fullmatch(name) is None:
            raise Refused(400, "malformed header field")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise Refused(400, "control character in a header field")
        fields.append((name.decode("ascii").lower(), decode(value)))
        raw.append((name.lower(), value))
    return Request(method.decode("ascii"), target.decode("ascii"),
                   (int(major), int(minor)), fields, raw)


def split_host(value: str) -> str:
    """A Host field without its port: `a.example:8081` -> `a.example`, `[::1]:80` ->
    `[::1]`; anything else is returned as it is (the engine judges it)."""
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end > 0 and (end + 1 == len(text) or
                        (text[end + 1] == ":" and _PORT.fullmatch(text[end + 2:]))):
            return text[:end + 1]
        return text
    host, colon, port = text.rpartition(":")
    if colon and ":" not in host and _PORT.fullmatch(port):
        return host
    return text


def _authority(target: str) -> str | None:
    if "://" in target and not target.startswith("/"):
        try:
            return urlsplit(target).netloc.rpartition("@")[2] or None
        except ValueError as e:
            raise Refused(400, "malformed request target") from e
    return None


def request_host(request: Request) -> str | None:
    """The name asked for: an absolute-form target's authority (RFC 9112 3.2.2) or the
    Host field; Refused when HTTP/1.1 requires a Host and it is missing or repeated
    (RFC 9112 3.2)."""
    hosts = request.get("host")
    if len(hosts) > 1:
        raise Refused(400, "more than one Host field")
    authority = _authority(request.target)
    if authority:
        return split_host(authority)
    if not hosts:
        if request.version >= (1, 1):
            raise Refused(400, "HTTP/1.1 request without a Host field")
        return None
    return split_host(hosts[0]) or None


def canonical(request: Request) -> bytes:
    """The head as the stack gets it: CRLF line ends, an origin-form target, and the
    Host an absolute-form target names in place of the Host field."""
    target = request.target
    authority = _authority(target)
    if authority is not None:
        parts = urlsplit(target)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    elif not target.startswith("/"):
        target = "/"  # `*` or an authority-form target: the stack sees the root
    lines = [f"{request.method} {target} HTTP/{request.version[0]}.{request.version[1]}"
             .encode("ascii")]
    if authority is not None:
        lines.append(b"host: " + authority.encode("ascii", "replace"))
    lines += [name + b": " + value for name, value in request.raw
              if not (authority is not None and name == b"host")]
    return b"\r\n".join([*lines, b"", b""])
