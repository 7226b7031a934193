"""DNS over TLS (RFC 7858): the TCP listener's framing and limits inside TLS.

Each message is a two-octet length and the message (RFC 1035 4.2.2), pipelined: the
answers go out in the order they are ready (RFC 7766 6.2.1.1). Per connection, as over
TCP: queries in flight (`dns.tcp_pipeline`), idle time, lifetime, query count, and the
answer bytes the client has not read (`dns.tcp_max_buffer`, past it the connection is
dropped). An answer to a query that carried the EDNS padding option is padded to a
multiple of 468 octets (RFC 8467).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections import Counter

from netfilter.config import DnsSettings
from netfilter.dns.asking import Handler, Respond, ask
from netfilter.dns.padding import pad, wants_padding
from netfilter.dns.streamslots import Flight, Held, StreamSlots
from netfilter.dns.tlsaccept import TlsAcceptor

__all__ = ["DotListener"]

_LENGTH = struct.Struct("!H")


class _Pipeline:
    """The queries in flight on one connection, and the writer their answers go to."""

    def __init__(self, writer: asyncio.StreamWriter, held: Held, settings: DnsSettings,
                 stats: Counter[str]) -> None:
        self.writer = writer
        self.flight = Flight(held, settings.tcp_pipeline)
        self.max_buffer = settings.tcp_max_buffer
        self.stats = stats
        self.unsent: list[bytes] = []  # answers ready, written together (one TLS record)

    def responder(self, padded: bool) -> Respond:
        """A new query's respond: effective once; pads when the query asked for it."""
        end = self.flight.begin()

        def respond(answer: bytes) -> None:
            if not end():
                return
            if answer and not self.writer.is_closing():
                if padded:
                    answer = pad(answer)
                if not self.unsent:
                    asyncio.get_running_loop().call_soon(self.flush)
                self.unsent += (_LENGTH.pack(len(answer)), answer)

        return respond

    def flush(self) -> None:
        """Write the answers made ready since the last flush at once: a pipelined
        burst costs one TLS record and one system call, not one per answer."""
        writer, data = self.writer, b"".join(self.unsent)
        self.unsent.clear()
        if data and not writer.is_closing():
            writer.write(data)
            if writer.transport.get_write_buffer_size() > self.max_buffer:
                self.stats["dot_dropped_unread"] += 1
                writer.transport.abort()


class DotListener:
    """DoT on the `dns.dot_listen` sockets, answering through `resolver`."""

    def __init__(self, resolver: Handler, settings: DnsSettings, context: ssl.SSLContext,
                 stats: Counter[str]) -> None:
        self.resolver = resolver
        self.settings = settings
        self.stats = stats
        slots = StreamSlots(settings.tcp_max_connections, settings.tcp_per_client, stats,
                            "dot")
        self.acceptor = TlsAcceptor(context, slots, self.session,
                                    handshake_timeout=settings.tls_handshake_timeout,
                                    stats=stats, prefix="dot", fault=resolver.fault)

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      held: Held) -> None:
        settings, stats = self.settings, self.stats
        loop = asyncio.get_running_loop()
        end_of_life = loop.time() + settings.tcp_max_lifetime
        pipeline = _Pipeline(writer, held, settings, stats)

        def limit(seconds: float) -> asyncio.Timeout:
            return asyncio.timeout_at(min(loop.time() + seconds, end_of_life))

        try:
            for _ in range(settings.tcp_max_queries):
                if not pipeline.flight.room.is_set():  # answers come within the timeout
                    async with limit(settings.timeout + 1.0):
                        await pipeline.flight.room.wait()
                async with limit(settings.tcp_idle_timeout):
                    length = _LENGTH.unpack(await reader.readexactly(2))[0]
                    data = await reader.readexactly(length)
                held.touch()
                stats["dot_queries"] += 1
                ask(self.resolver, data, held.client,
                    pipeline.responder(wants_padding(data)), "dot query")
                async with limit(settings.tcp_idle_timeout):
                    await writer.drain()  # a client that does not read: closed at idle
            else:
                stats["dot_closed_max_queries"] += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except TimeoutError:
            stats["dot_closed_lifetime" if loop.time() >= end_of_life
                  else "dot_closed_idle"] += 1
        finally:
            # A client may half-close after its last query: answer what is in flight.
            try:
                if not writer.is_closing():
                    async with asyncio.timeout(settings.timeout + 0.5):
                        await pipeline.flight.settled.wait()
                        pipeline.flush()
                        await writer.drain()
            except (TimeoutError, ConnectionError):
                pass
