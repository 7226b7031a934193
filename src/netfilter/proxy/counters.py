"""What the proxy counts, and its one line per kind of origin fault.

Requests by verdict, CONNECTs and TLS decisions, and origin faults by kind, as plain
counters (a dict increment on the hot path); `snapshot` hands them, with the engine's
and audit log's own, to the node's /metrics (childmetrics.py). An origin that is down
or resets fails every request sent to it: mitmproxy's own line per failed connection
is dropped (addon.ClientLogFilter) and this module says it instead, first at once,
then at most once per interval per kind, with the count since. The line names the
origin (the operator's concern: which destination fails), never the client.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import TYPE_CHECKING

from netfilter.childmetrics import Snapshot, engine_counters
from netfilter.latency import LatencyHistogram
from netfilter.ratelimit import RateLimit

if TYPE_CHECKING:
    from netfilter.engine import Engine

__all__ = ["FAULT_INTERVAL", "ProxyCounters", "fault_kind", "verdict_of"]

log = logging.getLogger("netfilter.proxy")

FAULT_INTERVAL = 10.0  # seconds between two lines about one kind of origin fault
_KINDS = (
    ("refused", re.compile(r"refused|connect call failed|errno 111", re.I)),
    ("timeout", re.compile(r"timed? ?out", re.I)),
    ("dns", re.compile(r"name or service|nodename|getaddrinfo|no address|temporary failure "
                       r"in name resolution", re.I)),
    ("tls", re.compile(r"tls|ssl|certificate|handshake", re.I)),
    ("reset", re.compile(r"reset|closed|disconnect|broken pipe|eof", re.I)),
)
_VERDICTS = {451: "block", 403: "refuse", 503: "refuse", 421: "misdirected", 400: "invalid"}


def fault_kind(message: str) -> str:
    """refused, timeout, dns, tls, reset or other, from a connection error's text."""
    for kind, pattern in _KINDS:
        if pattern.search(message):
            return kind
    return "other"


def verdict_of(status: int) -> str:
    """The verdict label of a request answered by the proxy itself."""
    return _VERDICTS.get(status, "invalid")


class ProxyCounters:
    """The counters of one proxy process; read from another thread at each scrape
    (copies of dicts: consistent enough for counters)."""

    def __init__(self) -> None:
        self.requests = 0  # HTTP requests checked (plain or decrypted)
        self.answered: Counter[str] = Counter()  # verdicts of requests answered here
        self.other: Counter[str] = Counter()  # connects, tls decisions
        self.origin_errors: Counter[str] = Counter()
        self.latency = LatencyHistogram()
        self._said = RateLimit(FAULT_INTERVAL)

    def origin_fault(self, origin: str, message: str) -> None:
        """An origin could not be reached or broke off: counted, and said once per
        kind and interval."""
        kind = fault_kind(message)
        self.origin_errors[kind] += 1
        count = self._said.due(kind)
        if count:
            more = f" ({count} origin faults of this kind since the last line)" if (
                count > 1) else ""
            log.warning("proxy: origin %s failed: %s (%s)%s; answered 502", origin, kind,
                        message, more)

    def snapshot(self, engine: Engine | None) -> Snapshot:
        answered = self.answered.copy()
        verdicts = {"allow": max(0, self.requests - sum(answered.values())), **answered}
        out: Snapshot = engine_counters(engine) if engine is not None else {}
        out["verdicts"] = verdicts
        out["proxy"] = {"requests": self.requests, **self.other.copy()}
        out["origin_errors"] = dict(self.origin_errors)
        out["latency"] = {"counts": list(self.latency.counts), "sum": self.latency.sum}
        return out
