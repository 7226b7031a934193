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
from typing import Any, cast

from dnslib import QTYPE, RCODE

from netfilter.canonical import InvalidURL
from netfilter.config import DnsSettings, parse_hostport
from netfilter.dns.answers import badvers_answer, block_answer, error_answer, route_answer
from netfilter.dns.upstream import UpstreamPool, query_tcp
from netfilter.dns.wire import (
    FormError,
    Query,
    answer_is_plain,
    cname_targets,
    parse_query,
    scan_question,
)
from netfilter.engine import Engine

__all__ = ["DnsServer"]

log = logging.getLogger(__name__)
Respond = Callable[[bytes], None]
TCP_IDLE = 10.0
MAX_TCP_CLIENTS = 512
CLASS_IN, CLASS_ANY = 1, 255
_UNSEEN = object()  # a name not in the engine's host cache


def _qtype_name(qtype: int) -> str:
    return str(QTYPE.get(qtype, f"TYPE{qtype}"))


class _UdpListener(asyncio.DatagramProtocol):
    """One UDP listening socket; clean, common queries take the fast path.

    The fast path is the whole cost of a clean query, so it does the least: the
    question read in C (wire.scan_question), a name the engine's host cache knows to
    be clean (Engine.host_cache), the packet forwarded as it came, and the answer sent
    back when it fits and holds no CNAME (wire.answer_is_plain). Everything else (a
    name seen for the first time included) goes through DnsServer.handle, which
    decides, records, and fills the cache.
    """

    def __init__(self, server: DnsServer) -> None:
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

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            if self.fast:
                question = scan_question(data)
                if (question is not None
                        and self.engine.host_cache.get(question[0], _UNSEEN) is None):
                    stats = self.stats
                    stats["queries"] += 1
                    stats["forwarded"] += 1
                    self.forward(data, question[2], self._answered, (addr, data, question))
                    return
            self.server.handle(data, str(addr[0]), self._responder(addr), over_tcp=False)
        except Exception:  # a bug must cost one query, never the server
            self.stats["internal_errors"] += 1
            log.exception("query from %s failed", addr[0])

    def _answered(self, answer: bytes | None, context: tuple[Any, ...]) -> None:
        addr, data, question = context
        if (answer is not None and len(answer) <= question[3]
                and (answer[6:8] == b"\x00\x00" or answer_is_plain(answer, question[2]))):
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.sendto(answer, addr)
            return
        # No answer, one too big for the client, or CNAMEs to check: the full path.
        try:
            self.server.answered(answer, data, parse_query(data), str(addr[0]),
                                 self._responder(addr), False)
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("answer to %s failed", addr[0])

    def _responder(self, addr: tuple[str | int, ...]) -> Respond:
        transport = self.transport
        assert transport is not None

        def respond(answer: bytes) -> None:
            if not transport.is_closing():
                transport.sendto(answer, addr)

        return respond


class DnsServer:
    """Serves DNS on the configured addresses until stopped."""

    def __init__(self, engine: Engine, settings: DnsSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.stats: Counter[str] = Counter()
        self.upstream = UpstreamPool(list(settings.upstreams), settings.timeout, self.stats)
        self._transports: list[asyncio.BaseTransport] = []
        self._tcp_servers: list[asyncio.base_events.Server] = []
        self._tcp_clients: set[asyncio.Task[None]] = set()
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self._background: set[asyncio.Future[None]] = set()
        self.addresses: list[tuple[str, int]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.upstream.start()
        for listen in self.settings.listen:
            host, port = parse_hostport(listen, any_port=True)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpListener(self), local_addr=(host, port))
            self._transports.append(transport)
            port = transport.get_extra_info("sockname")[1]  # port 0: the one chosen
            server = await asyncio.start_server(self._tcp_client, host, port,
                                                reuse_address=True)
            self._tcp_servers.append(server)
            self.addresses.append((host, port))
            log.info("dns: serving on %s port %d (udp, tcp)", host, port)

    async def stop(self) -> None:
        for server in self._tcp_servers:
            server.close()
        for writer in list(self._tcp_writers):
            writer.close()  # the handlers see EOF and end (cancelling logs on 3.11)
        if self._tcp_clients:
            await asyncio.wait(list(self._tcp_clients), timeout=1.0)
        for transport in self._transports:
            transport.close()
        await self.upstream.stop()

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
