"""A small read-only HTTP/1.1 server for what the node publishes (tiles, metrics).

One thread runs an asyncio loop for every connection, so an idle connection costs a
socket, never a thread; `netfilter.slots` caps connections in all and per client and
closes the oldest idle one for a new one when full. A connection is closed after
`timeout` seconds without a whole request and after `max_requests` requests. GET and
HEAD only; a request body is never read. Nothing is logged per request (no client
addresses). What a path holds is the subclass's (`resource`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections import Counter
from email.utils import formatdate
from urllib.parse import unquote, urlsplit

from netfilter.slots import Slots, protocol_factory

__all__ = ["ReadOnlyServer", "Resource"]

log = logging.getLogger(__name__)

TIMEOUT = 10.0  # seconds for a request head, also between kept-alive requests
BUSY_TIMEOUT = 2.0  # ... once more than half the connections are in use
WRITE_TIMEOUT = 30.0  # seconds for the client to take an answer
MAX_CONNECTIONS = 256
MAX_PER_CLIENT = 16
MAX_REQUESTS = 100  # per connection
MAX_HEAD = 8192
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}


Resource = tuple[bytes, list[tuple[str, str]]]  # a body and its header fields


class ReadOnlyServer:
    """Bound at construction (so a port in use fails at once, as OSError), or on `sock`,
    a TCP socket already bound and listening on host:port (`netfilter serve` binds every
    part's before it starts any); call `serve_forever` in a thread of its own,
    `shutdown` and `server_close` (which closes the socket) to end. Subclasses say what
    a path is (`resource`)."""

    name = "http"  # in the one log line of a bug

    def __init__(self, host: str, port: int, *,
                 timeout: float = TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                 max_per_client: int = MAX_PER_CLIENT,
                 max_requests: int = MAX_REQUESTS, sock: socket.socket | None = None) -> None:
        self.max_requests = max_requests
        self.stats: Counter[str] = Counter()
        self.slots = Slots(max_connections, max_per_client, timeout,
                           min(BUSY_TIMEOUT, timeout), self.stats)
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=128)
        self.socket = sock
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]
        self._lock = threading.Lock()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._done = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def serve_forever(self) -> None:
        """Serve until `shutdown` (or KeyboardInterrupt in the main thread)."""
        try:
            asyncio.run(self._main())
        finally:
            self._done.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` and wait (bounded) until it has returned."""
        with self._lock:
            self._closing = True
            loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop has already ended
                loop.call_soon_threadsafe(stop.set)
            self._done.wait(5.0)

    def server_close(self) -> None:
        self.socket.close()

    async def _main(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            stop = self._stop
        server = await self._loop.create_server(protocol_factory(self._client, MAX_HEAD),
                                                sock=self.socket)
        try:
            await stop.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=1.0)

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        slot = self.slots.admit(str(peer[0]) if isinstance(peer, tuple) else None,
                                reader, task.cancel)
        if slot is None:
            writer.close()
            return
        self._tasks.add(task)
        try:
            for count in range(self.max_requests):
                try:
                    async with self.slots.reading(slot, again=count > 0):
                        head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    writer.write(self._error(431))
                    break
                answer, keep = self._answer(head, last=count + 1 == self.max_requests)
                writer.write(answer)
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
                if not keep:
                    break
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
        except (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError,
                TimeoutError):
            pass  # evicted, stopped, gone, or too slow: just close
        except Exception:  # a bug must cost one connection, never the server
            self.stats["internal_errors"] += 1
            log.exception("%s: request failed", self.name)
        finally:
            self.slots.release(slot)
            self._tasks.discard(task)
            writer.close()

    def _answer(self, head: bytes, *, last: bool) -> tuple[bytes, bool]:
        """The response to one request head, and whether to keep the connection."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if line and not colon:
                return self._error(400), False
            fields[name.strip().lower()] = value.strip()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return self._error(400), False
        method, target, version = parts
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            return self._error(505), False
        keep = (version == "HTTP/1.1" and not last
                and "close" not in fields.get("connection", "").lower()
                and fields.get("content-length", "0") == "0"  # a body is never read
                and "transfer-encoding" not in fields)
        if method not in ("GET", "HEAD"):
            return self._error(405, keep, [("Allow", "GET, HEAD")]), keep
        head_only = method == "HEAD"
        found = self._lookup(target)
        if found is None:
            return self._error(404, keep, head_only=head_only), keep
        status, data, headers = found
        return self._response(status, data, headers, keep, head_only=head_only), keep

    def resource(self, path: str) -> Resource | None:
        """The body and header fields at `path` (percent-decoded, from "/"); None: 404."""
        raise NotImplementedError

    def resource_status(self, path: str) -> tuple[int, bytes, list[tuple[str, str]]] | None:
        """`resource` with its status (a key of REASONS): 200 unless a subclass says
        otherwise (a health check answers 503 when not ready)."""
        found = self.resource(path)
        return None if found is None else (200, *found)

    def _lookup(self, target: str) -> tuple[int, bytes, list[tuple[str, str]]] | None:
        path = urlsplit(target).path if "://" in target else target.partition("?")[0]
        if not path.startswith("/"):
            return None
        return self.resource_status(unquote(path))

    def _error(self, status: int, keep: bool = False,
               headers: list[tuple[str, str]] | None = None, *,
               head_only: bool = False) -> bytes:
        body = f"{status} {REASONS[status]}\n".encode()
        return self._response(status, body, [("Content-Type", "text/plain; charset=utf-8"),
                                             *(headers or [])], keep, head_only=head_only)

    @staticmethod
    def _response(status: int, body: bytes, headers: list[tuple[str, str]], keep: bool,
                  *, head_only: bool = False) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS[status]}", f"Date: {formatdate(usegmt=True)}",
                 *(f"{name}: {value}" for name, value in headers),
                 "X-Content-Type-Options: nosniff", f"Content-Length: {len(body)}",
                 f"Connection: {'keep-alive' if keep else 'close'}", "", ""]
        out = "\r\n".join(lines).encode("latin-1")
        return out if head_only else out + body


