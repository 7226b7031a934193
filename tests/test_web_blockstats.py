"""Blocks per day, list and category for the transparency page, over a real audit store:
the window, aggregated counts, a bounded scan per refresh that catches up, and only
list, category and count taken from an event."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from netfilter.audit.merkle import leaf_hash
from netfilter.audit.store import AuditStore
from netfilter.events import Event
from netfilter.web.blockstats import BlockStats

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def _append(store: AuditStore, day: date, *events: Event) -> None:
    rows = []
    for event in events:
        data = event.to_json().encode()
        rows.append((leaf_hash(data), data, day.isoformat()))
    store.append(rows)


def _block(category: str = "csam", count: int | None = None, list_: str = "demo") -> Event:
    return Event("block", "n", time="2026-12-05T12:00:00Z", frontend="dns", list=list_,
                 version=1, ref="DEMO-0001", category=category, action="nxdomain",
                 client="192.0.2.7", target="blocked.example", count=count)


def test_counts_per_day_list_and_category_within_the_window(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "audit.sqlite")
    today = NOW.date()
    _append(store, today - timedelta(days=40), _block(), _block())  # outside the window
    _append(store, today - timedelta(days=2), _block(), _block(count=5),
            Event("list-loaded", "n", time="2026-12-03T00:00:00Z", list="demo", version=1))
    _append(store, today, _block("other"), _block(list_="local"), _block(count=3))
    stats = BlockStats(store, days=30)
    counts = stats.refresh(NOW)
    assert counts.complete and counts.size == 8
    assert counts.counts == {
        ((today - timedelta(days=2)).isoformat(), "demo", "csam"): 6,
        (today.isoformat(), "demo", "other"): 1,
        (today.isoformat(), "local", "csam"): 1,
        (today.isoformat(), "demo", "csam"): 3,
    }
    for key in counts.counts:  # nothing of a client or a name in what is kept
        assert "192.0.2.7" not in key and "blocked.example" not in key
    # later events are added to what was counted; days that leave the window go
    _append(store, today, _block())
    later = stats.refresh(NOW + timedelta(days=28, hours=12))
    assert later.counts == {(today.isoformat(), "demo", "other"): 1,
                            (today.isoformat(), "local", "csam"): 1,
                            (today.isoformat(), "demo", "csam"): 4}


def test_a_backlog_is_counted_a_bounded_number_of_leaves_at_a_time(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "audit.sqlite")
    _append(store, NOW.date(), *[_block() for _ in range(25)])
    stats = BlockStats(store, max_scan=10)
    seen = [stats.refresh(NOW) for _ in range(4)]
    assert [s.counted for s in seen] == [10, 20, 25, 25]
    assert [s.complete for s in seen] == [False, False, True, True]
    assert [sum(s.counts.values()) for s in seen] == [10, 20, 25, 25]


def test_the_first_refresh_starts_at_the_window(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "audit.sqlite")
    for back in range(60, -1, -1):  # one block a day for 61 days
        _append(store, NOW.date() - timedelta(days=back), _block())
    stats = BlockStats(store, days=30, max_scan=30)
    counts = stats.refresh(NOW)  # 30 leaves read: exactly the window's
    assert counts.complete and sum(counts.counts.values()) == 30


def test_the_dashboard_counts_by_front_end_too_and_never_by_client(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "audit.sqlite")
    proxy = Event("block", "n", time="2026-12-05T12:00:00Z", frontend="proxy", list="demo",
                  version=1, ref="DEMO-0001", category="csam", action="451",
                  client="192.0.2.7", target="http://blocked.example/", count=2)
    _append(store, NOW.date(), _block(), proxy)
    counts = BlockStats(store, days=30, fields=("list", "category", "frontend")).refresh(NOW)
    day = NOW.date().isoformat()
    assert counts.counts == {(day, "demo", "csam", "dns"): 1, (day, "demo", "csam", "proxy"): 2}
    for private in ("client", "target", "ref"):
        with pytest.raises(ValueError, match=private):
            BlockStats(store, fields=("list", private))
