"""Counters of a child process (the proxy's mitmdump), asked for at each scrape.

The proxy runs in a child of `netfilter serve` (mitmproxy has a loop and a master of
its own), yet its counters belong on the node's one `/metrics`. The parent hands the
child one end of a socket pair (its descriptor in NETFILTER_METRICS_FD); at a scrape
the parent writes one byte and the child's exporter thread answers one JSON line with
its counters as they are now. Pull, not push: nothing runs between scrapes, the
values are never older than the scrape, and a child that does not answer within the
time-out only makes the scrape leave its families out (and /readyz say so). The
exporter is a thread of its own, so a scrape never waits on mitmproxy's event loop,
and the event loop never waits on a scrape.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netfilter.engine import Engine

__all__ = ["ENV", "ChildCounters", "add_snapshots", "engine_counters", "export_counters",
           "export_from_environment", "merged"]

log = logging.getLogger(__name__)

ENV = "NETFILTER_METRICS_FD"
ASK = b"?"
ANSWER_BOUND = 1.0  # seconds a scrape waits for the child
LINE_BOUND = 4 << 20  # bytes: a child's answer longer than this is refused

Snapshot = dict[str, Any]


def engine_counters(engine: Engine) -> Snapshot:
    """What the parent's families need of an engine in another process: its plain
    counters, its blocks by (front-end, list, category, action), and its audit log's
    counters when its sink is one."""
    from netfilter.audit.log import AuditLog

    snapshot: Snapshot = {
        "engine": engine.stats(),
        "matches": [[*key, count] for key, count in engine.matches.copy().items()],
    }
    if isinstance(engine.sink, AuditLog):
        snapshot["audit"] = engine.sink.stats()
    return snapshot


def export_counters(fd: int, snapshot: Callable[[], Snapshot]) -> threading.Thread:
    """In the child: answer every byte that arrives on `fd` with one line of
    `snapshot()`, on a daemon thread, until the parent closes its end."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)

    def answer() -> None:
        with sock:
            while True:
                try:
                    if not sock.recv(64):
                        return  # the parent is gone
                    line = json.dumps(snapshot(), separators=(",", ":")).encode()
                    sock.sendall(line + b"\n")
                except OSError:
                    return
                except Exception:  # a counter that cannot be read: say so, keep serving
                    log.exception("metrics: the proxy's counters could not be read")
                    with contextlib.suppress(OSError):
                        sock.sendall(b"{}\n")

    thread = threading.Thread(target=answer, name="metrics-export", daemon=True)
    thread.start()
    return thread


def export_from_environment(snapshot: Callable[[], Snapshot]) -> threading.Thread | None:
    """`export_counters` on the descriptor the parent named, if it named one (once:
    the variable is removed, so a reloaded script does not start a second thread)."""
    value = os.environ.pop(ENV, None)
    if not value:
        return None
    try:
        fd = int(value)
        os.fstat(fd)
    except (ValueError, OSError):
        log.warning("metrics: %s=%r is not an open descriptor; the proxy's counters are "
                    "not on /metrics", ENV, value)
        return None
    return export_counters(fd, snapshot)


