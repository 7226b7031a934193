"""The answer to a blocked HTTP request: the 451 stop page, shaped for the request.

One choice for every HTTP front-end: a CONNECT or WebSocket upgrade gets the short
text (neither can show a page); HEAD gets the headers only (its Content-Length that of
the page it would have had); everything else the page the renderer negotiates from
Accept, Accept-Language and Sec-Fetch-Dest. The front-end puts the result into its
own protocol (a mitmproxy Response, an ICAP-encapsulated HTTP response).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from netfilter.engine import Verdict
from netfilter.stoppage import Renderer

__all__ = ["REASONS", "Reply", "refusal_text", "stop_reply"]

MAX_SHOWN = 253

REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    421: "Misdirected Request",
    451: "Unavailable For Legal Reasons",
    503: "Service Unavailable",
}

Header = Callable[[str], str | None]  # a request header's value by lowercase name


class Reply(NamedTuple):
    """A stop page to send. `headers` has no Date, Content-Length or Connection: the
    sender adds those, with `length` as the Content-Length (HEAD: the page's, for an
    empty body)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    length: int


def _is_websocket(header: Header) -> bool:
    return (header("upgrade") or "").strip().lower() == "websocket"


def stop_reply(renderer: Renderer, verdict: Verdict, *, method: str, header: Header,
               host: str | None) -> Reply:
    """The 451 answer for a request, with the renderer's headers."""
    accept = header("accept")
    dest = header("sec-fetch-dest")
    if method == "CONNECT" or _is_websocket(header):
        accept, dest = "text/plain", None
    page = renderer.render(verdict, host=host, accept=accept,
                           accept_language=header("accept-language"), sec_fetch_dest=dest)
    body = b"" if method == "HEAD" else page.body
    return Reply(page.status, page.headers, body, len(page.body))


def refusal_text(text: str) -> bytes:
    """A proxy's own short text/plain refusal body: printable ASCII, cut to a name's
    length (a host name from the request may be in it)."""
    shown = "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_SHOWN])
    return f"{shown}\n".encode("ascii")
