"""One rule for log lines about trouble that can repeat thousands of times a second: the
first of a kind is said at once, then at most one line per interval, counting what
happened since the last line. A flood of bad packets, failed appends or refused events
must not become a flood of log (3k failing packets a second once wrote 36 MB in 10 s).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Hashable

__all__ = ["RateLimit"]


class RateLimit:
    """When to say a kind of trouble again; thread-safe, a dict look-up and a clock read
    per call."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[Hashable, float] = {}
        self._held: Counter[Hashable] = Counter()
        self._lock = threading.Lock()

    def due(self, kind: Hashable = None, count: int = 1) -> int:
        """Note `count` more of `kind`; the number to report now (those held back since
        the last line, these included), or 0 while the interval has not passed."""
        with self._lock:
            self._held[kind] += count
            now = time.monotonic()
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                return 0
            self._last[kind] = now
            return self._held.pop(kind)
