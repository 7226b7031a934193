"""Connection slots for the small HTTP servers (stop page, tiles): what keeps slow
clients from taking every connection (slowloris).

A server holds at most `total` connections, and a client address (IPv6: its /64,
usually one subscriber) at most `per_client` of those that have sent something. A
connection is *idle* while the request head it has begun is not whole; when a
client is at its cap, its oldest idle connection is closed for the new one, and when
all slots are taken, the oldest idle one of anybody (else the oldest that has sent
nothing): holding connections open costs an attacker its own oldest ones, not other
clients their service. Whether a head is whole is noted as its bytes arrive
(`HeadReader`), before the server parses it, so a request waiting in the buffer is
never evicted; and the per-client cap is applied when the first bytes arrive, so a
client whose request is on its way is not refused for its neighbour's idle ones.
Once more than half the slots are in use, connections waiting for a head get a short
deadline, as nginx's and Apache's mod_reqtimeout defences do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

__all__ = ["Deadline", "HeadReader", "Slot", "Slots", "Watch", "client_key", "close_within",
           "end_connection", "protocol_factory"]


class Watch(Protocol):
    """What a slot needs to know of a connection's bytes (HeadReader, or the web
    stack's guard): whether any came, whether a whole head is in."""

    heard: bool
    complete: bool
    on_first: Callable[[], object] | None

    def rearm(self) -> None: ...


class Deadline(Protocol):
    """A head deadline that can be brought forward (asyncio.Timeout is one)."""

    def when(self) -> float | None: ...

    def reschedule(self, when: float | None) -> None: ...

    def expired(self) -> bool: ...


_KEYS: dict[str | None, str] = {}  # address -> key, recent ones (cleared when full)
_KEYS_KEPT = 4096


def client_key(address: str | None) -> str:
    """What the per-client cap counts: an IPv4 address (also when IPv4-mapped), an
    IPv6 /64. Remembered for recent addresses: a flood comes from few of them."""
    key = _KEYS.get(address)
    if key is None:
        if len(_KEYS) >= _KEYS_KEPT:
            _KEYS.clear()
        key = _KEYS[address] = _client_key(address)
    return key


