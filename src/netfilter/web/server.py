"""The node's web stack: ASGI apps (Starlette) served by uvicorn's httptools protocol on
sockets bound before anything starts, each connection behind a `guard.Guard`.

uvicorn's `Server.serve` is not used: it would bind, install signal handlers and own the
loop's lifetime, all of which belong to `netfilter serve`. Its protocol class is made
per connection by the guard instead, on the loop that is running (uvloop under serve).
One `WebServer` serves any number of listeners, each with its own app, limits and
counters; nothing is logged per request (no client addresses, no names). A command that
serves nothing else (`netfilter audit tiles --listen`) runs one on a loop of its own
(`Standalone`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from netfilter.slots import Slots
from netfilter.web.guard import MAX_BODY, Guard
from netfilter.web.head import Request

__all__ = ["SMALL", "Limits", "Listener", "Standalone", "WebServer", "bind_tcp"]

log = logging.getLogger(__name__)

KEEP_ALIVE = 5.0  # seconds a kept-alive connection may wait for its next request


@dataclass(frozen=True)
class Limits:
    """Against slow and greedy clients (see netfilter.slots)."""

    max_clients: int = 512
    max_clients_per_address: int = 32
    header_timeout: float = 10.0
    busy_header_timeout: float = 2.0
    max_body: int = MAX_BODY
    answer_silent: bool = False  # a 408 also to a connection that sent nothing in time
    max_requests: int = 0  # per connection, the last answered with Connection: close; 0: any
    # seconds a client may leave an answer unread (our send buffer full) before its
    # connection is dropped: a reader that stops would otherwise hold its slot for ever
    answer_timeout: float = 30.0


# the node's small read-only listeners (metrics, audit tiles): fewer clients than the
# stop page, at most 100 requests per connection
SMALL = Limits(max_clients=256, max_clients_per_address=16, max_requests=100)


def _no_body(_request: Request) -> bool:
    return False


@dataclass
class Listener:
    """One socket and what it serves."""

    name: str  # in the one log line at start
    sock: socket.socket
    app: object  # an ASGI application
    limits: Limits = field(default_factory=Limits)
    keeps_body: Callable[[Request], bool] = _no_body
    stats: Counter[str] = field(default_factory=Counter)


class WebServer:
    """Serves its listeners from `start` to `stop` on the running loop."""

    def __init__(self, listeners: list[Listener]) -> None:
        self.listeners = listeners
        self._servers: list[asyncio.base_events.Server] = []
        self._guards: set[Guard] = set()
        self._states: list[ServerState] = []
        self.slots: list[Slots] = []  # per listener, once started
        self._clock: asyncio.TimerHandle | None = None

    def _tick(self) -> None:
        """The Date field of every answer, once a second (uvicorn's Server did it)."""
        date = [(b"date", formatdate(usegmt=True).encode("ascii"))]
        for state in self._states:
            state.default_headers = date
        loop = asyncio.get_running_loop()
        self._clock = loop.call_at(math.floor(loop.time()) + 1.0, self._tick)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            config = Config(listener.app, http="httptools", lifespan="off",  # type: ignore[arg-type]
                            proxy_headers=False, server_header=False, access_log=False,
                            timeout_keep_alive=int(KEEP_ALIVE), log_config=None,
                            h11_max_incomplete_event_size=None)
            config.load()
            # uvicorn's access log would name every client: off, whatever logging is set
            access = logging.getLogger("uvicorn.access")
            access.handlers, access.propagate, access.disabled = [], False, True
            state = ServerState()
            self._states.append(state)
            limits = listener.limits
            slots = Slots(limits.max_clients, limits.max_clients_per_address,
                          limits.header_timeout, limits.busy_header_timeout, listener.stats)
            self.slots.append(slots)

            def inner(config: Config = config, state: ServerState = state) -> asyncio.Protocol:
                return HttpToolsProtocol(config=config, server_state=state, app_state={},
                                         _loop=loop)

            def factory(listener: Listener = listener, slots: Slots = slots,
                        inner: Callable[[], asyncio.Protocol] = inner) -> Guard:
                return Guard(inner, slots, listener.stats, keeps_body=listener.keeps_body,
                             registry=self._guards, max_body=listener.limits.max_body,
                             answer_silent=listener.limits.answer_silent,
                             max_requests=listener.limits.max_requests,
                             answer_timeout=listener.limits.answer_timeout)

            if self._clock is None:
                self._tick()
            server = await loop.create_server(factory, sock=listener.sock)
            self._servers.append(server)
            host, port = listener.sock.getsockname()[:2]
            log.info("%s: serving on %s port %d", listener.name, host, port)

    async def stop(self) -> None:
        """Stop listening, end every connection, wait (bounded) for answers in flight."""
        if self._clock is not None:
            self._clock.cancel()
        for server in self._servers:
            server.close()
        for listener in self.listeners[len(self._servers):]:
            listener.sock.close()  # never served: start failed before it
        for guard in list(self._guards):
            guard.shutdown()
        tasks = [task for state in self._states for task in state.tasks]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers = []


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when `host` has a colon); OSError when
    the address cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


class Standalone:
    """A `WebServer` on a loop of its own, for what serves nothing else: `serve_forever`
    in the calling thread (the main one, or one of its own) until `shutdown` from
    another thread or Ctrl-C; `server_close` closes the sockets. `server_address` is
    the first listener's."""

    def __init__(self, listeners: list[Listener]) -> None:
        self.listeners = listeners
        self.web = WebServer(listeners)
        self.server_address: tuple[str, int] = listeners[0].sock.getsockname()[:2]
        self._lock = threading.Lock()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._done = threading.Event()

    @property
    def slots(self) -> Slots:
        """The first listener's connections (once serving)."""
        return self.web.slots[0]

    @property
    def stats(self) -> Counter[str]:
        return self.listeners[0].stats

    def serve_forever(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self._done.set()

    async def _main(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            stop = self._stop
        try:
            await self.web.start()
            await stop.wait()
        finally:
            await self.web.stop()

    def shutdown(self) -> None:
        """Stop `serve_forever` and wait (bounded) until it has returned."""
        with self._lock:
            self._closing = True
            loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(stop.set)
            self._done.wait(5.0)

    def server_close(self) -> None:
        for listener in self.listeners:
            listener.sock.close()
