"""Connection slots of one encrypted DNS listener kind (DoT, DoH): the TCP listener's
limits (`dns.tcp_max_connections`, `dns.tcp_per_client`) kept the same way.

A connection takes its slot when it is accepted, before its TLS handshake, so that
clients that open connections and never finish a handshake hold slots too, and lose
them as idle ones do: a client at its cap, or a listener with every slot taken, closes
its (or anybody's) connection idle longest for the new one. Idle means no query in
flight; a connection still in its handshake has none.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from netfilter.slots import client_key

__all__ = ["Held", "StreamSlots"]


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
