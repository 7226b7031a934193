"""The node's web stack: ASGI apps (Starlette) served by uvicorn's httptools protocol on
sockets bound before anything starts, each connection behind a `guard.Guard`.

uvicorn's `Server.serve` is not used: it would bind, install signal handlers and own the
loop's lifetime, all of which belong to `netfilter serve`. Its protocol class is made
per connection by the guard instead, on the loop that is running (uvloop under serve).
One `WebServer` serves any number of listeners, each with its own app, limits and
counters; nothing is logged per request (no client addresses, no names).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
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

__all__ = ["Limits", "Listener", "WebServer"]

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
                             answer_silent=listener.limits.answer_silent)

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
