"""The filtering resolver: one server behind its listeners, in front of the upstream pool.

Listeners (udp.py: the C relay or the Python one; tcp.py; dot.py and doh.py) own
sockets and framing and hand queries in through `listener.Handler`; they never import
this module. Per query: parse it once into a `wire.Query`, answer canaries
(canaries.py), ask the engine about the name, and either answer the block
(answers.py) or forward the packet as it came (only the id is rewritten). Upstream
answers are scanned for CNAME targets, so a clean name that aliases a blocked one is
blocked too. A malformed packet is answered FORMERR when its header is readable and
dropped otherwise; either way it is counted and the server goes on. A query our own
code fails on is answered SERVFAIL (or dropped), counted, and reported in at most one
log line per interval, never with the client's address or a traceback (`FaultLog`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from netfilter.canonical import InvalidURL
from netfilter.config import DnsSettings, parse_hostport
from netfilter.dns.answers import (
    badvers_answer,
    block_answer,
    error_answer,
    route_answer,
    to_wire,
)
from netfilter.dns.canaries import Canaries
from netfilter.dns.codes import OPCODE_MASK, Flag, Rcode, RRClass, type_name
from netfilter.dns.listener import Listener, Respond
from netfilter.dns.tcp import TCP_BACKLOG, TcpListener
from netfilter.dns.udp import PythonListener, RelayListener, bind_udp, relay_available
from netfilter.dns.upstream import SWEEP_INTERVAL, UpstreamPool, query_tcp
from netfilter.dns.wire import FormError, Query, cname_targets, parse_query
from netfilter.engine import Engine
from netfilter.errors import ListenError
from netfilter.latency import LatencyHistogram

__all__ = ["DnsServer", "Listening", "bind"]

log = logging.getLogger(__name__)
FAULT_LOG_INTERVAL = 10.0  # seconds between log lines about internal errors
_FILTERED_CLASSES = (RRClass.IN, RRClass.ANY)
_QR_OCTET = int(Flag.QR) >> 8  # QR in the flags' first octet (data[2])
_TC_OCTET = int(Flag.TC) >> 8


class Listening(NamedTuple):
    """One `dns.listen` address bound: its UDP socket and the TCP one on the same port."""

    host: str
    udp: socket.socket
    tcp: socket.socket

    @property
    def port(self) -> int:
        return int(self.udp.getsockname()[1])

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


def bind(listen: Sequence[str], *, reuse_port: bool = False) -> list[Listening]:
    """UDP and TCP bound on every address of `listen`, none served yet (`netfilter
    serve` binds every part's sockets before it starts any). TCP takes the port UDP
    got (port 0: the one the system chose), with SO_REUSEADDR and, on an IPv6
    address, IPv6 only, as asyncio's servers do; it listens at once, so an address
    given twice is caught here too. ListenError names the first address that cannot
    be bound; the ones bound before it are closed. `reuse_port`: SO_REUSEPORT on both,
    so that the other DNS workers' sockets can join them (dnsworkers.py)."""
    bound: list[Listening] = []
    try:
        for index, address in enumerate(listen):
            host, port = parse_hostport(address, any_port=True)
            try:
                udp = bind_udp(host, port, reuse_port=reuse_port)
            except OSError as e:
                raise ListenError.from_os_error(f"dns.listen[{index}]", host, port, e) from None
            port = int(udp.getsockname()[1])
            try:
                tcp = socket.create_server((host, port), family=udp.family,
                                           backlog=TCP_BACKLOG, reuse_port=reuse_port)
            except OSError as e:
                udp.close()
                raise ListenError.from_os_error(f"dns.listen[{index}]", host, port, e) from None
            bound.append(Listening(host, udp, tcp))
    except BaseException:
        for listening in bound:
            listening.close()
        raise
    return bound


class FaultLog:
    """Internal errors on single packets: each one counted, at most one log line per
    interval (how many, and the first one's type and message), never the client's
    address, no traceback (one at DEBUG per process). A packet that trips a bug must
    not cost a log line: 3k such packets a second once wrote 36 MB of log in 10 s."""

    _traced = False  # the one traceback at DEBUG, per process

    def __init__(self, stats: Counter[str], interval: float = FAULT_LOG_INTERVAL) -> None:
        self.stats = stats
        self.interval = interval
        self._held = 0
        self._first = ""
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, where: str, error: BaseException) -> None:
        self.stats["internal_errors"] += 1
        if not FaultLog._traced and log.isEnabledFor(logging.DEBUG):
            FaultLog._traced = True
            log.debug("dns: internal error in %s (its traceback, shown once)", where,
                      exc_info=error)
        self._held += 1
        if not self._first:
            message = str(error)[:200].encode("unicode_escape").decode("ascii")
            self._first = f"{type(error).__name__} in {where}: {message}"
        if self._timer is None:  # quiet until now: this one at once
            log.warning("dns: internal error, %s; the queries it hits are answered SERVFAIL "
                        "or dropped, counted, and reported at most every %g s", self._first,
                        self.interval)
            self._held, self._first = 0, ""
            self._schedule()

    def _schedule(self) -> None:
        try:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._report)
        except RuntimeError:  # no loop (not serving): nothing to hold the next ones back
            self._timer = None

    def _report(self, again: bool = True) -> None:
        """The count held back in the last interval, if any; quiet again if none."""
        self._timer = None
        if self._held:
            log.warning("dns: %d more internal error(s), the first %s", self._held,
                        self._first)
            self._held, self._first = 0, ""
            if again:
                self._schedule()

    def close(self) -> None:
        """Report what is held back now."""
        if self._timer is not None:
            self._timer.cancel()
        self._report(again=False)


