"""The stop page server: where DNS `stoppage` answers send browsers.

Every request gets a 451 (`netfilter.web.stoppage`), served by the node's web stack
(`netfilter.web`: uvicorn's protocol behind the guard that admits connections, bounds
and strictly reads each request head, answers 400/408/431/505 itself and lingers
before closing). Connections are admitted by `netfilter.slots` (per-client caps, the
oldest idle connection evicted when full, short head deadlines when busy): a slowloris
from a few addresses cannot keep other clients from their answer. Public pages (the
transparency page) may share the listener: `routes`.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable, Sequence

from starlette.routing import BaseRoute

from netfilter.config import StoppageSettings, parse_hostport
from netfilter.engine import Engine
from netfilter.latency import LatencyHistogram
from netfilter.slots import Slots
from netfilter.stoppage.render import Renderer, blocked_by_url
from netfilter.web.app import build_app
from netfilter.web.head import MAX_HEAD, Request, split_host
from netfilter.web.server import Limits, Listener, WebServer
from netfilter.web.stoppage import StopPageRoute

__all__ = ["MAX_HEAD", "StopPageServer", "split_host"]


def _no_body(_request: Request) -> bool:
    return False


class StopPageServer:
    """Serves the stop page (and `routes` before it) on `settings.listen` until stopped."""

    def __init__(self, engine: Engine, settings: StoppageSettings, *,
                 renderer: Renderer | None = None, read_timeout: float | None = None,
                 max_clients: int | None = None, sock: socket.socket | None = None,
                 routes: Sequence[BaseRoute] = (),
                 keeps_body: Callable[[Request], bool] | None = None) -> None:
        """`renderer` defaults to one built from `settings` (a relative template
        directory taken against the config file's directory); `read_timeout` and
        `max_clients` override the settings' `header_timeout` and `max_clients`;
        `sock`: a TCP socket already bound to `settings.listen` (`netfilter serve` binds
        every part's before it starts any), served from `start` on and closed at `stop`;
        without it, `start` binds one. `routes` come before the stop page (the public
        pages; a dashboard's under /admin/), and `keeps_body` says which of their
        requests get their bodies (forms); the stop page never reads one."""
        self.engine = engine
        self.settings = settings
        self._sock = sock
        self.stats: Counter[str] = Counter()
        self.latency = LatencyHistogram()  # a request read to its page rendered
        self.limits = Limits(max_clients or settings.max_clients,
                             settings.max_clients_per_address,
                             read_timeout or settings.header_timeout,
                             settings.busy_header_timeout, answer_silent=True)
        renderer = renderer or Renderer(settings, base=engine.settings.base,
                                        blocked_by=blocked_by_url(engine.settings))
        self.route = StopPageRoute(engine, renderer, self.stats, self.latency)
        self.app = build_app(routes, fallback=self.route)
        self.address: tuple[str, int] | None = None
        self._keeps_body = keeps_body
        self._web: WebServer | None = None

    @property
    def renderer(self) -> Renderer:
        return self.route.renderer

    @renderer.setter
    def renderer(self, renderer: Renderer) -> None:
        self.route.renderer = renderer  # a reload: the next request renders with it

    @property
    def slots(self) -> Slots:
        """The connections admitted now (len), for tests and metrics."""
        assert self._web is not None, "stop page server not started"
        return self._web.slots[0]

    @property
    def port(self) -> int:
        """The bound port (the one the system chose, for `listen: ...:0`)."""
        if self.address is None:
            raise RuntimeError("stop page server not started")
        return self.address[1]

    async def start(self) -> None:
        host, port = parse_hostport(self.settings.listen, any_port=True)
        sock, self._sock = self._sock, None
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=128)
        self._web = WebServer([Listener("stoppage", sock, self.app, self.limits,
                                        keeps_body=self._keeps_body or _no_body,
                                        stats=self.stats)])
        await self._web.start()
        self.address = (host, int(sock.getsockname()[1]))

    async def stop(self) -> None:
        if self._sock is not None:  # not served yet, when start failed
            self._sock.close()
        if self._web is not None:
            await self._web.stop()
