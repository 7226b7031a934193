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
from collections import Counter

from netfilter.config import DnsSettings
from netfilter.dns.listener import Handler, Respond
from netfilter.dns.streamslots import Flight, Held, StreamSlots

__all__ = ["TCP_BACKLOG", "TcpListener"]

_LINGER_0 = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
TCP_BACKLOG = 100  # asyncio's default


class _TcpConnection:
    """One connection: its slot, its queries in flight, the writer of their answers."""

    def __init__(self, writer: asyncio.StreamWriter, held: Held, settings: DnsSettings,
                 stats: Counter[str]) -> None:
        self.writer = writer
        self.held = held
        self.flight = Flight(held, settings.tcp_pipeline)
        self.max_buffer = settings.tcp_max_buffer
        self.stats = stats

    def responder(self) -> Respond:
        """A new query's respond: effective once; drops the connection when the answers
        the client has not read pass `tcp_max_buffer`."""
        end = self.flight.begin()

        def respond(answer: bytes) -> None:
            if not end():
                return
            writer = self.writer
            if answer and not writer.is_closing():
                writer.write(struct.pack("!H", len(answer)) + answer)
                if writer.transport.get_write_buffer_size() > self.max_buffer:
                    self.stats["tcp_dropped_unread"] += 1
                    _reset(writer)

        return respond


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with a reset: what is unsent is discarded, ours and the
    kernel's (a plain close would leave it queued for a client that never reads)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter) -> None:
    """Close; with a reset when answers are still unsent."""
    if writer.transport.get_write_buffer_size():
        _reset(writer)
    else:
        writer.close()


class TcpListener:
    """Serves DNS over TCP on the sockets given to `serve`, within the limits shared by
    all of them; counts in `stats` (the server's) under tcp_*."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.stats = handler.stats
        self._servers: list[asyncio.base_events.Server] = []
        self._clients: set[asyncio.Task[None]] = set()
        # the caps are read from the handler's settings at each new connection
        self._slots = StreamSlots(0, 0, self.stats, "tcp")

    async def serve(self, sock: socket.socket) -> None:
        """Accept on `sock` (bound and listening; closed at stop)."""
        server = await asyncio.start_server(self._client, sock=sock, backlog=TCP_BACKLOG)
        self._servers.append(server)

    async def stop(self) -> None:
        """Stop accepting, close every connection, let their handlers end (bounded)."""
        for server in self._servers:
            server.close()
        for held in list(self._slots.held):
            held.close()  # the handlers see EOF and end (cancelling logs on 3.11)
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
        settings = self.handler.settings
        self._slots.total = settings.tcp_max_connections
        self._slots.per_client = settings.tcp_per_client
        peer = writer.get_extra_info("peername")
        held = self._slots.admit(str(peer[0]) if peer else "?", lambda: _close(writer))
        return None if held is None else _TcpConnection(writer, held, settings, self.stats)

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
                if not connection.flight.room.is_set():  # answers come within the timeout
                    async with limit(settings.timeout + 1.0):
                        await connection.flight.room.wait()
                async with limit(settings.tcp_idle_timeout):
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                    data = await reader.readexactly(length)
                connection.held.touch()
                respond = connection.responder()
                try:
                    self.handler.handle(data, connection.held.client, respond, over_tcp=True)
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
            connection.flight.settled.set()
        finally:
            # A client may half-close after its last query: answer what is in flight
            # (unless we closed it: evicted, or reset for not reading).
            try:
                if not writer.is_closing():
                    async with asyncio.timeout(settings.timeout + 0.5):
                        await connection.flight.settled.wait()
                        await writer.drain()
            except (TimeoutError, ConnectionError):
                pass
            self._clients.discard(task)
            self._slots.release(connection.held)
            _close(writer)
