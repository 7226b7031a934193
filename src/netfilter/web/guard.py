"""The guard: what stands between a socket and the web stack's protocol (uvicorn's).

General web servers give a connection its first request head for as long as it likes
and read heads of any size (uvicorn with httptools has neither a head deadline nor a
head limit): a slowloris holds them. Every connection of the node's web stack is
therefore admitted by `netfilter.slots` (a total, a per-client cap, the oldest idle
connection evicted for a new one, short deadlines when busy), and each request head is
buffered here, at most `MAX_HEAD` bytes within its deadline, read strictly
(`head.parse_head`) and only then handed, in canonical form, to the stack; what cannot
be read is answered here (400, 408, 431, 505) and closed. The stack's protocol is made
for a connection only when its first head is whole: slow clients never reach it.

A connection may be given a number of requests (`max_requests`): the last is handed
over with `Connection: close`, so the stack answers it and closes.

A request body goes to the stack only where the route wants it (`keeps_body`), at most
`max_body` bytes; the stop page never reads one, so its bodies are dropped here. When
the stack closes a connection, the guard half-closes and drains briefly first: closing
with unread data would reset the connection and could lose the answer.

A client that stops reading its answer (our send buffer full for `answer_timeout`) is
dropped; a connection evicted or timed out while answers it has not taken are queued
is reset at once, and one closed after its last answer gets `answer_timeout` to take
what is queued: a close would otherwise wait for the client to read, holding the slot
for as long as it likes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable
from email.utils import formatdate
from typing import Any, cast

from netfilter.slots import Slot, Slots, close_within, end_connection
from netfilter.web.head import (
    MAX_HEAD,
    Refused,
    Request,
    canonical,
    check_first_line,
    head_end,
    parse_head,
)

__all__ = ["LINGER_BYTES", "LINGER_TIME", "MAX_BODY", "Guard", "error_answer"]

log = logging.getLogger(__name__)

LINGER_TIME = 1.0  # after answering, drain what the client still sends, this long
LINGER_BYTES = 65536
MAX_BODY = 65536  # bytes of a request body a route that reads one may get
STATUS_TEXT = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
               431: "Request Header Fields Too Large", 505: "HTTP Version Not Supported"}


def error_answer(status: int) -> bytes:
    """A complete short answer that closes the connection."""
    body = f"{status} {STATUS_TEXT[status]}\n".encode("ascii")
    return ("\r\n".join([f"HTTP/1.1 {status} {STATUS_TEXT[status]}",
                         f"Date: {formatdate(usegmt=True)}",
                         "Content-Type: text/plain; charset=utf-8", "Cache-Control: no-store",
                         "X-Content-Type-Options: nosniff", f"Content-Length: {len(body)}",
                         "Connection: close", "", ""]).encode("ascii") + body)


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY: the stack writes an answer's head and body apart, and with Nagle's
    algorithm on, a kept-alive connection's body waits for the client's delayed ACK
    (40 ms). uvloop sets it on every TCP connection; asyncio's own loop only on sockets
    it opened itself, not on ours (bound before the loop: proto 0)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Timer:
    """A head deadline on the loop's clock (slots.Deadline) that calls `fire` once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float,
                 fire: Callable[[], None]) -> None:
        self._loop, self._fire, self._when = loop, fire, when
        self._handle = loop.call_at(when, self._expire)
        self._expired = False

    def _expire(self) -> None:
        self._expired = True
        self._fire()

    def when(self) -> float | None:
        return self._when

    def reschedule(self, when: float | None) -> None:
        self._handle.cancel()
        if when is not None:
            self._when = when
            self._handle = self._loop.call_at(when, self._expire)

    def expired(self) -> bool:
        return self._expired

    def cancel(self) -> None:
        self._handle.cancel()


