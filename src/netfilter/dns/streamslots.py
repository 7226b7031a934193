"""Connection slots of one stream DNS listener kind (TCP, DoT, DoH), within
`dns.tcp_max_connections` and `dns.tcp_per_client`, and the queries in flight on one
connection (`Flight`, for TCP's and DoT's pipelining limit).

A connection takes its slot when it is accepted, before its TLS handshake, so that
clients that open connections and never finish a handshake hold slots too, and lose
them as idle ones do: a client at its cap, or a listener with every slot taken, closes
its (or anybody's) connection idle longest for the new one. Idle means no query in
flight; a connection still in its handshake has none.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

from netfilter.slots import client_key

__all__ = ["Flight", "Held", "StreamSlots"]


class Held:
    """One connection's slot: who holds it, since when it is idle, how busy it is."""

    __slots__ = ("busy", "client", "close", "key", "last_active")

    def __init__(self, client: str, close: Callable[[], None]) -> None:
        self.client = client
        self.key = client_key(client)
        self.close = close  # ends the connection (its handler then releases the slot)
        self.busy = 0  # queries in flight
        self.last_active = time.monotonic()

    def touch(self) -> None:
        self.last_active = time.monotonic()


class StreamSlots:
    """At most `total` connections, `per_client` of them per client (see module doc);
    refusals and evictions counted in `stats` under `<prefix>_...`."""

    def __init__(self, total: int, per_client: int, stats: Counter[str], prefix: str) -> None:
        self.total = total
        self.per_client = per_client
        self.stats = stats
        self.prefix = prefix
        self.held: set[Held] = set()
        self.per_key: Counter[str] = Counter()

    def admit(self, client: str, close: Callable[[], None]) -> Held | None:
        """A slot for a new connection from `client`, or None (then close it)."""
        held = Held(client, close)
        if self.per_key[held.key] >= self.per_client and not self._evict(held.key):
            self.stats[f"{self.prefix}_refused_client"] += 1
            return None
        if len(self.held) >= self.total and not self._evict(None):
            self.stats[f"{self.prefix}_refused_full"] += 1
            return None
        self.held.add(held)
        self.per_key[held.key] += 1
        return held

    def _evict(self, key: str | None) -> bool:
        idle = [h for h in self.held if not h.busy and key in (None, h.key)]
        if not idle:
            return False
        oldest = min(idle, key=lambda h: h.last_active)
        self.release(oldest)
        oldest.close()
        self.stats[f"{self.prefix}_closed_for_new"] += 1
        return True

    def release(self, held: Held) -> None:
        """Give the slot back (once)."""
        if held in self.held:
            self.held.discard(held)
            self.per_key[held.key] -= 1
            if not self.per_key[held.key]:
                del self.per_key[held.key]

    def close_all(self) -> None:
        for held in list(self.held):
            self.release(held)
            held.close()


class Flight:
    """The queries in flight on one connection (its slot's `busy`), under its pipelining
    limit (`dns.tcp_pipeline`): `room` is set while fewer than `limit` are in flight, so
    the reader waits before taking another; `settled` while none is, so a closing
    connection can answer what it was asked first."""

    def __init__(self, held: Held, limit: int) -> None:
        self.held = held
        self.limit = limit
        self.room = asyncio.Event()
        self.room.set()
        self.settled = asyncio.Event()
        self.settled.set()

    def begin(self) -> Callable[[], bool]:
        """Count a new query in; the returned `end` counts its answer out, once (True
        the first time: a failure after the answer must not settle it twice)."""
        held = self.held
        held.busy += 1
        self.settled.clear()
        if held.busy >= self.limit:
            self.room.clear()
        done = False

        def end() -> bool:
            nonlocal done
            if done:
                return False
            done = True
            held.busy -= 1
            held.touch()
            self.room.set()
            if not held.busy:
                self.settled.set()
            return True

        return end
