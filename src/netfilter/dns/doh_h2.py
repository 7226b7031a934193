"""DoH over HTTP/2, with h2 doing the framing, HPACK and flow control.

Each stream is one request; many are answered at once, in the order the answers come.
Bounded: streams open at once (`dns.doh_max_streams`, advertised in SETTINGS; h2 ends
a connection that opens more), a header list of at most 16 KiB, a body of at most
65535 octets per stream (past it: 413 for that stream), requests per connection
(`dns.tcp_max_queries`, then GOAWAY), idle time and lifetime; and by
`dns.tcp_max_buffer` both the unfinished request bodies of all streams together and the
answer bytes the client has not read (past either, the connection is dropped). A
protocol error ends the connection with GOAWAY, as h2 decides.
"""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from netfilter.dns.dohrequest import (
    MAX_HEADERS,
    MAX_MESSAGE,
    MAX_TARGET,
    DohAnswerer,
    response_headers,
)
from netfilter.dns.streamslots import Held

__all__ = ["serve_h2"]

READ = 64 * 1024


class _Request:
    __slots__ = ("body", "content_type", "method", "refused", "target")

    def __init__(self, method: str, target: str, content_type: str | None) -> None:
        self.method = method
        self.target = target
        self.content_type = content_type
        self.body = bytearray()
        self.refused = False  # answered already (413): the rest of its body is dropped


class _Session:
    """One HTTP/2 connection."""

    def __init__(self, listener: DohAnswerer, writer: asyncio.StreamWriter,
                 held: Held) -> None:
        self.listener = listener
        self.writer = writer
        self.held = held
        self.stats = listener.stats
        settings = listener.settings
        self.max_buffer = settings.tcp_max_buffer
        self.max_requests = settings.tcp_max_queries
        self.requests = 0
        # Our own response headers are well-formed: h2 need not check and normalize them.
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.doh_max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADERS,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.pending: dict[int, _Request] = {}  # streams whose request is not whole yet
        self.outgoing: dict[int, bytes] = {}  # answer bytes waiting for window
        self.answering: set[int] = set()  # streams asked, not answered yet
        self.settled = asyncio.Event()  # none being answered
        self.settled.set()
        self.goaway = False

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
            if self.writer.transport.get_write_buffer_size() > self.max_buffer:
                self.stats["doh_dropped_unread"] += 1
                self.writer.transport.abort()

    def received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self._request(event)
            elif isinstance(event, h2.events.DataReceived):
                self._data(event)
            elif isinstance(event, h2.events.StreamEnded):
                self._ended(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.pending.pop(event.stream_id, None)
                self.outgoing.pop(event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated):
                self._send_waiting()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = True
        self.flush()

    def _request(self, event: h2.events.RequestReceived) -> None:
        headers: dict[bytes, bytes] = {}
        for name, value in event.headers or ():
            headers[bytes(name)] = bytes(value)
        stream_id = event.stream_id
        method = headers.get(b":method", b"").decode("ascii", "replace")
        target = headers.get(b":path", b"").decode("ascii", "replace")
        content_type = headers.get(b"content-type")
        request = _Request(method, target, None if content_type is None
                           else content_type.decode("latin-1"))
        self.requests += 1
        if self.requests >= self.max_requests and not self.goaway:
            self.stats["doh_closed_max_queries"] += 1
            self.h2.close_connection(last_stream_id=stream_id)
            self.goaway = True
        length = headers.get(b"content-length", b"0")
        if len(target) > MAX_TARGET or (length.isdigit() and int(length) > MAX_MESSAGE):
            request.refused = True
            self._reply(stream_id, 413, b"a DNS message has at most 65535 octets\n")
            self.stats["doh_http_413"] += 1
        self.pending[stream_id] = request
        if event.stream_ended is not None:
            self._ended(stream_id)

    def _data(self, event: h2.events.DataReceived) -> None:
        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        request = self.pending.get(event.stream_id)
        if request is None or request.refused or self.writer.is_closing():
            return
        request.body += event.data or b""
        if len(request.body) > MAX_MESSAGE:
            request.refused = True
            request.body = bytearray()
            self.stats["doh_http_413"] += 1
            self._reply(event.stream_id, 413, b"a DNS message has at most 65535 octets\n")
        elif sum(len(r.body) for r in self.pending.values()) > self.max_buffer:
            # Bodies of requests not whole yet, all streams together: bounded like the
            # answers a client has not read (at most doh_max_streams entries to add up).
            self.stats["doh_dropped_unfinished"] += 1
            self.writer.transport.abort()

    def _ended(self, stream_id: int) -> None:
        request = self.pending.pop(stream_id, None)
        if request is None or request.refused:
            return
        self.answering.add(stream_id)
        self.settled.clear()

        def deliver(status: int, body: bytes) -> None:
            if stream_id not in self.answering:
                return
            self.answering.discard(stream_id)
            if not self.answering:
                self.settled.set()
            self._reply(stream_id, status, body)
            self.flush()

        self.listener.answer(request.method, request.target, request.content_type,
                             bytes(request.body), self.held, deliver)

    def _reply(self, stream_id: int, status: int, body: bytes) -> None:
        headers = [(":status", str(status)), *response_headers(status, body)]
        try:
            self.h2.send_headers(stream_id, headers, end_stream=not body)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return  # the client reset the stream meanwhile
        if body:
            self.outgoing[stream_id] = body
            self._send_waiting()

    def _send_waiting(self) -> None:
        """Send what the flow-control windows allow of the waiting answers."""
        for stream_id, body in list(self.outgoing.items()):
            try:
                while body:
                    window = self.h2.local_flow_control_window(stream_id)
                    size = min(window, self.h2.max_outbound_frame_size, len(body))
                    if size <= 0:
                        break
                    self.h2.send_data(stream_id, body[:size], end_stream=size == len(body))
                    body = body[size:]
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                body = b""
            if body:
                self.outgoing[stream_id] = body
            else:
                del self.outgoing[stream_id]


async def serve_h2(listener: DohAnswerer, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, held: Held) -> None:
    settings, stats = listener.settings, listener.stats
    loop = asyncio.get_running_loop()
    end_of_life = loop.time() + settings.tcp_max_lifetime
    session = _Session(listener, writer, held)
    session.h2.initiate_connection()
    session.flush()

    def limit(seconds: float) -> asyncio.Timeout:
        return asyncio.timeout_at(min(loop.time() + seconds, end_of_life))

    try:
        while not session.goaway:
            async with limit(settings.tcp_idle_timeout):
                data = await reader.read(READ)
            if not data:
                break
            held.touch()
            session.received(data)
            async with limit(settings.tcp_idle_timeout):
                await writer.drain()
    except h2.exceptions.ProtocolError:
        stats["doh_h2_protocol_error"] += 1
        session.goaway = True
        session.flush()  # h2's GOAWAY
    except ConnectionError:
        return
    except TimeoutError:
        stats["doh_closed_lifetime" if loop.time() >= end_of_life else "doh_closed_idle"] += 1
        session.h2.close_connection()
        session.flush()
    # Answer what is in flight, then close.
    try:
        if not writer.is_closing():
            async with asyncio.timeout(settings.timeout + 0.5):
                await session.settled.wait()
                while session.outgoing and not writer.is_closing():
                    data = await reader.read(READ)  # window updates for the rest
                    if not data:
                        break
                    session.received(data)
                if not session.goaway:
                    session.h2.close_connection()
                    session.flush()
                await writer.drain()
    except (TimeoutError, ConnectionError, h2.exceptions.ProtocolError):
        pass
