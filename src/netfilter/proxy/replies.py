"""The proxy's own answers: the stop page (451) and short refusals (403, 421, 503).

Nothing here decides; the addon picks the answer, these only shape it. Refusal texts
are plain text with `nosniff`; a host name from the request is cut to a name's length
and stripped of anything but printable ASCII before it is shown.
"""

from __future__ import annotations

from mitmproxy import http

from netfilter.engine import Verdict
from netfilter.stoppage import Renderer

__all__ = ["MAX_SHOWN", "refusal", "stop_page"]

MAX_SHOWN = 253

REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    421: "Misdirected Request",
    451: "Unavailable For Legal Reasons",
    503: "Service Unavailable",
}


def _shown(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_SHOWN])


def _is_websocket(request: http.Request) -> bool:
    return str(request.headers.get("upgrade", "")).strip().lower() == "websocket"


def stop_page(renderer: Renderer, verdict: Verdict, request: http.Request,
              host: str | None) -> http.Response:
    """The 451 answer for `request`, with the renderer's headers.

    A WebSocket upgrade and a CONNECT get the short text: neither can show a page.
    HEAD gets the headers only.
    """
    accept = request.headers.get("accept")
    dest = request.headers.get("sec-fetch-dest")
    if request.method == "CONNECT" or _is_websocket(request):
        accept, dest = "text/plain", None
    page = renderer.render(verdict, host=host, accept=accept,
                           accept_language=request.headers.get("accept-language"),
                           sec_fetch_dest=dest)
    headers = [(name.encode("latin-1"), value.encode("latin-1"))
               for name, value in page.headers]
    body = b"" if request.method == "HEAD" else page.body
    response = http.Response.make(page.status, body, headers)
    if request.method == "HEAD":
        response.headers["content-length"] = str(len(page.body))
    response.reason = REASONS.get(page.status, response.reason)
    return response


def refusal(status: int, text: str) -> http.Response:
    """A short text/plain answer the proxy gives by itself (never cached)."""
    body = f"{_shown(text)}\n".encode("ascii")
    response = http.Response.make(status, body, [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Cache-Control", b"no-store"),
        (b"X-Content-Type-Options", b"nosniff"),
    ])
    response.reason = REASONS.get(status, response.reason)
    return response