def _client_key(address: str | None) -> str:
    text = (address or "").split("%")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class HeadReader(asyncio.StreamReader):
    """A StreamReader that notes, as bytes arrive, whether any came (then calls
    `on_first`) and whether a whole request head (a blank line after a non-blank one)
    is in."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit=limit)
        self.heard = False
        self.complete = False
        self.on_first: Callable[[], object] | None = None
        self._seen = b""
        self._watch = limit

    def feed_data(self, data: bytes) -> None:  # type: ignore[override]
        super().feed_data(data)
        if data and not self.complete:
            self._seen = (self._seen + data)[:self._watch]
            head = self._seen.lstrip(b"\r\n")
            self.complete = b"\n\n" in head or b"\n\r\n" in head
            if not self.heard:
                self.heard = True
                if self.on_first is not None:
                    self.on_first()

    def rearm(self) -> None:
        """Watch for the next head on a kept-alive connection (one already buffered
        is not seen: such a connection is evictable until it is parsed)."""
        self.complete, self._seen = False, b""


def protocol_factory(client: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                      Awaitable[None]],
                     limit: int) -> Callable[[], asyncio.Protocol]:
    """What `asyncio.start_server(client, limit=limit)` builds, with a HeadReader."""
    return lambda: asyncio.StreamReaderProtocol(HeadReader(limit), client)


class Slot:
    """One admitted connection; `close` ends it when it is evicted."""

    __slots__ = ("close", "deadline", "key", "reader", "reading")

    def __init__(self, key: str, reader: Watch, close: Callable[[], object]) -> None:
        self.key = key
        self.reader = reader
        self.close = close
        self.reading = True  # waiting for a request head (not answering one)
        self.deadline: Deadline | None = None

    def idle(self) -> bool:
        return self.reading and not self.reader.complete


class Slots:
    """Admission, eviction and head deadlines for one server's connections."""

    def __init__(self, total: int, per_client: int, timeout: float, busy_timeout: float,
                 stats: Counter[str] | None = None) -> None:
        self.total = total
        self.per_client = per_client
        self.timeout = timeout
        self.busy_timeout = min(busy_timeout, timeout)
        self.stats: Counter[str] = Counter() if stats is None else stats
        # in the order admitted, oldest first: not a byte yet / sent something
        self._quiet: dict[Slot, None] = {}
        self._heard: dict[Slot, None] = {}
        self._per_client: Counter[str] = Counter()  # of the heard
        self._busy = False

    def __len__(self) -> int:
        return len(self._quiet) + len(self._heard)

    def busy(self) -> bool:
        return len(self) * 2 > self.total

    def admit(self, address: str | None, reader: asyncio.StreamReader | Watch,
              close: Callable[[], object]) -> Slot | None:
        """A slot for a new connection, evicting as described above; None: refuse it
        (every connection in the way is answering or about to)."""
        assert not isinstance(reader, asyncio.StreamReader) or isinstance(reader, HeadReader), \
            "serve with slots.protocol_factory"
        if len(self) >= self.total and not self._evict(None):
            self.stats["refused_busy"] += 1
            return None
        slot = Slot(client_key(address), reader, close)
        self._quiet[slot] = None
        self._update()
        if reader.heard:  # its bytes came before it was admitted
            return slot if self._first(slot) else None
        reader.on_first = lambda: self._first(slot) or slot.close()
        return slot

    def release(self, slot: Slot) -> None:
        """The connection ended (or was evicted); idempotent."""
        self._quiet.pop(slot, None)
        if slot in self._heard:
            del self._heard[slot]
            self._per_client[slot.key] -= 1
            if self._per_client[slot.key] <= 0:
                del self._per_client[slot.key]
        self._update()

    def head_timeout(self) -> float:
        """Seconds a request head may take if it began now."""
        return self.busy_timeout if self.busy() else self.timeout

    @contextlib.asynccontextmanager
    async def reading(self, slot: Slot, *, again: bool = False) -> AsyncIterator[None]:
        """The time a request head may take (TimeoutError past it); `again` for the
        next request on a kept-alive connection."""
        slot.reading = True
        if again:
            slot.reader.rearm()
        try:
            async with asyncio.timeout(self.busy_timeout if self.busy() else self.timeout
                                       ) as deadline:
                slot.deadline = deadline
                yield
        finally:
            slot.reading, slot.deadline = False, None

    def _first(self, slot: Slot) -> bool:
        """Its first bytes came: now it counts against its client's cap (False: it
        is refused)."""
        if slot not in self._quiet:
            return True  # evicted meanwhile, being closed
        del self._quiet[slot]
        if self._per_client[slot.key] >= self.per_client and not self._evict(slot.key):
            self.stats["refused_busy"] += 1
            self._update()
            return False
        self._heard[slot] = None
        self._per_client[slot.key] += 1
        return True

    def _evict(self, key: str | None) -> bool:
        """Close the oldest idle connection (of `key`; of anybody, else the oldest
        quiet one, for None)."""
        victim = next((s for s in self._heard if s.idle() and key in (None, s.key)), None)
        if victim is None and key is None:
            victim = next(iter(self._quiet), None)
        if victim is None:
            return False
        self.release(victim)
        self.stats["evicted"] += 1
        victim.close()
        return True

    def _update(self) -> None:
        busy = self.busy()
        if busy and not self._busy:  # now busy: waiting ones get the short deadline too
            soon = asyncio.get_running_loop().time() + self.busy_timeout
            for slot in [*self._quiet, *self._heard]:
                deadline = slot.deadline
                if slot.reading and deadline is not None and not deadline.expired():
                    when = deadline.when()
                    deadline.reschedule(soon if when is None else min(when, soon))
        self._busy = busy


def end_connection(transport: asyncio.Transport) -> None:
    """End a connection now: a close, or a reset when answers are still queued for a
    client that does not take them (a close would wait on it, holding its slot)."""
    with contextlib.suppress(Exception):  # lost already: nothing to end
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()


def close_within(transport: asyncio.Transport, seconds: float) -> asyncio.TimerHandle | None:
    """Close once what is queued has gone out, and reset the connection if the client
    has not taken it within `seconds` (the timer, to cancel when the connection is
    lost first; None when nothing was queued)."""
    transport.close()
    if not transport.get_write_buffer_size():
        return None
    return asyncio.get_running_loop().call_later(seconds, end_connection, transport)
