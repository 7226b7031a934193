"""The filtering resolver: asyncio UDP and TCP listeners in front of the upstream pool.

Per query: parse the header and question by hand (wire.py), ask the engine about the
name, and either answer the block (answers.py) or forward the packet as it came
(only the id is rewritten). Upstream answers are scanned for CNAME targets, so a
clean name that aliases a blocked one is blocked too. A malformed packet is answered
FORMERR when its header is readable and dropped otherwise; either way it is counted
and the server goes on.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import Counter
from collections.abc import Callable

from dnslib import QTYPE, RCODE

from netfilter.canonical import InvalidURL
from netfilter.config import DnsSettings, parse_hostport
from netfilter.dns.answers import badvers_answer, block_answer, error_answer, route_answer
from netfilter.dns.udp import PythonListener, RelayListener, relay_available
from netfilter.dns.upstream import SWEEP_INTERVAL, UpstreamPool, query_tcp
from netfilter.dns.wire import FormError, Query, cname_targets, parse_query
from netfilter.engine import Engine

__all__ = ["DnsServer"]

log = logging.getLogger(__name__)
Respond = Callable[[bytes], None]
TCP_IDLE = 10.0
MAX_TCP_CLIENTS = 512
CLASS_IN, CLASS_ANY = 1, 255


def _qtype_name(qtype: int) -> str:
    return str(QTYPE.get(qtype, f"TYPE{qtype}"))


class DnsServer:
    """Serves DNS on the configured addresses until stopped."""

    def __init__(self, engine: Engine, settings: DnsSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.stats: Counter[str] = Counter()
        self.upstream = UpstreamPool(list(settings.upstreams), settings.timeout, self.stats)
        self._listeners: list[PythonListener | RelayListener] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._tcp_servers: list[asyncio.base_events.Server] = []
        self._tcp_clients: set[asyncio.Task[None]] = set()
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self._background: set[asyncio.Future[None]] = set()
        self.addresses: list[tuple[str, int]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.upstream.start()
        # The C relay where it is built; the Python listener where routing to the
        # proxy needs a second look-up per name (udp.py).
        relay = relay_available() and not self.settings.route_url_hosts_to_proxy
        for listen in self.settings.listen:
            host, port = parse_hostport(listen, any_port=True)
            listener: PythonListener | RelayListener
            if relay:
                listener = RelayListener.open(self, host, port)
                port = listener.port  # port 0: the one chosen
            else:
                transport, listener = await loop.create_datagram_endpoint(
                    lambda: PythonListener(self), local_addr=(host, port))
                port = transport.get_extra_info("sockname")[1]
            self._listeners.append(listener)
            server = await asyncio.start_server(self._tcp_client, host, port,
                                                reuse_address=True)
            self._tcp_servers.append(server)
            self.addresses.append((host, port))
            log.info("dns: serving on %s port %d (udp%s, tcp)", host, port,
                     " by the C relay" if relay else "")
        if relay:
            self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        for server in self._tcp_servers:
            server.close()
        for writer in list(self._tcp_writers):
            writer.close()  # the handlers see EOF and end (cancelling logs on 3.11)
        if self._tcp_clients:
            await asyncio.wait(list(self._tcp_clients), timeout=1.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
        for listener in self._listeners:
            listener.close()
        await self.upstream.stop()
        log.info("dns: stopped; %s", ", ".join(f"{key} {value}" for key, value
                                              in sorted(self.counts().items())))

    def counts(self) -> dict[str, int]:
        """What happened to the packets so far: the full path's and the relays'."""
        counts = Counter(self.stats)
        for listener in self._listeners:
            counts.update(listener.counts())
        return dict(counts)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            for listener in self._listeners:
                listener.sweep()

    # ------------------------------------------------------------ per query

    def handle(self, data: bytes, client: str, respond: Respond, *, over_tcp: bool) -> None:
        stats = self.stats
        stats["queries"] += 1
        if len(data) < 12 or data[2] & 0x80:  # no readable header, or a response
            stats["dropped"] += 1
            if over_tcp:
                respond(b"")  # settles the connection's count; nothing is sent
            return
        try:
            query = parse_query(data)
        except FormError:
            stats["formerr"] += 1
            respond(error_answer(data, RCODE.FORMERR))
            return
        if (query.flags >> 11) & 0xF:  # only standard queries are filtered or forwarded
            stats["notimp"] += 1
            respond(error_answer(data, RCODE.NOTIMP, query))
            return
        if query.edns_version:  # RFC 6891 6.1.3: we speak EDNS version 0 only
            stats["badvers"] += 1
            respond(badvers_answer(data, query))
            return
        if query.name and query.qclass in (CLASS_IN, CLASS_ANY):
            try:
                verdict = self.engine.check_host(query.name, frontend="dns", client=client,
                                                 detail=_qtype_name(query.qtype))
            except InvalidURL:
                verdict = None
            if verdict is not None and verdict.blocked:
                stats["blocked"] += 1
                respond(self._fit(block_answer(data, query, verdict, self.settings), query,
                                  over_tcp))
                return
            if self.settings.route_url_hosts_to_proxy and self._routed(query):
                answer = route_answer(data, query, self.settings)
                if answer is not None:
                    stats["routed"] += 1
                    respond(answer)
                    return
        stats["forwarded"] += 1
        self.upstream.forward(data, query.question_end, self._forwarded,
                              (data, query, client, respond, over_tcp))

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
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("query from %s failed", client)

    def answer_udp(self, answer: bytes | None, data: bytes, client: str,
                   respond: Respond) -> None:
        """The upstream's answer to a UDP query (None: none came, or shutting down)."""
        try:
            self.answered(answer, data, parse_query(data), client, respond, False)
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("answer to %s failed", client)

    def retry(self, data: bytes, client: str, respond: Respond) -> None:
        """A UDP query the first upstream did not answer: the next upstreams."""
        try:
            query = parse_query(data)
            self.upstream.forward(data, query.question_end, self._forwarded,
                                  (data, query, client, respond, False), attempt=1)
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("retry for %s failed", client)

    def _forwarded(self, answer: bytes | None,
                   context: tuple[bytes, Query, str, Respond, bool]) -> None:
        self.answered(answer, *context)

    def answered(self, answer: bytes | None, data: bytes, query: Query, client: str,
                 respond: Respond, over_tcp: bool) -> None:
        """Relay the upstream's answer, blocked if a CNAME leads to a blocked name;
        SERVFAIL when there was none; over TCP again when truncated on a TCP query."""
        if answer is None:
            self.stats["servfail"] += 1
            respond(error_answer(data, RCODE.SERVFAIL, query))
            return
        if over_tcp and answer[2] & 0x02:  # truncated: fetch it whole over TCP
            task = asyncio.ensure_future(self._answer_over_tcp(data, query, client, respond))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        respond(self._filter_answer(answer, data, query, client, over_tcp))

    async def _answer_over_tcp(self, data: bytes, query: Query, client: str,
                               respond: Respond) -> None:
        for address in self.upstream.addresses:
            answer = await query_tcp(address, data, self.settings.timeout)
            end = query.question_end
            if answer is not None and answer[:2] == data[:2] and answer[12:end] == data[12:end]:
                respond(self._filter_answer(answer, data, query, client, True))
                return
        self.stats["servfail"] += 1
        respond(error_answer(data, RCODE.SERVFAIL, query))

    def _filter_answer(self, answer: bytes, data: bytes, query: Query, client: str,
                       over_tcp: bool) -> bytes:
        """Block an answer whose CNAME chain leads to a blocked name."""
        if answer[6:8] != b"\x00\x00":  # any answer records at all
            try:
                targets = cname_targets(answer, query.question_end)
            except FormError:
                self.stats["upstream_formerr"] += 1
                return error_answer(data, RCODE.SERVFAIL, query)
            for target in targets:
                try:
                    verdict = self.engine.check_host(
                        target, frontend="dns", client=client,
                        detail=f"{_qtype_name(query.qtype)} via CNAME")
                except InvalidURL:
                    continue
                if verdict.blocked:
                    self.stats["blocked_cname"] += 1
                    return self._fit(block_answer(data, query, verdict, self.settings), query,
                                     over_tcp)
        return self._fit(answer, query, over_tcp)

    @staticmethod
    def _fit(answer: bytes, query: Query, over_tcp: bool) -> bytes:
        """Truncate (TC, question only) what does not fit the client's UDP size."""
        if over_tcp or len(answer) <= query.udp_size:
            return answer
        qid, flags = struct.unpack_from("!HH", answer)
        header = struct.pack("!HHHHHH", qid, flags | 0x0200, 1, 0, 0, 0)
        return header + answer[12 : query.question_end]

    # ------------------------------------------------------------ TCP

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._tcp_clients) >= MAX_TCP_CLIENTS or task is None:
            writer.close()
            return
        self._tcp_clients.add(task)
        self._tcp_writers.add(writer)
        client = str(writer.get_extra_info("peername", ("?",))[0])
        outstanding = 0
        all_answered = asyncio.Event()
        all_answered.set()

        def respond(answer: bytes) -> None:
            nonlocal outstanding
            outstanding -= 1
            if outstanding == 0:
                all_answered.set()
            if answer and not writer.is_closing():
                writer.write(struct.pack("!H", len(answer)) + answer)

        try:
            while True:
                async with asyncio.timeout(TCP_IDLE):
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                    data = await reader.readexactly(length)
                outstanding += 1
                all_answered.clear()
                try:
                    self.handle(data, client, respond, over_tcp=True)
                except Exception:
                    self.stats["internal_errors"] += 1
                    log.exception("tcp query from %s failed", client)
                    respond(error_answer(data, RCODE.SERVFAIL) if len(data) >= 12 else b"")
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # Shutting down: end quietly (Python 3.11's start_server logs a cancelled
            # handler as an error).
            all_answered.set()
        finally:
            # A client may half-close after its last query: answer what is in flight.
            try:
                async with asyncio.timeout(self.settings.timeout + 0.5):
                    await all_answered.wait()
                    await writer.drain()
            except (TimeoutError, ConnectionError):
                pass
            self._tcp_clients.discard(task)
            self._tcp_writers.discard(writer)
            writer.close()