class _InnerTransport:
    """The transport the stack's protocol sees: the real one, except that closing it
    lingers first (see the module)."""

    def __init__(self, real: asyncio.Transport, guard: Guard) -> None:
        self._real = real
        self._guard = guard

    def close(self) -> None:
        self._guard.linger()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._real.write(data)
        self._guard.answered()

    def is_closing(self) -> bool:
        return self._real.is_closing() or self._guard.closing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class Guard(asyncio.Protocol):
    """One connection: admission, strict heads, bounded bodies, then the stack."""

    def __init__(self, inner: Callable[[], asyncio.Protocol], slots: Slots,
                 stats: Counter[str], *, keeps_body: Callable[[Request], bool],
                 registry: set[Guard], max_body: int = MAX_BODY,
                 answer_silent: bool = False, max_requests: int = 0,
                 answer_timeout: float = 30.0) -> None:
        self._make_inner = inner
        self._slots = slots
        self._stats = stats
        self._keeps_body = keeps_body
        self._registry = registry
        self._max_body = max_body
        self._answer_silent = answer_silent  # a 408 also to one that sent nothing
        self._max_requests = max_requests  # per connection; 0: as many as it likes
        self._answer_timeout = answer_timeout
        self._stalled: asyncio.TimerHandle | None = None  # while the client reads nothing
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._slot: Slot | None = None
        self._timer: _Timer | None = None
        self._buffer = b""
        self._line_checked = False  # the request line of the head being read
        self._body = 0  # body bytes still to come of the request handed over
        self._forward_body = False
        self._discard_all = False  # a body without a length: dropped until the end
        self._handed = 0  # requests handed to the stack on this connection
        self._awaiting = False  # the last one handed has no answer yet
        self._drained = 0  # bytes dropped while lingering
        self.closing = False
        # slots.Watch
        self.heard = False
        self.complete = False
        self.on_first: Callable[[], object] | None = None

    def rearm(self) -> None:
        self.complete = False

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self._transport = transport = cast(asyncio.Transport, transport)
        self._registry.add(self)
        _no_delay(transport)
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self._stats["connections"] += 1
        self._slot = self._slots.admit(client, self, self._evicted)
        if self._slot is None:
            transport.abort()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.closing or self._slot is None:  # lingering or refused: dropped
            self._drained += len(data)
            if self._drained > LINGER_BYTES and self._transport is not None:
                self._transport.close()
            return
        if not self.heard:
            self.heard = True
            if self.on_first is not None:
                self.on_first()
            if self.closing:
                return
        if self._discard_all:
            return
        while data and not self.closing:
            if self._body:
                part, data = data[:self._body], data[self._body:]
                self._body -= len(part)
                if self._forward_body and self._inner is not None:
                    self._inner.data_received(part)
                continue
            data = self._head(data)

    def eof_received(self) -> bool | None:
        if self._handed == 0 and self._buffer.strip(b"\r\n") and not self.closing:
            self._refuse(Refused(400, "incomplete request"))
            return True
        if self._inner is not None and self._awaiting and not self.closing:
            self._inner.eof_received()
            return True  # a request in hand: the stack answers it (then the client closes)
        return None  # nothing asked, or answered: end the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._registry.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._stalled is not None:
            self._stalled.cancel()
        if self._slot is not None:
            self._slots.release(self._slot)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._stalled is None:
            self._stalled = asyncio.get_running_loop().call_later(
                self._answer_timeout, self._not_reading)
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        if self._inner is not None:
            self._inner.resume_writing()

    def _not_reading(self) -> None:
        self._stats["answer_timeout"] += 1
        self.shutdown()

    # ------------------------------------------------------------ heads

    def _head(self, data: bytes) -> bytes:
        """Take bytes of a head; hand a whole one over. Returns what follows it."""
        if 0 < self._max_requests <= self._handed:  # after the last: dropped
            return b""
        if self._timer is None:  # a later head on a kept-alive connection begins
            self._arm()
        seen = len(self._buffer)  # scanned already: a head trickled in is scanned once
        self._buffer += data
        end = head_end(self._buffer, seen)
        try:
            if end == -2:
                raise Refused(400, "malformed request")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    raise Refused(431, "request head too large")
                if not self._line_checked and b"\n" in data:
                    self._line_checked = True
                    check_first_line(self._buffer.lstrip(b"\r\n"))
                return b""
            head, rest = self._buffer[:end], self._buffer[end:]
            self._buffer, self._line_checked = b"", False
            request = parse_head(head)
            length = self._body_length(request)
        except Refused as e:
            self._refuse(e)
            return b""
        self.complete = True
        if self._slot is not None:
            self._slot.reading = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        keep = self._keeps_body(request)
        if length is None:  # chunked or unknown: the stop page drops it (and closes)
            if keep:
                self._refuse(Refused(400, "a body without Content-Length"))
                return b""
            self._discard_all = True
        elif keep and length > self._max_body:
            self._refuse(Refused(413, "request body too large"))
            return b""
        self._body, self._forward_body = (length or 0), keep
        self._hand(request, head, keep)
        return b"" if self._discard_all else rest

    @staticmethod
    def _body_length(request: Request) -> int | None:
        if request.get("transfer-encoding"):
            return None
        lengths = set(request.get("content-length"))
        if not lengths:
            return 0
        if len(lengths) > 1 or not next(iter(lengths)).isdigit():
            raise Refused(400, "bad Content-Length")
        return int(next(iter(lengths)))

    def _hand(self, request: Request, head: bytes, keep: bool) -> None:
        """Give the stack the head: as received when it is in canonical form already
        (CRLF, origin-form, no body dropped here), else rewritten (`head.canonical`)."""
        dropped = not keep and bool(request.get("content-length"))
        last = 0 < self._max_requests <= self._handed + 1  # the stack answers, then closes
        if (dropped or last or not request.target.startswith("/")
                or head[:1] in (b"\r", b"\n") or head.count(b"\n") != head.count(b"\r\n")):
            if dropped:
                request = Request(request.method, request.target, request.version,
                                  request.fields,
                                  [f for f in request.raw if f[0] != b"content-length"])
            if last:
                request = Request(
                    request.method, request.target, request.version,
                    [*(f for f in request.fields if f[0] != "connection"), ("connection", "close")],
                    [*(f for f in request.raw if f[0] != b"connection"), (b"connection", b"close")])
            head = canonical(request)
        if self._inner is None:
            assert self._transport is not None
            self._inner = self._make_inner()
            self._inner.connection_made(_InnerTransport(self._transport, self))  # type: ignore[arg-type]
        self._handed += 1
        self._awaiting = True
        self._inner.data_received(head)

    def _refuse(self, e: Refused) -> None:
        self._stats[f"status_{e.status}"] += 1  # counted; never logged per request
        if self._awaiting:  # the stack is answering an earlier request: just end it
            self._abort()
            return
        assert self._transport is not None
        self._transport.write(error_answer(e.status))
        self.linger()

    # ------------------------------------------------------------ deadlines and ends

    def answered(self) -> None:
        """The stack writes an answer: the connection waits for its next head, idle
        (evictable) again. That head's deadline runs from its first byte; until then
        uvicorn's keep-alive time-out ends a silent connection."""
        self._awaiting = False
        slot = self._slot
        if slot is not None and not slot.reading:
            slot.reading = True
            self.complete = False

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        if self._slot is not None:
            self._slot.reading = True
            self.rearm()
        self._timer = _Timer(loop, loop.time() + self._slots.head_timeout(), self._timeout)
        if self._slot is not None:
            self._slot.deadline = self._timer

    def _timeout(self) -> None:
        if self.closing:
            return
        if self._handed == 0 and (self.heard or self._answer_silent):  # slow: 408
            self._stats["timeout"] += 1
            assert self._transport is not None
            self._transport.write(error_answer(408))
            self.linger()
        else:  # silent, idle after an answer, or a later head too slow: just close
            self._abort()

    def _evicted(self) -> None:
        self._abort()

    def _abort(self) -> None:
        self.closing = True
        if self._transport is not None:
            end_connection(self._transport)

    def linger(self) -> None:
        """Half-close and drain briefly, then close (see the module)."""
        if self.closing or self._transport is None:
            return
        self.closing = True
        self._discard_all = True
        if self._timer is not None:
            self._timer.cancel()
        transport = self._transport
        with contextlib.suppress(Exception):
            if transport.can_write_eof():
                transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_TIME, self._finish)

    def _finish(self) -> None:
        """Close after lingering: what is queued still goes out to a client that reads
        it, within `answer_timeout`; then the connection is reset."""
        if self._transport is not None:
            close_within(self._transport, self._answer_timeout)

    def shutdown(self) -> None:
        """The server stops: end this connection now."""
        if self._transport is not None:
            self.closing = True
            self._transport.abort()
