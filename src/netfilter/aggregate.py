"""Repeated identical blocks folded into one event per window, so a flood cannot fill the log.

A block's key is what an auditor needs to tell blocks apart: list, version, entry,
category, front-end, action, the client as the privacy setting records it, and the
target where the operator records targets. The first block of a key is passed on at
once. Repeats of that key are only counted; once per `window` seconds, while they go
on, they become one event carrying `count`, `first` and `last`. A key quiet for a
whole window is forgotten, and its next block is again passed on at once. Counts stay
exact: summing `count` (1 where absent) over block events gives every block answered.

A UDP client can spoof its source, so without this one client could make the log
name a victim thousands of times a second; with it, a flood of one name from one
client costs one event per window. Memory is bounded: when `max_keys` windows are
open, the oldest is closed early (its count is passed on, nothing is lost).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from netfilter.events import Event, EventSink

__all__ = ["BlockAggregator"]

Key = tuple[str | int | None, ...]


class _Window:
    """An open window of one key: when it opened, and the repeats counted since."""

    __slots__ = ("detail", "event", "first", "last", "opened", "repeats")

    def __init__(self, event: Event, opened: float) -> None:
        self.event = event  # the first block (the key's fields)
        self.opened = opened  # monotonic
        self.repeats = 0
        self.first = 0.0  # wall-clock times of the first and last repeat
        self.last = 0.0
        self.detail: str | None = None  # the repeats' detail while they all agree

    def summary(self) -> Event:
        return replace(self.event, time=_iso(self.last), count=self.repeats,
                       first=_iso(self.first), last=_iso(self.last), detail=self.detail)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def _key(event: Event) -> Key:
    return (event.list, event.version, event.ref, event.category, event.frontend,
            event.action, event.client, event.target)


class BlockAggregator:
    """An EventSink in front of another: blocks aggregated, every other event passed on."""

    def __init__(self, sink: EventSink, window: float = 10.0, *, max_keys: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._open: OrderedDict[Key, _Window] = OrderedDict()  # oldest window first
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._closed = False
        self.folded = 0  # blocks counted into a window rather than recorded one by one

    def record(self, event: Event) -> None:
        if event.type != "block" or self.window <= 0 or self._closed:
            self.sink.record(event)
            return
        key = _key(event)
        now = self._clock()
        blocks = event.count or 1  # an event may stand for several blocks (a relay's count)
        with self._lock:
            due = self._due(now)
            window = self._open.get(key)
            if window is not None:
                self._repeat(window, event.detail, blocks)
                event_now = None
            else:
                if len(self._open) >= self.max_keys:
                    due.extend(self._close_oldest())
                if event.count is not None:  # the first passed on, the rest its repeats
                    event = replace(event, count=None, first=None, last=None)
                if not event.time:
                    event = replace(event, time=_iso(time.time()))
                window = self._open[key] = _Window(event, now)
                if blocks > 1:
                    self._repeat(window, event.detail, blocks - 1)
                event_now = event
                self._start_ticker()
        for summary in due:
            self.sink.record(summary)
        if event_now is not None:
            self.sink.record(event_now)

    def _repeat(self, window: _Window, detail: str | None, blocks: int) -> None:
        """Count `blocks` repeats into `window` (caller holds the lock)."""
        wall = time.time()
        if not window.repeats:
            window.first, window.detail = wall, detail
        elif window.detail != detail:
            window.detail = None
        window.repeats += blocks
        window.last = wall
        self.folded += blocks

    def _due(self, now: float) -> list[Event]:
        """Close the windows that ended by `now` (caller holds the lock).

        A window with repeats yields its summary and opens the next one for the key
        (the flood goes on); a window without repeats just ends."""
        due: list[Event] = []
        while self._open:
            key, window = next(iter(self._open.items()))
            if now - window.opened < self.window:
                break
            del self._open[key]
            if window.repeats:
                due.append(window.summary())
                self._open[key] = _Window(window.event, now)
        return due

    def _close_oldest(self) -> list[Event]:
        _, window = self._open.popitem(last=False)
        return [window.summary()] if window.repeats else []

    def expire(self) -> None:
        """Pass on the summaries of windows that have ended (the ticker calls this)."""
        with self._lock:
            due = self._due(self._clock())
        for summary in due:
            self.sink.record(summary)

    def _start_ticker(self) -> None:
        """One thread while any window is open, so a summary is never later than a tick
        past its window even when traffic stops (caller holds the lock)."""
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="block-aggregator",
                                            daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        interval = min(1.0, self.window / 4)
        while True:
            time.sleep(interval)
            self.expire()
            with self._lock:
                if not self._open or self._closed:
                    self._ticker = None
                    return

    def pending(self) -> int:
        """Blocks counted in open windows and not yet passed on (a metric)."""
        return self.stats()["blocks_pending"]

    def stats(self) -> dict[str, int]:
        """For metrics: blocks folded so far, blocks pending, windows open."""
        with self._lock:
            pending = sum(w.repeats for w in self._open.values())
            return {"blocks_folded": self.folded, "blocks_pending": pending,
                    "windows_open": len(self._open)}

    def flush(self) -> None:
        """Pass on every open window's count now (shutdown, tests)."""
        with self._lock:
            windows = list(self._open.values())
            self._open.clear()
        for window in windows:
            if window.repeats:
                self.sink.record(window.summary())

    def close(self) -> None:
        """Flush, then close the sink behind (commits and signs a last checkpoint)."""
        self._closed = True
        self.flush()
        self.sink.close()
