"""DNS over TCP (RFC 7766): one listener over every `dns.listen` TCP socket of a server.

Connections are bounded as a resolver bounds them (Unbound's incoming-num-tcp,
tcp-idle-timeout and per-client limits, Knot Resolver's tcp_pipeline): connections per
client (IPv4 address, IPv6 /64) and in total (at either cap, the connection idle
longest makes room for a new one), and per connection its lifetime, queries, queries
in flight and answer bytes the client has not read (`DnsSettings`, read from the
handler at each new connection, so a reload applies to new ones). Queries go to the
server through `listener.Handler`; nothing here imports the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter

from netfilter.config import DnsSettings
from netfilter.dns.listener import Handler, Respond
from netfilter.slots import client_key

__all__ = ["TCP_BACKLOG", "TcpListener"]

_LINGER_0 = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
TCP_BACKLOG = 100  # asyncio's default


class _TcpConnection:
    """What the TCP limits need to know about one connection."""

    def __init__(self, writer: asyncio.StreamWriter, client: str, key: str,
                 settings: DnsSettings, stats: Counter[str]) -> None:
        self.writer = writer
        self.client = client
        self.key = key
        self.pipeline = settings.tcp_pipeline
        self.max_buffer = settings.tcp_max_buffer
        self.stats = stats
        self.in_flight = 0
        self.last_active = time.monotonic()
        self.room = asyncio.Event()  # fewer than `pipeline` queries in flight
        self.room.set()
        self.settled = asyncio.Event()  # none in flight
        self.settled.set()

    def responder(self) -> Respond:
        """A new query's respond: effective once (a failure after the answer must not
        settle it twice); drops the connection when the answers the client has not
        read pass `tcp_max_buffer`."""
        self.in_flight += 1
        self.settled.clear()
        if self.in_flight >= self.pipeline:
            self.room.clear()
        done = False

        def respond(answer: bytes) -> None:
            nonlocal done
            if done:
                return
            done = True
            self.in_flight -= 1
            self.last_active = time.monotonic()
            self.room.set()
            if not self.in_flight:
                self.settled.set()
            writer = self.writer
            if answer and not writer.is_closing():
                writer.write(struct.pack("!H", len(answer)) + answer)
                if writer.transport.get_write_buffer_size() > self.max_buffer:
                    self.stats["tcp_dropped_unread"] += 1
                    self.reset()

        return respond

    def reset(self) -> None:
        """Drop the connection with a reset: what is unsent is discarded, ours and the
        kernel's (a plain close would leave it queued for a client that never reads)."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
        self.writer.transport.abort()

    def close(self) -> None:
        """Close; with a reset when answers are still unsent."""
        if self.writer.transport.get_write_buffer_size():
            self.reset()
        else:
            self.writer.close()



class TcpListener:
    """Serves DNS over TCP on the sockets given to `serve`, within the limits shared by
    all of them; counts in `stats` (the server's) under tcp_*."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.stats = handler.stats
        self._servers: list[asyncio.base_events.Server] = []
        self._clients: set[asyncio.Task[None]] = set()
        self._connections: set[_TcpConnection] = set()
        self._per_client: Counter[str] = Counter()

    async def serve(self, sock: socket.socket) -> None:
        """Accept on `sock` (bound and listening; closed at stop)."""
        server = await asyncio.start_server(self._client, sock=sock, backlog=TCP_BACKLOG)
        self._servers.append(server)

    async def stop(self) -> None:
        """Stop accepting, close every connection, let their handlers end (bounded)."""
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            connection.close()  # the handlers see EOF and end (cancelling logs on 3.11)
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=1.0)

    def sweep(self) -> None:
        """Nothing to give back: each connection keeps its own time."""

    def counts(self) -> dict[str, int]:
        return {}  # counted in the server's stats

    def _admit(self, writer: asyncio.StreamWriter) -> _TcpConnection | None:
        """A new connection within the limits, or None (it is closed). A client at its
        cap, or a server with every slot taken, closes its (or anybody's) connection
        idle longest for the new one: an idle connection serves nobody now, and
        holding many open costs a client its own oldest ones first."""
        settings, stats = self.handler.settings, self.stats
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else "?"
        key = client_key(client)
        if self._per_client[key] >= settings.tcp_per_client and not self._evict(key):
            stats["tcp_refused_client"] += 1
            return None
        if len(self._connections) >= settings.tcp_max_connections and not self._evict(None):
            stats["tcp_refused_full"] += 1
            return None
        connection = _TcpConnection(writer, client, key, settings, stats)
        self._connections.add(connection)
        self._per_client[key] += 1
        return connection

    def _evict(self, key: str | None) -> bool:
        """Close the connection with no query in flight that was active longest ago
        (of client `key`, or of anybody); False: every one is busy."""
        idle = [c for c in self._connections if not c.in_flight and key in (None, c.key)]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.last_active)
        self._release(oldest)
        oldest.close()
        self.stats["tcp_closed_for_new"] += 1
        return True

    def _release(self, connection: _TcpConnection) -> None:
        """Give the connection's slot back (once)."""
        if connection in self._connections:
            self._connections.discard(connection)
            self._per_client[connection.key] -= 1
            if not self._per_client[connection.key]:
                del self._per_client[connection.key]

    async def _client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        connection = self._admit(writer) if task is not None else None
        if connection is None or task is None:
            writer.close()
            return
        self._clients.add(task)
        settings, stats = self.handler.settings, self.stats
        loop = asyncio.get_running_loop()
        end_of_life = loop.time() + settings.tcp_max_lifetime

        def limit(seconds: float) -> asyncio.Timeout:
            return asyncio.timeout_at(min(loop.time() + seconds, end_of_life))

        try:
            for _ in range(settings.tcp_max_queries):
                if not connection.room.is_set():  # answers come within the timeout
                    async with limit(settings.timeout + 1.0):
                        await connection.room.wait()
                async with limit(settings.tcp_idle_timeout):
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                    data = await reader.readexactly(length)
                connection.last_active = time.monotonic()
                respond = connection.responder()
                try:
                    self.handler.handle(data, connection.client, respond, over_tcp=True)
                except Exception as error:
                    self.handler.failed("tcp query", error, data, respond, over_tcp=True)
                async with limit(settings.tcp_idle_timeout):
                    await writer.drain()  # a client that does not read: closed at idle
            else:
                stats["tcp_closed_max_queries"] += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except TimeoutError:
            stats["tcp_closed_lifetime" if loop.time() >= end_of_life else "tcp_closed_idle"] += 1
        except asyncio.CancelledError:
            # Shutting down: end quietly (Python 3.11's start_server logs a cancelled
            # handler as an error).
            connection.settled.set()
        finally:
            # A client may half-close after its last query: answer what is in flight
            # (unless we closed it: evicted, or reset for not reading).
            try:
                if not writer.is_closing():
                    async with asyncio.timeout(settings.timeout + 0.5):
                        await connection.settled.wait()
                        await writer.drain()
            except (TimeoutError, ConnectionError):
                pass
            self._clients.discard(task)
            self._release(connection)
            connection.close()
