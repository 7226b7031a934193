"""Block aggregation: a flood costs one event per window, and every block is still counted."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netfilter.aggregate import BlockAggregator
from netfilter.audit.note import Signer
from netfilter.audit.report import authority_export, build_report
from netfilter.audit.store import AuditStore
from netfilter.config import load_config
from netfilter.engine import Engine
from netfilter.events import Event, MemorySink
from netfilter.keys import load_private_key
from netfilter.node import make_engine
from tests.conftest import BuildBundle


class Clock:
    """The aggregator's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def block(ref: str = "R-1", client: str | None = "p:aa", detail: str | None = "qtype=A",
          frontend: str = "dns") -> Event:
    return Event("block", "n1", frontend=frontend, list="hotline", version=3, ref=ref,
                 category="csam", action="block", client=client, detail=detail)


def counted(events: list[Event]) -> Counter[tuple[str | None, str | None]]:
    total: Counter[tuple[str | None, str | None]] = Counter()
    for e in events:
        if e.type == "block":
            total[(e.ref, e.client)] += e.count or 1
    return total


def test_a_flood_of_one_block_costs_one_event_per_window() -> None:
    sink, clock = MemorySink(), Clock()
    agg = BlockAggregator(sink, window=10.0, clock=clock)
    for _ in range(1000):  # 1000 blocks within the first window
        agg.record(block())
        clock.now += 0.005
    assert len(sink.events) == 1 and sink.events[0].count is None  # the first, at once
    for second in range(60):  # a minute more of the flood, 100 blocks per second
        for _ in range(100):
            agg.record(block())
            clock.now += 0.01
        assert len(sink.events) <= 2 + second // 10
    agg.flush()
    assert len(sink.events) <= 8
    assert counted(sink.events) == {("R-1", "p:aa"): 7000}
    summaries = sink.events[1:]
    assert all(e.count and e.first and e.last and e.first <= e.last for e in summaries)
    assert all(e.detail == "qtype=A" for e in summaries)  # repeats agreed on it


def test_distinct_clients_entries_and_frontends_are_told_apart() -> None:
    sink, clock = MemorySink(), Clock()
    agg = BlockAggregator(sink, window=10.0, clock=clock)
    for client in ("p:aa", "p:bb", None):
        for ref in ("R-1", "R-2"):
            for frontend in ("dns", "proxy"):
                for _ in range(3):
                    agg.record(block(ref, client, frontend=frontend))
    assert len(sink.events) == 12  # each key's first block at once
    agg.flush()
    assert counted(sink.events) == {(r, c): 6 for r in ("R-1", "R-2")
                                    for c in ("p:aa", "p:bb", None)}


def test_repeats_with_differing_detail_drop_it() -> None:
    sink = MemorySink()
    agg = BlockAggregator(sink, window=10.0, clock=Clock())
    for qtype in ("A", "AAAA", "A"):
        agg.record(block(detail=f"qtype={qtype}"))
    agg.flush()
    assert [e.detail for e in sink.events] == ["qtype=A", None]


def test_other_events_pass_at_once_and_window_zero_passes_all() -> None:
    sink = MemorySink()
    agg = BlockAggregator(sink, window=10.0, clock=Clock())
    for _ in range(3):
        agg.record(Event("list-loaded", "n1", list="hotline", version=3))
        agg.record(Event("override", "n1", list="hotline", ref="R-1"))
    assert len(sink.events) == 6
    off = MemorySink()
    agg = BlockAggregator(off, window=0, clock=Clock())
    for _ in range(5):
        agg.record(block())
    assert len(off.events) == 5


