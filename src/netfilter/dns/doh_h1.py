"""DoH over HTTP/1.1, with h11 doing the HTTP: one request at a time per connection
(keep-alive; pipelined requests are read one after the other).

Bounded as the DoT connection is: idle time between requests, lifetime, requests per
connection; a request head of at most 16 KiB, a body of at most 65535 octets (past it:
413 and the connection closes, its body unread). A request h11 cannot parse gets 400
and the connection closes.
"""

from __future__ import annotations

import asyncio

import h11

from netfilter.dns.dohrequest import (
    MAX_HEADERS,
    MAX_MESSAGE,
    MAX_TARGET,
    DohAnswerer,
    response_headers,
)
from netfilter.dns.streamslots import Held

__all__ = ["serve_h1"]

READ = 16 * 1024


class _Closing(Exception):
    """End the connection after what has been sent."""


async def serve_h1(listener: DohAnswerer, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, held: Held) -> None:
    settings, stats = listener.settings, listener.stats
    loop = asyncio.get_running_loop()
    end_of_life = loop.time() + settings.tcp_max_lifetime
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)

    def limit(seconds: float) -> asyncio.Timeout:
        return asyncio.timeout_at(min(loop.time() + seconds, end_of_life))

    async def next_event() -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            event = connection.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with limit(settings.tcp_idle_timeout):
                data = await reader.read(READ)
            connection.receive_data(data)  # b"": the client closed its side

    def send(status: int, body: bytes, *, close: bool = False) -> None:
        headers = response_headers(status, body)
        if close:
            headers.append(("connection", "close"))
        writer.write(connection.send(h11.Response(status_code=status, headers=headers))
                     or b"")
        writer.write(connection.send(h11.Data(data=body)) or b"")
        writer.write(connection.send(h11.EndOfMessage()) or b"")

    try:
        for _ in range(settings.tcp_max_queries):
            event = await next_event()
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                raise h11.RemoteProtocolError("expected a request")
            held.touch()
            target = event.target.decode("ascii", "replace")
            method = event.method.decode("ascii", "replace")
            content_type = None
            length = None
            for name, value in event.headers:
                if name == b"content-type":
                    content_type = value.decode("latin-1")
                elif name == b"content-length":
                    length = int(value)  # h11 checked it is a number
            if len(target) > MAX_TARGET or (length or 0) > MAX_MESSAGE:
                stats["doh_http_413"] += 1
                send(413, b"a DNS message has at most 65535 octets\n", close=True)
                raise _Closing
            body = bytearray()
            while True:
                part = await next_event()
                if isinstance(part, h11.Data):
                    body += part.data
                    if len(body) > MAX_MESSAGE:
                        stats["doh_http_413"] += 1
                        send(413, b"a DNS message has at most 65535 octets\n", close=True)
                        raise _Closing
                elif isinstance(part, h11.EndOfMessage):
                    break
                else:  # the client closed in the middle of a body
                    return
            answered: asyncio.Future[tuple[int, bytes]] = loop.create_future()

            def deliver(status: int, body: bytes,
                        answered: asyncio.Future[tuple[int, bytes]] = answered) -> None:
                if not answered.done():
                    answered.set_result((status, body))

            listener.answer(method, target, content_type, bytes(body), held, deliver)
            async with asyncio.timeout(settings.timeout + 1.0):
                status, answer = await answered
            send(status, answer)
            async with limit(settings.tcp_idle_timeout):
                await writer.drain()
            if connection.our_state is h11.MUST_CLOSE:
                return
            connection.start_next_cycle()
        else:
            stats["doh_closed_max_queries"] += 1
    except h11.RemoteProtocolError:
        stats["doh_http_400"] += 1
        if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                send(400, b"malformed HTTP request\n", close=True)
            except h11.LocalProtocolError:
                return
    except _Closing:
        pass
    except (ConnectionError, ValueError):
        return
    except TimeoutError:
        stats["doh_closed_lifetime" if loop.time() >= end_of_life else "doh_closed_idle"] += 1
        return
    try:  # what was sent last goes out before the close
        async with asyncio.timeout(settings.tcp_idle_timeout):
            await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
