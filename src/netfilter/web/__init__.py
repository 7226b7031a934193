"""The node's web stack: Starlette routes on uvicorn's httptools protocol, every
connection behind a guard (admission per client, strict bounded heads, deadlines).

    server = WebServer([Listener("stoppage", sock, app, limits)])
    await server.start(); ...; await server.stop()

Serves the stop page (`stoppage`), the public transparency page (`transparency`), the
audit tiles (`tiles`), and metrics and health (`metrics`); a dashboard adds its routes
under /admin/ (`app`).
"""

from netfilter.web.server import Limits, Listener, WebServer

__all__ = ["Limits", "Listener", "WebServer"]
