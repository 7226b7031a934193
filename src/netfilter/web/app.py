"""The ASGI apps of the node's listeners, as lists of routes (Starlette).

The stop page's listener: the public pages (the transparency page and its JSON twin;
a dashboard can add its routes under /admin/ here) before the stop page, which answers
every other path. A separate `web.listen` gets the public pages alone; the audit tiles'
listener, the tiles. Exceptions become a plain 500 (Starlette's), never a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["build_app", "not_found"]


async def not_found(_request: Request) -> Response:
    return PlainTextResponse("404 Not Found\n", status_code=404,
                             headers={"X-Content-Type-Options": "nosniff"})


def build_app(routes: Sequence[BaseRoute], *, fallback: ASGIApp | None = None) -> Starlette:
    """An app of `routes`, then `fallback` (an ASGI app: every method) for every other
    path; without one, 404."""
    app = Starlette(routes=list(routes))
    app.router.redirect_slashes = False
    if fallback is not None:
        app.router.default = fallback
    else:
        async def missing(scope: Scope, receive: Receive, send: Send) -> None:
            await (await not_found(Request(scope, receive)))(scope, receive, send)

        app.router.default = missing
    return app
