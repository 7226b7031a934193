"""The rate limit of repeated trouble lines: the first at once, then one per interval
with the count held back since."""

from __future__ import annotations

import threading
import time

from netfilter.ratelimit import RateLimit


def test_first_at_once_then_held_and_counted() -> None:
    limit = RateLimit(0.2)
    assert limit.due("a") == 1
    assert [limit.due("a") for _ in range(5)] == [0] * 5
    assert limit.due("b", 3) == 3  # another kind is said at once
    time.sleep(0.25)
    assert limit.due("a") == 6  # the five held back, and this one


def test_counts_are_exact_across_threads() -> None:
    limit = RateLimit(3600)
    reported = [limit.due()]

    def hit() -> None:
        for _ in range(1000):
            reported.append(limit.due())

    threads = [threading.Thread(target=hit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    limit.interval = 0
    reported.append(limit.due())
    assert sum(reported) == 4002
