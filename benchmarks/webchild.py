"""A child of test_web_perf.py: the stop page over the demo list, served by KIND on PORT
until SIGTERM, on uvloop. Prints "ready" once it listens.

    python benchmarks/webchild.py KIND PORT CONFIG

KIND: `old` (the hand-written server of before, old_stoppage.py: the baseline), `web`
(netfilter's StopPageServer on the web stack: the guard, then uvicorn + Starlette),
`starlette` (uvicorn + Starlette with no guard), `aiohttp` (aiohttp's server, no guard).
All four render the same page with the same engine and Renderer; every answer closes its
connection, as the stop page's do.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import uvloop

from netfilter.config import load_config
from netfilter.engine import Action, Engine, Verdict
from netfilter.stoppage import Renderer, StopPage
from netfilter.web.head import split_host

sys.path.insert(0, str(Path(__file__).parent))
from old_stoppage import StopPageServer as OldServer


def main() -> None:
    kind, port, config = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    settings = load_config(config)
    assert settings.stoppage is not None
    engine = Engine(settings)
    renderer = Renderer(settings.stoppage)
    sock = socket.create_server(("127.0.0.1", port), backlog=1024)

    def page(host: str | None, method: str, headers: Any, client: str | None) -> StopPage:
        """As the stop page does: the engine records the block with the client."""
        name = split_host(host) if host else None
        verdict = (engine.check_host(name, frontend="stoppage", client=client, detail=method)
                   if name else Verdict(Action.ALLOW))
        return renderer.render(verdict, host=name, accept=headers.get("accept"),
                               accept_language=headers.get("accept-language"),
                               sec_fetch_dest=headers.get("sec-fetch-dest"))

    if kind in ("old", "web"):
        async def serve() -> None:
            from netfilter.stoppage.server import StopPageServer

            assert settings.stoppage is not None
            server = (OldServer if kind == "old" else StopPageServer)(
                engine, settings.stoppage, renderer=renderer, sock=sock)
            await server.start()
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            print("ready", flush=True)
            await stop.wait()
            await server.stop()

        uvloop.run(serve())
    elif kind == "starlette":
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response

        async def stop_page(scope: Any, receive: Any, send: Any) -> None:
            request = Request(scope, receive)
            answer = page(request.headers.get("host"), request.method, request.headers,
                          request.client.host if request.client else None)
            response = Response(answer.body, status_code=answer.status,
                                headers={**dict(answer.headers), "Connection": "close"})
            await response(scope, receive, send)

        app = Starlette()
        app.router.default = stop_page
        config_ = uvicorn.Config(app, http="httptools", loop="uvloop", lifespan="off",
                                 access_log=False, log_level="warning", proxy_headers=False)
        print("ready", flush=True)
        uvicorn.Server(config_).run(sockets=[sock])
    elif kind == "aiohttp":
        from aiohttp import web

        async def handler(request: web.Request) -> web.Response:
            answer = page(request.headers.get("host"), request.method, request.headers,
                          request.remote)
            response = web.Response(body=answer.body, status=answer.status,
                                    headers=dict(answer.headers))
            response.force_close()
            return response

        aio = web.Application()
        aio.router.add_route("*", "/{path:.*}", handler)
        uvloop.install()
        print("ready", flush=True)
        web.run_app(aio, sock=sock, print=None, access_log=None)
    else:
        raise SystemExit(f"unknown kind {kind}")


if __name__ == "__main__":
    main()
