"""Blocks per day and list and category (the public transparency page), or also per
front-end (the operator dashboard): counted from the audit log's events, never per
client, never a name or URL.

The log only grows, so the counts are kept and brought up to date from the last leaf
counted: each refresh reads at most `MAX_SCAN` new leaves (a huge backlog is caught up
over several refreshes, and the page says how far it got), and the first one starts at
the first leaf of the window, found by a binary search on the leaves' days. Only the fields
asked for (list and category by default) and the count of a block event are read.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from netfilter.audit.store import AuditStore

__all__ = ["DAYS", "MAX_SCAN", "PUBLIC_FIELDS", "BlockCounts", "BlockStats"]

DAYS = 30  # days shown, today included
MAX_SCAN = 100_000  # leaves read per refresh
PUBLIC_FIELDS = ("list", "category")  # what the public page counts by, after the day


@dataclass(frozen=True)
class BlockCounts:
    """A snapshot: counts keyed by (day, *fields); `counted` leaves of `size`."""

    counts: dict[tuple[str, ...], int]
    counted: int
    size: int

    @property
    def complete(self) -> bool:
        return self.counted >= self.size


def _first_at_or_after(store: AuditStore, day: str, size: int) -> int:
    """The first leaf index whose day is `day` or later (leaves are in day order)."""
    low, high = 0, size
    while low < high:
        middle = (low + high) // 2
        leaf = store.leaf(middle)
        if leaf is None or leaf.day >= day:
            high = middle
        else:
            low = middle + 1
    return low


class BlockStats:
    """The running counts of one audit log, by day and the block events' `fields`
    (never a client or a target: those are refused); call `refresh` from one thread at
    a time."""

    def __init__(self, store: AuditStore, days: int = DAYS, max_scan: int = MAX_SCAN,
                 fields: tuple[str, ...] = PUBLIC_FIELDS) -> None:
        if not set(fields) <= {"list", "category", "frontend", "action"}:
            raise ValueError(f"blocks are never counted by {sorted(fields)}")
        self.store = store
        self.days = days
        self.max_scan = max_scan
        self.fields = fields
        self._counts: Counter[tuple[str, ...]] = Counter()
        self._next: int | None = None  # the next leaf to count

    def refresh(self, now: datetime | None = None) -> BlockCounts:
        today = (now or datetime.now(UTC)).date()
        first_day = (today - timedelta(days=self.days - 1)).isoformat()
        size = self.store.size()
        if self._next is None:
            self._next = _first_at_or_after(self.store, first_day, size)
        end = min(size, self._next + self.max_scan)
        for leaf in self.store.leaves(self._next, end):
            self._next = leaf.index + 1
            if leaf.event is None or leaf.day < first_day or b'"type":"block"' not in leaf.event:
                continue
            try:
                event = json.loads(leaf.event)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("type") == "block":
                key = (leaf.day, *(str(event.get(f) or "") for f in self.fields))
                count = event.get("count", 1)
                self._counts[key] += count if isinstance(count, int) and count > 0 else 1
        self._next = max(self._next, end)
        for key in [k for k in self._counts if k[0] < first_day]:
            del self._counts[key]
        return BlockCounts(dict(self._counts), self._next, size)
