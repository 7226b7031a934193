"""The UDP listeners: where a clean query's whole cost is, so it is kept small.

A clean query (a name the engine's host cache knows matches nothing) is forwarded
as it came and its answer relayed back when it fits the client and holds no CNAME.
Everything else (a name seen for the first time included) goes through the server's
`query_udp`, `answer_udp` and `retry` (a `listener.Handler`), the full path, which
decides, records and fills the cache.

Two ways to do the clean part, same behaviour:
- `RelayListener`: the C relay of `_hotpath.c`, batches of packets per system call;
  used when the extension is built. It also answers from two bounded caches in C
  (emptied on every list swap): block answers the full path built (repeats of a
  blocked question never reach Python; their counts do, per client, every sweep, so
  the audit log's block counts stay exact), and upstream answers (`dns.cache_size`).
- `PythonListener`: uvloop datagram transports with the question read by
  `wire.scan_question`; where the extension is missing, with `route_url_hosts_to_proxy`
  (a second look-up per name), or with NETFILTER_DNS_PYTHON=1 (tests, comparison).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, cast

from netfilter.dns.listener import Handler, Respond
from netfilter.dns.wire import answer_is_plain, scan_question

if TYPE_CHECKING:
    from netfilter.engine import Verdict

try:
    from netfilter.dns._hotpath import Relay
except ImportError:  # built without a C compiler
    Relay = None  # type: ignore[assignment,misc,unused-ignore]

__all__ = ["PythonListener", "RelayListener", "bind_udp", "relay_available", "relay_built"]

log = logging.getLogger(__name__)
Address = tuple[Any, ...]
_UNSEEN = object()  # a name not in the engine's host cache
# Block answers the relay keeps: one per (name, qtype, EDNS/DO/EDE form) under the lists
# in force. A blocked name's first query per form still takes the full path, so this
# bounds memory (at most 1232 bytes an answer), not what is blocked.
BLOCK_CACHE_SIZE = 16384
# (block answer, client) pairs counted between two sweeps; past it a blocked query
# takes the full path (counted one by one there), so no block goes unrecorded.
MAX_BLOCK_COUNTS = 65536
# Seconds between two recordings of those counts (sooner when the table is half full).
# Each (answer, client) pair costs one engine call per recording: at every 50 ms sweep,
# a flood over a thousand blocked names cost the relay more than the blocks themselves.
# The audit log sees a first block at most this late; its counts are never off.
RECORD_INTERVAL = 1.0


def relay_built() -> bool:
    """Whether the C extension with the relay was built at install."""
    return Relay is not None


def relay_available() -> bool:
    """The relay is built and not switched off (NETFILTER_DNS_PYTHON=1)."""
    return Relay is not None and os.environ.get("NETFILTER_DNS_PYTHON", "") != "1"


def bind_udp(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The listening socket of either listener, bound and not read yet (`netfilter
    serve` binds every part's sockets before it starts any). As asyncio's datagram
    endpoints bind theirs: no SO_REUSEADDR, so a port another socket holds fails here
    (OSError). `reuse_port`: SO_REUSEPORT, for the sockets of several DNS workers on
    one address (dnsworkers.py; only sockets of the same user can join them)."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class PythonListener(asyncio.DatagramProtocol):
    """One UDP listening socket on a uvloop transport; the fast path in Python."""

    def __init__(self, server: Handler) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.stats = server.stats
        # Routing to the proxy needs a second look-up per name: then every query
        # takes the full path.
        self.fast = not server.settings.route_url_hosts_to_proxy
        self.engine = server.engine
        self.forward = server.upstream.forward

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.fast:
            try:
                question = scan_question(data)
                if (question is not None
                        and self.engine.host_cache.get(question[0], _UNSEEN) is None):
                    stats = self.stats
                    stats["queries"] += 1
                    stats["forwarded"] += 1
                    self.forward(data, question[2], self._answered, (addr, data, question))
                    return
            except Exception as error:  # a bug must cost one query, never the server
                self.server.failed("query", error, data, self._responder(addr),
                                   over_tcp=False)
                return
        self.server.query_udp(data, str(addr[0]), self._responder(addr))

    def _answered(self, answer: bytes | None, context: tuple[Any, ...]) -> None:
        addr, data, question = context
        try:
            if (answer is not None and len(answer) <= question[3]
                    and (answer[6:8] == b"\x00\x00" or answer_is_plain(answer, question[2]))):
                transport = self.transport
                if transport is not None and not transport.is_closing():
                    transport.sendto(answer, addr)
                return
        except Exception as error:  # never into the upstream socket's callback
            self.server.failed("answer", error, data, self._responder(addr), over_tcp=False)
            return
        # No answer, one too big for the client, or CNAMEs to check: the full path.
        self.server.answer_udp(answer, data, str(addr[0]), self._responder(addr))

    def _responder(self, addr: Address) -> Respond:
        transport = self.transport
        assert transport is not None

        def respond(answer: bytes) -> None:
            if not transport.is_closing():
                transport.sendto(answer, addr)

        return respond

    def sweep(self) -> None:
        """Nothing of its own in flight: the upstream pool keeps the time."""

    def counts(self) -> dict[str, int]:
        return {}  # counted in the server's stats

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RelayListener:
    """One UDP listening socket served by the C relay, with its own upstream socket.

    The relay sends clean queries to the first upstream only; what it cannot finish
    (first-time names, blocks, CNAMEs, oversize answers, time-outs) comes back here as
    packets with the client's address, for the full path and the upstream pool (which
    retries the next upstreams).
    """

    def __init__(self, server: Handler, sock: socket.socket,
                 upstream: socket.socket) -> None:
        assert Relay is not None
        self.server = server
        self.stats = server.stats
        self.sock = sock
        self.upstream = upstream
        self.relay = Relay(sock.fileno(), upstream.fileno(), server.upstream.attempt_timeout,
                           cache_size=server.settings.cache_size,
                           block_cache_size=BLOCK_CACHE_SIZE,
                           max_block_counts=MAX_BLOCK_COUNTS)
        self.engine = server.engine
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._from_clients)
        loop.add_reader(upstream.fileno(), self._from_upstream)
        self._loop = loop
        self._record_at = loop.time() + RECORD_INTERVAL
        self._tokens: dict[tuple[object, ...], tuple[Verdict, str, str]] = {}

    @classmethod
    def open(cls, server: Handler, sock: socket.socket) -> RelayListener:
        """Serve `sock` (a bound UDP socket, see `bind_udp`; closed on failure too),
        with one socket connected to the first upstream."""
        try:
            sock.setblocking(False)
            up_host, up_port = server.upstream.addresses[0]
            up_family, _, _, _, up_address = socket.getaddrinfo(
                up_host, up_port, type=socket.SOCK_DGRAM)[0]
            upstream = socket.socket(up_family, socket.SOCK_DGRAM)
        except BaseException:
            sock.close()
            raise
        try:
            upstream.setblocking(False)
            upstream.connect(up_address)
            return cls(server, sock, upstream)
        except BaseException:
            sock.close()
            upstream.close()
            raise

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _responder(self, addr: Address) -> _RelayResponder:
        return _RelayResponder(self, addr)

    def keep_block(self, query: bytes, answer: bytes, verdict: Verdict, detail: str,
                   name: str) -> None:
        """The full path answered `query` (whose name is `name`) with the block `answer`
        (server.py): the relay answers the same question from now on, while the lists
        stay the same (it refuses a question it would not take itself). The token
        carries what the audit log needs per block (`_record_blocks`)."""
        # One token per audit key and detail: the relay counts per (token, client), and
        # each pair costs an engine call per recording; forms of one question, and a
        # domain's subdomains blocked by the same entry, share one (unless targets are
        # recorded: then each name is its own).
        key = (verdict.match, verdict.answer, detail,
               name if self.engine.record_targets else None)
        token = self._tokens.get(key)
        if token is None:
            if len(self._tokens) >= 2 * BLOCK_CACHE_SIZE:
                self._tokens.clear()  # bounded; a token only has to live in the relay
            token = self._tokens[key] = (verdict, name, detail)
        self.relay.remember_block(query, answer, self.engine.host_cache, token)

    def _record_blocks(self) -> None:
        """Record the blocks the relay answered from its cache since the last call: one
        call per (answer, client) with the count, which the engine records as that many
        blocks (aggregate.py folds them per window), so the log's counts stay exact."""
        engine, stats = self.engine, self.stats
        for (verdict, name, detail), client, count in self.relay.block_counts():
            stats["blocked"] += count
            engine.record_repeats(verdict, name, count, frontend="dns", client=client,
                                  detail=detail)

    def _from_clients(self) -> None:
        try:
            handed_over = self.relay.from_clients(self.engine.host_cache)
        except Exception as error:
            self.server.fault("the relay reading queries", error)
            return
        for data, addr in handed_over:
            self.server.query_udp(data, str(addr[0]), self._responder(addr))

    def _from_upstream(self) -> None:
        try:
            handed_over, refused = self.relay.from_upstream()
        except Exception as error:
            self.server.fault("the relay reading answers", error)
            return
        for answer, data, addr in handed_over:
            self.server.answer_udp(answer, data, str(addr[0]), self._responder(addr))
        if refused:  # ICMP unreachable: the first upstream is down, move on now
            self.stats["upstream_errors"] += 1
            self._rearm()
            self._retry(self.relay.expired(all=True))

    def _rearm(self) -> None:
        """Register the upstream socket's reader anew. uvloop closes a reader whose
        socket reported an error (an ICMP unreachable): without this, the relay would
        never read an answer again once the upstream had been down."""
        fd = self.upstream.fileno()
        self._loop.remove_reader(fd)
        self._loop.add_reader(fd, self._from_upstream)

    def counts(self) -> dict[str, int]:
        counts = self.relay.counts()
        del counts["in_flight"]
        return counts

    def cache_stats(self) -> dict[str, int]:
        """Entries the relay's caches hold now, and their capacities (gauges)."""
        return self.relay.cache_stats()

    def sweep(self) -> None:
        """Record the blocks answered from the cache (every RECORD_INTERVAL); hand the
        queries past their deadline to the pool's next upstreams (and, as they may
        have timed out for a reader uvloop closed, register it anew)."""
        now = self._loop.time()
        if (now >= self._record_at or self.relay.cache_stats()["block_counts_pending"]
                >= MAX_BLOCK_COUNTS // 2):
            self._record_at = now + RECORD_INTERVAL
            try:
                self._record_blocks()
            except Exception as error:
                self.server.fault("recording the relay's blocks", error)
        late = self.relay.expired()
        if late:
            self._rearm()
        self._retry(late)

    def _retry(self, late: list[tuple[bytes, Address]]) -> None:
        for data, addr in late:
            self.server.retry(data, str(addr[0]), self._responder(addr))

    def close(self) -> None:
        """Stop reading; what is still in flight gets SERVFAIL from the pool; the blocks
        answered from the cache are recorded."""
        self._loop.remove_reader(self.sock.fileno())
        self._loop.remove_reader(self.upstream.fileno())
        self._record_blocks()
        log.info("dns: relay caches at stop: %s", ", ".join(
            f"{key} {value}" for key, value in sorted(self.relay.cache_stats().items())))
        for data, addr in self.relay.expired(all=True):
            self.server.answer_udp(None, data, str(addr[0]), self._responder(addr))
        self.upstream.close()
        self.sock.close()


class _RelayResponder:
    """Sends the full path's answer to one client of a relay; `keep_block` is how the
    full path hands a block answer to the relay's cache (server.py looks for it)."""

    __slots__ = ("addr", "listener")

    def __init__(self, listener: RelayListener, addr: Address) -> None:
        self.listener = listener
        self.addr = addr

    def __call__(self, answer: bytes) -> None:
        try:
            self.listener.sock.sendto(answer, self.addr)
        except OSError:  # a full buffer or a closed socket: a lost UDP answer
            self.listener.stats["send_failed"] += 1

    def keep_block(self, query: bytes, answer: bytes, verdict: Verdict, detail: str,
                   name: str) -> None:
        self.listener.keep_block(query, answer, verdict, detail, name)
