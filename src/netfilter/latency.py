"""Latency of a front-end's answers, as plain counts: what metrics.py exposes.

Fixed buckets as a list of counts and a sum, so that a front-end times its answers with
a bisect and two additions (a prometheus_client Histogram takes a lock per
observation) and depends on nothing of the metrics exposition.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["BUCKETS", "LatencyHistogram"]

# seconds: a local answer takes well under a millisecond, a forwarded one an upstream's
# round trip (up to dns.timeout)
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LatencyHistogram:
    """Fixed buckets as a list of counts and a sum: `observe` is a bisect and two
    additions (a prometheus_client Histogram takes a lock per observation)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one: above the largest bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative, as Prometheus wants them, ending with +Inf."""
        out, total = [], 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), list(self.counts), strict=True):
            total += count
            out.append((bound, float(total)))
        return out
