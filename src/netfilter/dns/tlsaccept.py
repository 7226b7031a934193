"""Accepting TLS connections for the encrypted DNS listeners: slot first, then the
handshake, within a deadline, then the session as asyncio streams.

A plain `asyncio.start_server(ssl=...)` calls us only once the handshake is done, so a
client that opens connections and never sends a ClientHello would hold sockets we do not
count. Here connections are accepted by us: each takes its slot (`StreamSlots`) when
accepted, before any byte is read (then by TLS only), and the handshake must finish
within `dns.tls_handshake_timeout`. A failed handshake is counted, never logged per
client.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable

from netfilter.dns.streamslots import Held, StreamSlots
from netfilter.slots import end_connection

__all__ = ["Session", "TlsAcceptor"]

Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Held], Awaitable[None]]
Fault = Callable[[str, BaseException], None]  # the server's FaultLog: counted, rate-limited
STREAM_LIMIT = 1 << 16  # StreamReader's buffer limit; sessions read in bounded pieces
ACCEPT_PAUSE = 0.1  # seconds after an accept error (EMFILE) before the next try


class _Connection:
    """One accepted connection: its handshake task until TLS is up, then its transport;
    what eviction closes."""

    __slots__ = ("task", "transport")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        elif self.task is not None:
            self.task.cancel()  # in the handshake: its socket is closed


class TlsAcceptor:
    """Serves one listener kind (`prefix`: dot, doh) on its sockets: each accepted
    connection gets a slot, a TLS handshake under `context`, then `session`."""

    def __init__(self, context: ssl.SSLContext, slots: StreamSlots, session: Session, *,
                 handshake_timeout: float, stats: Counter[str], prefix: str,
                 fault: Fault) -> None:
        self.context = context
        self.fault = fault
        self.slots = slots
        self.session = session
        self.handshake_timeout = handshake_timeout
        self.stats = stats
        self.prefix = prefix
        self.sockets: list[socket.socket] = []
        self.accepting: list[asyncio.Task[None]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self, sock: socket.socket) -> None:
        """Accept on `sock` (bound and listening) until stopped. Connections are
        accepted here rather than by a server with TLS, so that a connection takes its
        slot before its handshake, and no byte is read but by TLS."""
        sock.setblocking(False)
        self.sockets.append(sock)
        self.accepting.append(asyncio.get_running_loop().create_task(self._accept(sock)))

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError:  # out of file descriptors, say: the backlog waits
                self.stats[f"{self.prefix}_accept_errors"] += 1
                await asyncio.sleep(ACCEPT_PAUSE)
                continue
            self._accepted(conn, str(peer[0]) if peer else "?")

    def _accepted(self, conn: socket.socket, client: str) -> None:
        connection = _Connection()
        held = self.slots.admit(client, connection.abort)
        if held is None:
            conn.close()
            return
        self.stats[f"{self.prefix}_connections"] += 1
        task = asyncio.get_running_loop().create_task(self._run(conn, connection, held))
        connection.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, conn: socket.socket, connection: _Connection, held: Held) -> None:
        loop = asyncio.get_running_loop()
        try:
            reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            try:
                async with asyncio.timeout(self.handshake_timeout):
                    transport, _ = await loop.connect_accepted_socket(
                        lambda: protocol, conn, ssl=self.context,
                        ssl_handshake_timeout=self.handshake_timeout)
            except (TimeoutError, ssl.SSLError, OSError, EOFError):
                self.stats[f"{self.prefix}_handshake_failed"] += 1
                conn.close()
                return
            connection.transport = transport
            held.touch()
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            await self.session(reader, writer, held)
        except asyncio.CancelledError:
            conn.close()  # evicted in its handshake, or stopping: end quietly
        except Exception as error:  # a bug costs this connection, in no more log lines
            self.fault(f"{self.prefix} connection", error)  # than FaultLog allows
        finally:
            self.slots.release(held)
            if connection.transport is not None:
                end_connection(connection.transport)

    async def stop(self) -> None:
        for task in self.accepting:
            task.cancel()
        for sock in self.sockets:
            sock.close()
        self.slots.close_all()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        for task in list(self.tasks):
            task.cancel()