class DnsServer:
    """Serves DNS on the configured addresses until stopped: on `sockets` (see `bind`,
    one per `settings.listen` address; closed at stop) when given, else it binds them
    itself at start."""

    def __init__(self, engine: Engine, settings: DnsSettings, *,
                 sockets: Sequence[Listening] | None = None,
                 canaries: Canaries | None = None) -> None:
        """`canaries`: the canary names and answers (`Canaries.for_settings`, which
        can read the certificate); default: those of `settings` without resolver.arpa."""
        self.engine = engine
        self.settings = settings
        self.canaries = canaries if canaries is not None else Canaries(settings)
        self.canary_counts: Counter[str] = Counter()  # answers per canary label
        self._bound = list(sockets) if sockets is not None else None
        self.stats: Counter[str] = Counter()
        self.upstream = UpstreamPool(list(settings.upstreams), settings.timeout, self.stats)
        self._listeners: list[Listener] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.fault = FaultLog(self.stats)
        # Time to answer, for queries decided in Python (blocked, or forwarded by the
        # full path); the clean fast path (C relay, PythonListener) is not timed.
        self.latency = LatencyHistogram()
        self._upstream_seen = (0, 0)  # (answers, SERVFAILs) at the last readiness check
        self._upstream_ok = True
        self.tcp = TcpListener(self)
        self._background: set[asyncio.Future[None]] = set()
        self.addresses: list[tuple[str, int]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._bound is None:
            self._bound = bind(self.settings.listen)
        await self.upstream.start()
        # The C relay where it is built; the Python listener where routing to the
        # proxy needs a second look-up per name (udp.py).
        relay = relay_available() and not self.settings.route_url_hosts_to_proxy
        while self._bound:  # each pair leaves the list once the loop serves it
            bound = self._bound[0]
            listener: PythonListener | RelayListener
            if relay:
                listener = RelayListener.open(self, bound.udp)
            else:
                _, listener = await loop.create_datagram_endpoint(
                    lambda: PythonListener(self), sock=bound.udp)
            self._listeners.append(listener)
            await self.tcp.serve(bound.tcp)
            self.addresses.append((bound.host, bound.port))
            log.info("dns: serving on %s port %d (udp%s, tcp)", bound.host, bound.port,
                     " by the C relay" if relay else "")
            self._bound.pop(0)
        if relay:
            self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        await self.tcp.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for listener in self._listeners:
            listener.close()
        for bound in self._bound or ():  # those not served yet, when start failed
            bound.close()
        await self.upstream.stop()
        self.fault.close()
        log.info("dns: stopped; %s", ", ".join(f"{key} {value}" for key, value
                                              in sorted(self.counts().items())))

    def counts(self) -> dict[str, int]:
        """What happened to the packets so far: the full path's and the relays'."""
        counts = Counter(self.stats)
        for listener in self._listeners:
            counts.update(listener.counts())
        return dict(counts)

    def relay_counts(self) -> dict[str, int]:
        """The C relays' own packet counters, summed over the listeners ({} without)."""
        counts: Counter[str] = Counter()
        for listener in self._listeners:
            if isinstance(listener, RelayListener):
                counts.update(listener.counts())
        return dict(counts)

    def upstream_counts(self) -> list[tuple[str, int, int]]:
        """Per upstream ("host:port"): ICMP errors and attempts timed out. The C relay
        talks to the first upstream only; its ICMP errors count there, and its
        time-outs are the relay's `given_back`."""
        pool = self.upstream
        relay_errors = self.stats["upstream_errors"] - sum(pool.errors)
        return [(f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
                 pool.errors[i] + (relay_errors if i == 0 else 0), pool.timeouts[i])
                for i, (host, port) in enumerate(pool.addresses)]

    def upstream_answering(self) -> bool:
        """For readiness: False once queries got SERVFAIL for want of an upstream
        answer and no upstream has answered since; True while any answers (and before
        any query was forwarded). Judged from counters at each call, nothing per query."""
        answers = self.upstream.answered + self.relay_counts().get("answered", 0)
        failed = self.stats["servfail"]
        seen_answers, seen_failed = self._upstream_seen
        if answers != seen_answers:
            self._upstream_ok = True
        elif failed != seen_failed:
            self._upstream_ok = False
        self._upstream_seen = (answers, failed)
        return self._upstream_ok

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            for listener in self._listeners:
                listener.sweep()

    # ------------------------------------------------------------ per query

    def handle(self, data: bytes, client: str, respond: Respond, *, over_tcp: bool) -> None:
        started = time.monotonic()
        stats = self.stats
        stats["queries"] += 1
        if len(data) < 12 or data[2] & _QR_OCTET:  # no readable header, or a response
            stats["dropped"] += 1
            if over_tcp:
                respond(b"")  # settles the connection's count; nothing is sent
            return
        try:
            query = parse_query(data)
        except FormError:
            stats["formerr"] += 1
            respond(error_answer(data, Rcode.FORMERR))
            return
        if query.flags & OPCODE_MASK:  # only standard queries are filtered or forwarded
            stats["notimp"] += 1
            respond(error_answer(data, Rcode.NOTIMP, query))
            return
        if query.edns_version:  # RFC 6891 6.1.3: we speak EDNS version 0 only
            stats["badvers"] += 1
            respond(badvers_answer(data, query))
            return
        if query.name and query.qclass in _FILTERED_CLASSES:
            if self.canaries.names:
                label = self.canaries.label(query.name)
                if label is not None:  # answered here, never forwarded; counted only
                    self.canary_counts[label] += 1
                    reply = self.canaries.reply(query.name, query.qtype)
                    respond(self._fit(to_wire(data, query, reply), query, over_tcp))
                    return
            try:
                verdict = self.engine.check_host(query.name, frontend="dns", client=client,
                                                 detail=type_name(query.qtype))
            except InvalidURL:
                verdict = None
            if verdict is not None and verdict.blocked:
                stats["blocked"] += 1
                block = block_answer(data, query, verdict, self.settings)
                respond(self._fit(block, query, over_tcp))
                keep = getattr(respond, "keep_block", None)  # a listener.BlockKeeper
                if keep is not None:
                    keep(data, block, verdict, type_name(query.qtype), query.name)
                self.latency.observe(time.monotonic() - started)
                return
            if self.settings.route_url_hosts_to_proxy and self._routed(query):
                answer = route_answer(data, query, self.settings)
                if answer is not None:
                    stats["routed"] += 1
                    respond(answer)
                    return
        stats["forwarded"] += 1
        self.upstream.forward(data, query.question_end, self._forwarded,
                              (data, query, client, respond, over_tcp, started))

    def _routed(self, query: Query) -> bool:
        try:
            return self.engine.host_has_url_entries(query.name)
        except InvalidURL:
            return False

    # ------------------------------------------------------------ from the UDP listeners
    # (udp.py): the full path for what their fast path could not finish. A bug costs
    # that one packet, never the server.

    def query_udp(self, data: bytes, client: str, respond: Respond) -> None:
        """A UDP query for the full path."""
        try:
            self.handle(data, client, respond, over_tcp=False)
        except Exception as error:
            self.failed("query", error, data, respond, over_tcp=False)

    def answer_udp(self, answer: bytes | None, data: bytes, client: str,
                   respond: Respond) -> None:
        """The upstream's answer to a UDP query (None: none came, or shutting down)."""
        try:
            self.answered(answer, data, parse_query(data), client, respond, False)
        except Exception as error:
            self.failed("answer", error, data, respond, over_tcp=False)

    def retry(self, data: bytes, client: str, respond: Respond) -> None:
        """A UDP query the first upstream did not answer: the next upstreams."""
        try:
            query = parse_query(data)
            self.upstream.forward(data, query.question_end, self._forwarded,
                                  (data, query, client, respond, False, 0.0), attempt=1)
        except Exception as error:
            self.failed("retry", error, data, respond, over_tcp=False)

    def failed(self, where: str, error: Exception, data: bytes, respond: Respond, *,
               over_tcp: bool) -> None:
        """A query our code failed on: counted and reported (FaultLog), answered
        SERVFAIL (with the question when it parses), dropped when no header is
        readable. The client's address is never logged."""
        self.fault(where, error)
        try:
            answer = b""
            if len(data) >= 12 and not data[2] & _QR_OCTET:
                try:
                    answer = error_answer(data, Rcode.SERVFAIL, parse_query(data))
                except FormError:
                    answer = error_answer(data, Rcode.SERVFAIL)
            if answer or over_tcp:  # over TCP, b"" settles the connection's count
                respond(answer)
        except Exception:  # answering failed too: counted once, nothing more to do
            pass

    def _forwarded(self, answer: bytes | None,
                   context: tuple[bytes, Query, str, Respond, bool, float]) -> None:
        data, query, client, respond, over_tcp, started = context
        try:
            self.answered(answer, data, query, client, respond, over_tcp)
        except Exception as error:  # never into the upstream socket's callback
            self.failed("answer", error, data, respond, over_tcp=over_tcp)
        if started:  # 0.0: a retry of the fast path's query, whose start is not known
            self.latency.observe(time.monotonic() - started)

    def answered(self, answer: bytes | None, data: bytes, query: Query, client: str,
                 respond: Respond, over_tcp: bool) -> None:
        """Relay the upstream's answer, blocked if a CNAME leads to a blocked name;
        SERVFAIL when there was none; over TCP again when truncated on a TCP query."""
        if answer is None:
            self.stats["servfail"] += 1
            respond(error_answer(data, Rcode.SERVFAIL, query))
            return
        if over_tcp and answer[2] & _TC_OCTET:  # truncated: fetch it whole over TCP
            task = asyncio.ensure_future(self._answer_over_tcp(data, query, client, respond))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        respond(self._filter_answer(answer, data, query, client, over_tcp))

    async def _answer_over_tcp(self, data: bytes, query: Query, client: str,
                               respond: Respond) -> None:
        try:
            for address in self.upstream.addresses:
                answer = await query_tcp(address, data, self.settings.timeout)
                end = query.question_end
                if (answer is not None and answer[:2] == data[:2]
                        and answer[12:end] == data[12:end]):
                    respond(self._filter_answer(answer, data, query, client, True))
                    return
            self.stats["servfail"] += 1
            respond(error_answer(data, Rcode.SERVFAIL, query))
        except Exception as error:
            self.failed("answer over tcp", error, data, respond, over_tcp=True)

    def _filter_answer(self, answer: bytes, data: bytes, query: Query, client: str,
                       over_tcp: bool) -> bytes:
        """Block an answer whose CNAME chain leads to a blocked name."""
        if answer[6:8] != b"\x00\x00":  # any answer records at all
            try:
                targets = cname_targets(answer, query.question_end)
            except FormError:
                self.stats["upstream_formerr"] += 1
                return error_answer(data, Rcode.SERVFAIL, query)
            for target in targets:
                try:
                    verdict = self.engine.check_host(
                        target, frontend="dns", client=client,
                        detail=f"{type_name(query.qtype)} via CNAME")
                except InvalidURL:
                    continue
                if verdict.blocked:
                    self.stats["blocked_cname"] += 1
                    return self._fit(block_answer(data, query, verdict, self.settings), query,
                                     over_tcp)
                if target in self.canaries.names:  # cached clean, the fast path would
                    self.engine.off_fast_path(target)  # forward the canary itself
        return self._fit(answer, query, over_tcp)

    @staticmethod
    def _fit(answer: bytes, query: Query, over_tcp: bool) -> bytes:
        """Truncate (TC, question only) what does not fit the client's UDP size."""
        if over_tcp or len(answer) <= query.udp_size:
            return answer
        qid, flags = struct.unpack_from("!HH", answer)
        header = struct.pack("!HHHHHH", qid, flags | Flag.TC, 1, 0, 0, 0)
        return header + answer[12 : query.question_end]
