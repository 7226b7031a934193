"""The stop page as a route of the web stack: every request it gets is answered 451.

The blocked name arrives as the Host header (the guard has already put an absolute-form
target's authority there); the engine is asked about it (`frontend="stoppage"`) and its
verdict rendered; a name that is not blocked gets the generic page, which names no list.
One request per connection (`Connection: close`), as before the web stack: browsers
sent here by a DNS answer load one page.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from netfilter.canonical import InvalidURL
from netfilter.engine import Action, Engine, Verdict
from netfilter.latency import LatencyHistogram
from netfilter.stoppage.render import Renderer
from netfilter.web.guard import STATUS_TEXT
from netfilter.web.head import decode, split_host

__all__ = ["MAX_HOST", "StopPageRoute"]

MAX_HOST = 255  # longer is no DNS name: not looked up
_UNSAFE = str.maketrans("", "", "\r\n\0")  # never in a header field value


def _refusal(status: int) -> Response:
    return Response(f"{status} {STATUS_TEXT[status]}\n", status_code=status,
                    media_type="text/plain; charset=utf-8",
                    headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                             "Connection": "close"})


class StopPageRoute:
    """The endpoint; `renderer` may be replaced on a reload (read per request)."""

    def __init__(self, engine: Engine, renderer: Renderer, stats: Counter[str],
                 latency: LatencyHistogram) -> None:
        self.engine = engine
        self.renderer = renderer
        self.stats = stats
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """As an ASGI app: every method, every path."""
        if scope["type"] != "http":
            return
        await self.answer(Request(scope, receive))(scope, receive, send)

    def answer(self, request: Request) -> Response:
        started = time.monotonic()
        raw = request.scope["headers"]
        hosts = [decode(v) for n, v in raw if n == b"host"]
        if len(hosts) > 1 or (not hosts and request.scope["http_version"] != "1.0"):
            self.stats["status_400"] += 1
            return _refusal(400)
        host = (split_host(hosts[0]) or None) if hosts else None

        def field(name: bytes) -> str | None:
            values = [decode(v) for n, v in raw if n == name]
            return ", ".join(values) if values else None

        verdict = Verdict(Action.ALLOW)
        client = request.client.host if request.client else None
        if host and len(host) <= MAX_HOST:
            with contextlib.suppress(InvalidURL):  # no host name at all: the generic page
                verdict = self.engine.check_host(host, frontend="stoppage", client=client,
                                                 detail=request.method[:16])
        self.stats["blocked" if verdict.blocked else "generic"] += 1
        page = self.renderer.render(verdict, host=host, accept=field(b"accept"),
                                    accept_language=field(b"accept-language"),
                                    sec_fetch_dest=field(b"sec-fetch-dest"))
        response = Response(page.body, status_code=page.status)
        response.raw_headers += [(n.lower().encode("latin-1"),
                                  v.translate(_UNSAFE).encode("latin-1", "replace"))
                                 for n, v in [*page.headers, ("Connection", "close")]]
        self.latency.observe(time.monotonic() - started)
        return response
