"""A flood of one blocked name from one client against a real `netfilter serve dns`: what it
costs the audit log with block aggregation off (every block an event, as before) and on
(the default 10 s window), in one run; and what a kill -9 during a flood loses.

Per side: unbound (local-data) as the upstream, the node with its audit log on disk,
one raw-UDP client (tests/flood.py) keeping 32 queries in flight for FLOOD_SECONDS.
Recorded: blocks answered per second (the client's count), audit events appended per
second, events and bytes of log per blocked query (the store's pages after a WAL
checkpoint, less its size before the flood), and the blocks shed (counted in the log).
The sides alternate (off, on, off, on, ...) so drift hits both alike; each pair gives
a ratio. Nothing here asserts a timing; the figures go to benchmarks/README.md.

Kill -9: the same node with aggregation off and checkpoints and tiles every second,
two flooding clients, SIGKILL after 3 s; recorded: blocks answered, logged, shed (and
said so in the log), lost, and how long before the kill the oldest lost one was answered.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import time
from pathlib import Path

import pytest
import yaml
from tests.dns_support import Netfilter, Unbound, read_events, require_tools, start_all
from tests.flood import flood
from tests.test_audit_crash_loss import crash_during_flood

from support import Figures

pytestmark = pytest.mark.slow

FLOOD_SECONDS = 6.0
PAIRS = 3
TABLE = "audit log under a flood of one blocked name from one client (real serve dns)"
CRASH_TABLE = "kill -9 during a block flood (aggregation off, checkpoints + tiles every 1 s)"


def store_bytes(path: Path) -> int:
    """The store's size with its WAL folded in (what the log costs on disk)."""
    db = sqlite3.connect(path, timeout=30)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
        return int(pages) * int(size)
    finally:
        db.close()


def one_side(tmp_path: Path, upstream: Unbound, window: float) -> dict[str, float]:
    node = Netfilter(tmp_path, upstreams=[upstream.address], audit_client="pseudonym")
    node.config["audit"].update({"aggregate_window": window})
    node.conf.write_text(yaml.safe_dump(node.config), encoding="utf-8")
    node.start()
    try:
        flood(node.port, 0.3)  # the name's first query and the log's first pages
        time.sleep(0.5)
        before_events = len(read_events(node.events_path))
        before_bytes = store_bytes(node.events_path)
        result = flood(node.port, FLOOD_SECONDS)
    finally:
        node.stop()  # SIGTERM: aggregated counts passed on, queue committed
    events = read_events(node.events_path)
    new = events[before_events:]
    answered = len(result.answers)
    blocks = [e for e in new if e["type"] == "block"]
    # what the log keeps per event: its canonical JSON and its 32-byte leaf hash
    logical = sum(len(json.dumps(e, sort_keys=True, separators=(",", ":"),
                                 ensure_ascii=False).encode()) + 32 for e in new)
    shed = sum(int(e.get("count", 0)) for e in new if e["type"] == "shed")
    return {
        "answered_per_s": answered / FLOOD_SECONDS,
        "events": len(new),
        "events_per_s": len(new) / FLOOD_SECONDS,
        "events_per_query": len(new) / max(answered, 1),
        "bytes_per_query": logical / max(answered, 1),
        "bytes_per_s": logical / FLOOD_SECONDS,
        "pages_per_query": (store_bytes(node.events_path) - before_bytes) / max(answered, 1),
        "shed_fraction": shed / max(answered, 1),
        "counted": sum(int(e.get("count", 1)) for e in blocks) + shed,
        "answered": answered,
    }


def test_aggregation_under_a_flood(tmp_path: Path, figures: Figures) -> None:
    require_tools("unbound")
    upstream = Unbound(tmp_path)
    start_all([upstream])
    sides: dict[float, list[dict[str, float]]] = {0.0: [], 10.0: []}
    try:
        for i in range(PAIRS):
            for window in (0.0, 10.0):
                side = one_side(tmp_path / f"{i}-{window}", upstream, window)
                # every answered block is in the log, aggregated or shed (counted)
                assert side["counted"] >= side["answered"] * 0.99, side
                sides[window].append(side)
    finally:
        upstream.stop()

    def span(window: float, key: str, fmt: str) -> str:
        values = [s[key] for s in sides[window]]
        return f"{format(min(values), fmt)}-{format(max(values), fmt)}"

    for window, label in ((0.0, "aggregation off (every block an event)"),
                          (10.0, "aggregation on (10 s window, the default)")):
        figures.row(TABLE, f"{label}: blocks answered/s", span(window, "answered_per_s", ",.0f"))
        figures.row(TABLE, f"{label}: events appended/s", span(window, "events_per_s", ",.2f"))
        figures.row(TABLE, f"{label}: log bytes/s (event JSON + leaf hash)",
                    span(window, "bytes_per_s", ",.1f"))
        figures.row(TABLE, f"{label}: events per blocked query",
                    span(window, "events_per_query", ".2e"))
        figures.row(TABLE, f"{label}: log bytes per blocked query (event JSON + leaf hash)",
                    span(window, "bytes_per_query", ",.4f"))
        figures.row(TABLE, f"{label}: store growth per blocked query (SQLite pages)",
                    span(window, "pages_per_query", ",.1f"))
        figures.row(TABLE, f"{label}: blocks shed (counted in the log)",
                    span(window, "shed_fraction", ".1%"))
    ratios = [on["answered_per_s"] / off["answered_per_s"]
              for off, on in zip(sides[0.0], sides[10.0], strict=True)]
    figures.row(TABLE, "blocks answered/s, on/off (median of pairs)",
                f"{statistics.median(ratios):.2f}x")


def test_kill_9_loss_under_a_flood(tmp_path: Path, figures: Figures) -> None:
    require_tools("unbound")
    rows = []
    for i in range(3):
        node, answered, killed_at = crash_during_flood(tmp_path / str(i), window=0)
        events = read_events(node.events_path)
        logged = sum(1 for e in events if e["type"] == "block")
        shed = sum(int(e.get("count", 0)) for e in events if e["type"] == "shed")
        total = answered.answered_before(killed_at + 1)
        lost = max(total - logged - shed, 0)
        since = killed_at - answered.answers[logged + shed] if lost else 0.0
        rows.append((total, logged, shed, lost, since))
    for i, (total, logged, shed, lost, since) in enumerate(rows):
        figures.row(CRASH_TABLE, f"run {i + 1}",
                    f"{total:,} answered, {logged:,} logged, {shed:,} shed (said), "
                    f"{lost:,} lost, oldest lost answered {since:.3f} s before the kill")
