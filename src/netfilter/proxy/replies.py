"""The proxy's own answers: the stop page (451) and short refusals (403, 421, 503).

Nothing here decides; the addon picks the answer, these only shape it. Refusal texts
are plain text with `nosniff`; a host name from the request is cut to a name's length
and stripped of anything but printable ASCII before it is shown.
"""

from __future__ import annotations

from mitmproxy import http

from netfilter.engine import Verdict
from netfilter.http.reply import REASONS, stop_reply
from netfilter.stoppage import Renderer

__all__ = ["MAX_SHOWN", "refusal", "stop_page"]

MAX_SHOWN = 253


def _shown(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_SHOWN])


def stop_page(renderer: Renderer, verdict: Verdict, request: http.Request,
              host: str | None) -> http.Response:
    """The 451 answer for `request` (netfilter.http.reply decides its shape)."""
    page = stop_reply(renderer, verdict, method=request.method,
                      header=request.headers.get, host=host)
    headers = [(name.encode("latin-1"), value.encode("latin-1"))
               for name, value in page.headers]
    response = http.Response.make(page.status, page.body, headers)
    if request.method == "HEAD":  # make() set the empty body's length
        response.headers["content-length"] = str(page.length)
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
