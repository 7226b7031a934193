"""Forwarding to upstream resolvers over a few long-lived sockets.

Never a socket or a thread per query: each upstream gets a small pool of connected
UDP sockets, and queries are multiplexed on them by a fresh random query id (the
client's id is restored on the way back). A response is accepted only from the
connected address, for a pending id, with the question that was sent. A query that
gets no answer within its share of the timeout moves to the next upstream; when all
have failed the caller is told (None) so the client gets SERVFAIL in time, never a hang.
Truncated answers can be fetched again over TCP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from netfilter.config import parse_hostport

__all__ = ["UpstreamPool", "query_tcp"]

log = logging.getLogger(__name__)
SOCKETS_PER_UPSTREAM = 2
SWEEP_INTERVAL = 0.05
MAX_PENDING_PER_SOCKET = 30000  # of 65536 ids: keeps id collisions rare
Done = Callable[[bytes | None], None]


class _Ids:
    """Unpredictable 16-bit query ids, drawn from os.urandom in blocks."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> bytes:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(4096), 0
        value = self._pool[self._at : self._at + 2]
        self._at += 2
        return value


@dataclass(slots=True)
class _Pending:
    query: bytes  # as sent upstream (our id)
    question: bytes  # the question section, to match the response
    client_id: bytes
    done: Done
    attempt: int
    deadline: float
    socket: _Socket | None = field(default=None, repr=False)


class _Socket(asyncio.DatagramProtocol):
    """One connected UDP socket to one upstream, with its pending queries by id."""

    def __init__(self, pool: UpstreamPool, upstream: int) -> None:
        self.pool = pool
        self.upstream = upstream
        self.pending: dict[bytes, _Pending] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if len(data) < 12:
            return
        pending = self.pending.get(data[:2])
        if pending is None or data[12 : 12 + len(pending.question)] != pending.question:
            self.pool.stats["upstream_mismatch"] += 1  # late, spoofed or foreign: ignore
            return
        del self.pending[data[:2]]
        pending.done(pending.client_id + data[2:])

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable on a connected socket: the upstream is down. Every query
        # waiting on this socket moves on now instead of at its deadline.
        self.pool.stats["upstream_errors"] += 1
        pending, self.pending = self.pending, {}
        for item in pending.values():
            self.pool.retry(item)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class UpstreamPool:
    """Sends queries to the configured upstreams in order, with retry and timeout."""

    def __init__(self, upstreams: list[str], timeout: float,
                 stats: dict[str, int]) -> None:
        self.addresses = [parse_hostport(u, default_port=53) for u in upstreams]
        self.timeout = timeout
        # Each attempt gets an equal share, leaving a sweep's margin for the SERVFAIL.
        self.attempt_timeout = max(0.05, (timeout - 2 * SWEEP_INTERVAL) / len(self.addresses))
        self.stats = stats
        self.sockets: list[list[_Socket]] = []
        self._ids = _Ids()
        self._turn = 0
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for index, address in enumerate(self.addresses):
            group = []
            for _ in range(SOCKETS_PER_UPSTREAM):
                _, protocol = await loop.create_datagram_endpoint(
                    lambda i=index: _Socket(self, i), remote_addr=address)  # type: ignore[misc]
                group.append(protocol)
            self.sockets.append(group)
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for group in self.sockets:
            for sock in group:
                for item in sock.pending.values():
                    item.done(None)
                sock.pending.clear()
                if sock.transport is not None:
                    sock.transport.close()

    def forward(self, query: bytes, question_end: int, done: Done) -> None:
        """Send `query` upstream; `done` gets the response (client id restored) or None."""
        item = _Pending(query, query[12:question_end], query[:2], done, -1, 0.0)
        self._send(item)

    def retry(self, item: _Pending) -> None:
        self._send(item)

    def _send(self, item: _Pending) -> None:
        item.attempt += 1
        if item.attempt >= len(self.addresses):
            self.stats["upstream_failures"] += 1
            item.done(None)
            return
        group = self.sockets[item.attempt]
        self._turn = (self._turn + 1) % len(group)
        sock = group[self._turn]
        if sock.transport is None or len(sock.pending) >= MAX_PENDING_PER_SOCKET:
            self._send(item)
            return
        new_id = self._ids.next()
        while new_id in sock.pending:
            new_id = self._ids.next()
        item.query = new_id + item.query[2:]
        item.deadline = time.monotonic() + self.attempt_timeout
        item.socket = sock
        sock.pending[new_id] = item
        sock.transport.sendto(item.query)

    async def _sweep(self) -> None:
        """Retry or fail queries past their deadline (dicts keep insertion order)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for group in self.sockets:
                for sock in group:
                    expired = []
                    for key, item in sock.pending.items():
                        if item.deadline > now:
                            break
                        expired.append(key)
                    for key in expired:
                        item = sock.pending.pop(key)
                        self.stats["upstream_timeouts"] += 1
                        self.retry(item)


async def query_tcp(address: tuple[str, int], query: bytes, timeout: float) -> bytes | None:
    """One query over TCP (for answers that did not fit in UDP); None on any failure."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(*address)
            try:
                writer.write(struct.pack("!H", len(query)) + query)
                await writer.drain()
                length = struct.unpack("!H", await reader.readexactly(2))[0]
                return await reader.readexactly(length)
            finally:
                writer.close()
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return None
