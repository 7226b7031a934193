"""Forwarding to upstream resolvers over a few long-lived sockets.

Never a socket or a thread per query: each upstream gets a small pool of connected
UDP sockets, and queries are multiplexed on them by a fresh random query id (the
client's id is restored on the way back). A response is accepted only from the
connected address, for a pending id, with the question that was sent. A query that
gets no answer within its share of the timeout moves to the next upstream; when all
have failed the caller is told (None) so the client gets SERVFAIL in time, never a hang.
Truncated answers can be fetched again over TCP.

Trouble is said in the log (`Trouble`): an upstream unreachable, one that does not answer
in time, packets from it that answer no query in flight, and queries no upstream
answered; each kind per upstream at once, then at most one line per interval with the
count since. The upstream's address only, never a client's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Callable
from typing import Any, Final, cast

from netfilter.config import parse_hostport
from netfilter.dns.codes import Flag
from netfilter.ratelimit import RateLimit

__all__ = ["Done", "UpstreamPool", "query_tcp"]

log = logging.getLogger(__name__)
SOCKETS_PER_UPSTREAM = 2
SWEEP_INTERVAL = 0.05
MAX_PENDING_PER_SOCKET = 30000  # of 65536 ids: keeps id collisions rare
TROUBLE_LOG_INTERVAL = 10.0  # seconds between log lines about one kind of trouble
# The caller's callback: the response (client id restored) or None, and its context.
# A bound method and a tuple, not a closure per query: this runs for every packet.
Done = Callable[[bytes | None, Any], None]


def _fresh_ids() -> list[bytes]:
    """2,048 unpredictable 16-bit query ids from os.urandom, taken from the end."""
    block = os.urandom(4096)
    return [block[i : i + 2] for i in range(0, 4096, 2)]


# One query in flight, a plain tuple (one is made per forwarded packet; a NamedTuple
# costs 8x as much to build): the query as sent (our id), the question section (to
# match the response), the client's id, done, its context, the attempt (the index of
# the upstream) and the attempt's deadline (time.monotonic()).
_Pending = tuple[bytes, bytes, bytes, Done, Any, int, float]
QUERY: Final = 0
QUESTION: Final = 1
CLIENT_ID: Final = 2
DONE: Final = 3
CONTEXT: Final = 4
ATTEMPT: Final = 5
DEADLINE: Final = 6


class Trouble:
    """Upstream trouble in the log, rate-limited per upstream and kind (ratelimit.py).
    Nothing per query but a dict look-up and a clock read."""

    def __init__(self, interval: float = TROUBLE_LOG_INTERVAL) -> None:
        self.interval = interval
        self._limit = RateLimit(interval)

    def __call__(self, subject: str, what: str, count: int = 1) -> None:
        reported = self._limit.due((subject, what), count)
        if reported:
            log.warning("dns: %s %s (%d since the last report; reported at most every %g s)",
                        subject, what, reported, self.interval)


def _name(address: tuple[str, int]) -> str:
    host, port = address
    return f"upstream [{host}]:{port}" if ":" in host else f"upstream {host}:{port}"


_UNREACHABLE = "unreachable (ICMP error): its queries move to the next upstream or get SERVFAIL"
_QR_OCTET = int(Flag.QR) >> 8  # QR in the flags' first octet (data[2])
_NOT_DNS = "sent a packet that is not a DNS response: ignored"
_UNKNOWN_ID = "sent an answer whose id is of no query in flight (late, or a wrong id): ignored"
_WRONG_QUESTION = "sent an answer whose question is not the one asked: ignored"
_FAILED = "gave no answer: queries answered SERVFAIL"


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
        query_id = data[:2]
        item = self.pending.get(query_id)
        if item is None or data[12 : 12 + len(item[QUESTION])] != item[QUESTION]:
            self.pool.stats["upstream_mismatch"] += 1  # late, spoofed or foreign: ignore
            self.pool.trouble(self.pool.names[self.upstream],
                              _NOT_DNS if len(data) < 12 or not data[2] & _QR_OCTET
                              else _UNKNOWN_ID if item is None else _WRONG_QUESTION)
            return
        del self.pending[query_id]
        self.pool.answered += 1
        item[DONE](item[CLIENT_ID] + data[2:], item[CONTEXT])

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable on a connected socket: the upstream is down. Every query
        # waiting on this socket moves on now instead of at its deadline.
        self.pool.stats["upstream_errors"] += 1
        self.pool.errors[self.upstream] += 1
        self.pool.trouble(self.pool.names[self.upstream], _UNREACHABLE)
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
        self.names = [_name(a) for a in self.addresses]
        self.trouble = Trouble()
        self._all = ("upstreams " + ", ".join(n.split(" ", 1)[1] for n in self.names)
                     if len(self.names) > 1 else self.names[0])
        self.timeout = timeout
        # Each attempt gets an equal share, leaving a sweep's margin for the SERVFAIL.
        self.attempt_timeout = max(0.05, (timeout - 2 * SWEEP_INTERVAL) / len(self.addresses))
        self.stats = stats
        # For metrics and readiness: answers taken, and per upstream (by index) the
        # ICMP errors and the attempts that timed out.
        self.answered = 0
        self.errors = [0] * len(self.addresses)
        self.timeouts = [0] * len(self.addresses)
        self.sockets: list[list[_Socket]] = []
        self._ids = _fresh_ids()
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
                    item[DONE](None, item[CONTEXT])
                sock.pending.clear()
                if sock.transport is not None:
                    sock.transport.close()

    def forward(self, query: bytes, question_end: int, done: Done, context: Any,
                attempt: int = 0) -> None:
        """Send `query` to upstream number `attempt` (then the next ones, on failure);
        then `done(response or None, context)`, exactly once."""
        self._send(query, query[12:question_end], query[:2], done, context, attempt)

    def retry(self, item: _Pending) -> None:
        """Send a query that failed or timed out to the next upstream."""
        self._send(item[QUERY], item[QUESTION], item[CLIENT_ID], item[DONE], item[CONTEXT],
                   item[ATTEMPT] + 1)

    def _refill_ids(self) -> list[bytes]:
        self._ids = _fresh_ids()
        return self._ids

    def _send(self, query: bytes, question: bytes, client_id: bytes, done: Done,
              context: Any, attempt: int) -> None:
        while attempt < len(self.addresses):
            group = self.sockets[attempt]
            self._turn = turn = (self._turn + 1) % len(group)
            sock = group[turn]
            transport = sock.transport
            pending = sock.pending
            if transport is not None and len(pending) < MAX_PENDING_PER_SOCKET:
                ids = self._ids or self._refill_ids()
                new_id = ids.pop()
                while new_id in pending:
                    new_id = ids.pop() if ids else self._refill_ids().pop()
                query = new_id + query[2:]
                pending[new_id] = (query, question, client_id, done, context, attempt,
                                   time.monotonic() + self.attempt_timeout)
                transport.sendto(query)
                return
            attempt += 1  # this upstream's socket is closed or full: the next one
        self.stats["upstream_failures"] += 1
        self.trouble(self._all, _FAILED)
        done(None, context)

    async def _sweep(self) -> None:
        """Retry or fail queries past their deadline (dicts keep insertion order)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for group in self.sockets:
                for sock in group:
                    expired = []
                    for key, item in sock.pending.items():
                        if item[DEADLINE] > now:
                            break
                        expired.append(key)
                    if expired:
                        self.trouble(self.names[sock.upstream],
                                     f"did not answer within {self.attempt_timeout:.2f} s: "
                                     "its queries move to the next upstream or get SERVFAIL",
                                     len(expired))
                    for key in expired:
                        item = sock.pending.pop(key)
                        self.stats["upstream_timeouts"] += 1
                        self.timeouts[item[ATTEMPT]] += 1
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