def test_open_windows_are_bounded_and_counts_stay_exact() -> None:
    sink, clock = MemorySink(), Clock()
    agg = BlockAggregator(sink, window=10.0, max_keys=100, clock=clock)
    for i in range(5000):  # a spoofed flood: a new client every block, each twice
        agg.record(block(client=f"p:{i:06d}"))
        agg.record(block(client=f"p:{i:06d}"))
        assert len(agg._open) <= 100
    agg.flush()
    assert sum(counted(sink.events).values()) == 10000
    assert set(counted(sink.events).values()) == {2}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["R-1", "R-2"]), st.sampled_from(["a", "b", "c"]),
                          st.floats(min_value=0, max_value=7)), max_size=300))
def test_counts_are_exact_whatever_the_timing(blocks: list[tuple[str, str, float]]) -> None:
    sink, clock = MemorySink(), Clock()
    agg = BlockAggregator(sink, window=5.0, clock=clock)
    for ref, client, gap in blocks:
        clock.now += gap
        agg.record(block(ref, client))
    agg.flush()
    assert counted(sink.events) == Counter((r, c) for r, c, _ in blocks)
    span = sum(g for _, _, g in blocks)
    for key in {(r, c) for r, c, _ in blocks}:  # at most a first and one per window
        events = [e for e in sink.events if (e.ref, e.client) == key]
        assert len(events) <= 2 * (span / 5.0 + 2)


def test_summaries_arrive_when_the_flood_stops() -> None:
    """No further traffic: the ticker still passes the window's count on."""
    sink = MemorySink()
    agg = BlockAggregator(sink, window=0.2)
    for _ in range(50):
        agg.record(block())
    deadline = time.monotonic() + 10
    while len(sink.events) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted(sink.events) == {("R-1", "p:aa"): 50}
    assert agg.pending() == 0


def test_a_flood_through_the_engine_is_one_event_and_counted_in_reports(
        build: BuildBundle, authority: tuple[Path, Path], tmp_path: Path) -> None:
    config = tmp_path / "netfilter.yaml"
    config.write_text(
        f"node: {{id: n1.example, key: var/node.key}}\n"
        f"lists:\n  - path: {build()}\n    trust: [{authority[1]}]\n"
        "audit: {path: var/audit.sqlite, client: pseudonym, checkpoint_interval: 3600}\n",
        encoding="utf-8")
    engine = make_engine(load_config(config))
    for _ in range(5000):
        assert engine.check_host("sub.blocked.example", client="192.0.2.1",
                                 detail="qtype=A").blocked
    for _ in range(7):
        assert engine.check_host("sub.blocked.example", client="192.0.2.2",
                                 detail="qtype=A").blocked
    engine.close()
    store = AuditStore(tmp_path / "var" / "audit.sqlite", create=False)
    events = [json.loads(leaf.event or b"") for leaf in store.leaves()]
    blocks = [e for e in events if e["type"] == "block"]
    assert len(blocks) == 4  # per client: the first at once, then one with the count
    assert sum(e.get("count", 1) for e in blocks) == 5007
    day = blocks[0]["time"][:10]
    report = build_report(store, day, day)
    assert sum(report.blocks.values()) == 5007
    signer = Signer.from_private_key("n1.example",
                                     load_private_key(tmp_path / "var" / "node.key"))
    export = authority_export(store, day, day, signer).decode()
    record = json.loads(export.splitlines()[2])
    assert record["hits"] == 5007 and record["first"] <= record["last"]


def test_a_failing_sink_is_one_line_per_interval_not_a_traceback_per_block(
        build: BuildBundle, authority: tuple[Path, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    class BrokenSink:
        def record(self, event: Event) -> None:
            raise OSError("disk gone")

    config = tmp_path / "netfilter.yaml"
    config.write_text(f"lists:\n  - path: {build()}\n    trust: [{authority[1]}]\n",
                      encoding="utf-8")
    engine = Engine(load_config(config), BrokenSink())
    for i in range(2000):
        assert engine.check_host("sub.blocked.example", client=f"192.0.2.{i % 250}").blocked
    lines = [r for r in caplog.records if "event sink failed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert "Traceback" not in caplog.text