class ChildCounters:
    """In the parent: the child's counters, asked for once per scrape (`refresh`), then
    read by the scrape's several families. Thread-safe; `latest()` is {} when the
    child did not answer."""

    def __init__(self) -> None:
        self._ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._ours.setblocking(False)
        self._lock = threading.Lock()
        self._snapshot: Snapshot = {}

    def child_fd(self) -> int:
        """The descriptor to pass to the child (inheritable; close it here once the
        child runs, with `started`)."""
        self.theirs.set_inheritable(True)
        return self.theirs.fileno()

    def started(self) -> None:
        self.theirs.close()

    def close(self) -> None:
        self.theirs.close()
        self._ours.close()

    def refresh(self) -> None:
        """Ask the child (at the start of a scrape)."""
        with self._lock:
            self._snapshot = self._ask()

    def latest(self) -> Snapshot:
        return self._snapshot

    def _ask(self) -> Snapshot:
        sock = self._ours
        try:
            with contextlib.suppress(BlockingIOError):
                while sock.recv(65536):  # a late answer to an earlier scrape
                    pass
            sock.send(ASK)
            deadline = time.monotonic() + ANSWER_BOUND
            data = b""
            while not data.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or len(data) > LINE_BOUND:
                    return {}
                readable, _, _ = select.select([sock], [], [], left)
                if readable:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return {}
                    data += chunk
            value = json.loads(data)
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def part(self, name: str) -> dict[str, int | float]:
        """One part's plain counters, e.g. "proxy" or "engine" ({} when absent)."""
        values = self.latest().get(name)
        if not isinstance(values, dict):
            return {}
        return {k: v for k, v in values.items() if isinstance(v, int | float)}

    def histogram(self, name: str, buckets: int) -> tuple[list[int], float] | None:
        """A histogram's per-bucket counts and sum, if the child sent one of
        `buckets` buckets."""
        value = self.latest().get(name)
        if not isinstance(value, dict):
            return None
        counts, total = value.get("counts"), value.get("sum")
        if (not isinstance(counts, list) or len(counts) != buckets
                or not all(isinstance(c, int) for c in counts)
                or not isinstance(total, int | float)):
            return None
        return counts, float(total)

    def matches(self) -> Counter[tuple[str, str, str, str]]:
        counts: Counter[tuple[str, str, str, str]] = Counter()
        for row in self.latest().get("matches", ()):
            if isinstance(row, list) and len(row) == 5 and isinstance(row[4], int):
                counts[(str(row[0]), str(row[1]), str(row[2]), str(row[3]))] += row[4]
        return counts


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _add_rows(carried: list[Any], live: list[Any]) -> list[Any]:
    """Rows such as [name, errors, timeouts] or [frontend, list, category, action,
    count]: summed per their text fields."""
    out: dict[tuple[Any, ...], list[Any]] = {}
    for row in (*carried, *live):
        if not isinstance(row, list):
            continue
        key = tuple(x for x in row if not _is_number(x))
        numbers = [x for x in row if _is_number(x)]
        had = out.get(key)
        out[key] = numbers if had is None or len(had) != len(numbers) else [
            a + b for a, b in zip(had, numbers, strict=True)]
    return [[*key, *numbers] for key, numbers in out.items()]


def add_snapshots(carried: Snapshot, live: Snapshot,
                  gauges: Mapping[str, frozenset[str]]) -> Snapshot:
    """`live` plus what `carried` counted (an earlier run of the same child): numbers
    and histograms summed, rows summed per key; a part's `gauges`, and anything not a
    count, as `live` has them."""
    out = dict(live)
    for name, before in carried.items():
        now = live.get(name)
        if isinstance(before, dict):
            now = now if isinstance(now, dict) else {}
            skip = gauges.get(name, frozenset())
            part = dict(now)
            for key, value in before.items():
                if key in skip:
                    continue
                current = now.get(key, 0 if _is_number(value) else None)
                if _is_number(value) and _is_number(current):
                    part[key] = value + current
                elif (isinstance(value, list) and isinstance(current, list)
                      and len(value) == len(current)
                      and all(map(_is_number, (*value, *current)))):
                    part[key] = [a + b for a, b in zip(value, current, strict=True)]
                elif current is None and isinstance(value, list):
                    part[key] = value
            out[name] = part
        elif isinstance(before, list):
            out[name] = _add_rows(before, now if isinstance(now, list) else [])
    return out


def merged(own: Callable[[], Mapping[str, int | float]],
           others: Iterable[Callable[[], Mapping[str, int | float]]]
           ) -> Callable[[], dict[str, int | float]]:
    """A source that sums a part's counters over processes (the node's engine and
    audit log counters are the sum of the parent's and the children's)."""
    sources = [own, *others]

    def total() -> dict[str, int | float]:
        out: Counter[str] = Counter()
        for source in sources:
            out.update(source())
        return dict(out)

    return total
