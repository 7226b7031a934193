"""The audit log: sustained append rate through AuditLog, and verify_log of 1M events.

Append: 200,000 realistic block events (the engine's Event objects) recorded from one
thread into an AuditLog with its writer thread, timed from the first `record` to the
end of `flush` (every event committed, WAL, synchronous=FULL). Baseline in the same
run: the same events serialised with `to_json` and inserted with plain sqlite3
`executemany` in transactions of 4,096 rows (the writer's batch size), same pragmas,
no leaf hash, no thread. Also shown: the JSON-lines sink the audit log replaces
(flush per event), the time stamp + `Event.to_json` alone (the serialisation `record`
does on the caller's thread), and `AuditStore.append` of prebuilt canonical bytes
(hash + insert: what the writer thread itself costs).

Verify: a 1,000,000-event store built with `AuditStore.append` in batches of 100,000
(canonical events made by a template checked against `Event.to_json`, times spread
over 30 days), a signed checkpoint after each batch by `AuditLog.checkpoint`, then
`verify_log` against the node key. Baseline: a plain read of every row (sqlite3
SELECT of all columns in index order); also the read plus the RFC 9162 leaf hash of
every event, and `netfilter audit verify` as a subprocess (what an auditor runs).

Targets (evaluated in the figures summary, never asserted): >= 20,000 events/s
appended; verify_log of 1M events <= 60 s.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from netfilter.audit.log import AuditLog, load_node_key
from netfilter.audit.merkle import leaf_hash
from netfilter.audit.store import AuditStore
from netfilter.audit.verify import verify_log
from netfilter.events import Event, JsonLinesSink
from netfilter.keys import PrivateKey
from support import Figures

pytestmark = pytest.mark.slow

ORIGIN = "bench-node"
APPEND_EVENTS = 200_000
VERIFY_EVENTS = 1_000_000
BUILD_BATCH = 100_000
WRITER_BATCH = 4096  # AuditLog's default batch_size
APPEND_TABLE = f"audit append, {APPEND_EVENTS // 1000}k block events, 1 producer thread"
VERIFY_TABLE = f"audit verify, {VERIFY_EVENTS // 1_000_000}M events, 10 checkpoints"


@pytest.fixture(scope="module")
def node_key(tmp_path_factory: pytest.TempPathFactory) -> PrivateKey:
    return load_node_key(tmp_path_factory.mktemp("node") / "node.key")


def block_events(n: int) -> list[Event]:
    """What the DNS front-end records: pseudonymous client, list reference, qtype."""
    qtypes = ("A", "AAAA", "HTTPS", "MX")
    return [Event("block", ORIGIN, frontend="dns", list="authority-x", version=7,
                  ref=f"X-{i % 200_000}", category="csam", action="block",
                  client=f"p:{i * 2654435761 % (1 << 96):024x}", detail=f"qtype={qtypes[i % 4]}")
            for i in range(n)]


def _sqlite_baseline(path: Path, events: list[Event]) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE leaves (idx INTEGER PRIMARY KEY, event BLOB, day TEXT)")
    start = time.perf_counter()
    for at in range(0, len(events), WRITER_BATCH):
        rows = []
        for i, event in enumerate(events[at:at + WRITER_BATCH], at):
            when = datetime.now(UTC).isoformat(timespec="milliseconds")
            rows.append((i, replace(event, time=when).to_json().encode(), when[:10]))
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO leaves (idx, event, day) VALUES (?, ?, ?)", rows)
        db.execute("COMMIT")
    seconds = time.perf_counter() - start
    assert db.execute("SELECT COUNT(*) FROM leaves").fetchone()[0] == len(events)
    db.close()
    return seconds


def test_append_rate(node_key: PrivateKey, figures: Figures, tmp_path: Path) -> None:
    events = block_events(APPEND_EVENTS)
    unit = "event"

    base = _sqlite_baseline(tmp_path / "baseline.sqlite", events)
    figures.time(APPEND_TABLE, "to_json + sqlite3 executemany (no hash, no thread)",
                 base / len(events), baseline=True, unit=unit)

    sink = JsonLinesSink(tmp_path / "events.jsonl")
    start = time.perf_counter()
    for event in events:
        sink.record(event)
    lines = time.perf_counter() - start
    sink.close()
    figures.time(APPEND_TABLE, "JSON-lines file (JsonLinesSink, flush per event)",
                 lines / len(events), unit=unit)

    log = AuditLog(AuditStore(tmp_path / "audit.sqlite"), origin=ORIGIN, key=node_key,
                   checkpoint_interval=3600)
    start = time.perf_counter()
    for event in events:
        log.record(event)
    recorded = time.perf_counter() - start
    log.flush(timeout=600)
    total = time.perf_counter() - start
    shed = log.shed
    log.close()
    assert log.appended == log.store.size()
    blocks = sum(1 for leaf in log.store.leaves() if b'"type":"block"' in (leaf.event or b""))
    assert blocks + shed == len(events)  # what was shed is counted (and said in the log)
    figures.time(APPEND_TABLE, "AuditLog.record + flush (writer thread)", total / len(events),
                 unit=unit, note="sustained: first record to last commit")
    figures.time(APPEND_TABLE, "AuditLog.record calls alone (caller side)",
                 recorded / len(events), unit=unit,
                 note=f"{shed:,} of them shed by the full queue ({log.queue.maxsize:,})")

    start = time.perf_counter()
    rows = [replace(event, time=datetime.now(UTC).isoformat(timespec="milliseconds"))
            .to_json().encode() for event in events]
    serialised = time.perf_counter() - start
    figures.time(APPEND_TABLE, "time stamp + Event.to_json alone (no storage)",
                 serialised / len(events), unit=unit, note="the serialisation in record()")
    store = AuditStore(tmp_path / "store.sqlite")
    start = time.perf_counter()
    for at in range(0, len(rows), WRITER_BATCH):
        store.append([(leaf_hash(e), e, e[e.find(b'"time":"') + 8:][:10].decode())
                      for e in rows[at:at + WRITER_BATCH]])
    appended = time.perf_counter() - start
    figures.time(APPEND_TABLE, "AuditStore.append of prebuilt JSON (hash + insert)",
                 appended / len(events), unit=unit, note="the writer thread's own work")
    figures.target(">= 20,000 events/s through AuditLog (writer thread)", APPEND_TABLE,
                   "AuditLog.record + flush (writer thread)", "rate", 20_000)
    report = verify_log(log.store, node_key.public)
    assert report.ok and report.size == len(events)


# ---------------------------------------------------------------- 1M events

_TEMPLATE = ('{{"action":"block","category":"csam","client":"p:{client:024x}",'
             '"detail":"qtype={qtype}","frontend":"dns","list":"authority-x",'
             '"node":"bench-node","ref":"X-{ref}","time":"{time}","type":"block",'
             '"version":7}}')
_QTYPES = ("A", "AAAA", "HTTPS", "MX")


def _canonical(i: int, when: str) -> bytes:
    return _TEMPLATE.format(client=i * 2654435761 % (1 << 96), qtype=_QTYPES[i % 4],
                            ref=i % 200_000, time=when).encode()


def _times(start: datetime, first: int, count: int, step_ms: int) -> list[str]:
    """ISO times (milliseconds, +00:00) of events first..first+count, step_ms apart."""
    out = []
    base = start + timedelta(milliseconds=first * step_ms)
    day = base.replace(hour=0, minute=0, second=0, microsecond=0)
    ms = int((base - day).total_seconds() * 1000)
    prefix = day.strftime("%Y-%m-%d")
    for _ in range(count):
        if ms >= 86_400_000:
            day += timedelta(days=1)
            prefix = day.strftime("%Y-%m-%d")
            ms -= 86_400_000
        s, milli = divmod(ms, 1000)
        h, rest = divmod(s, 3600)
        m, sec = divmod(rest, 60)
        out.append(f"{prefix}T{h:02d}:{m:02d}:{sec:02d}.{milli:03d}+00:00")
        ms += step_ms
    return out


@pytest.fixture(scope="module")
def million(tmp_path_factory: pytest.TempPathFactory, node_key: PrivateKey,
            figures: Figures) -> Path:
    path = tmp_path_factory.mktemp("million") / "audit.sqlite"
    start_time = (datetime.now(UTC) - timedelta(days=30)).replace(microsecond=0)
    step_ms = 30 * 86_400_000 // VERIFY_EVENTS  # 1M events over 30 days
    sample = _times(start_time, 0, 5, step_ms)
    for i, (event, when) in enumerate(zip(block_events(5), sample, strict=True)):
        # the template gives exactly the engine's canonical form
        assert _canonical(i, when) == replace(event, time=when).to_json().encode()
    store = AuditStore(path)
    log = AuditLog(store, origin=ORIGIN, key=node_key, checkpoint_interval=3600)
    start = time.perf_counter()
    for at in range(0, VERIFY_EVENTS, BUILD_BATCH):
        times = _times(start_time, at, BUILD_BATCH, step_ms)
        rows = []
        for i, when in enumerate(times, at):
            data = _canonical(i, when)
            rows.append((leaf_hash(data), data, when[:10]))
        store.append(rows)
        log.checkpoint()
    built = time.perf_counter() - start
    log.close()
    store.close()
    size = os.path.getsize(path) + sum(os.path.getsize(p) for p in (
        path.with_name(path.name + "-wal"),) if p.exists())
    figures.row("audit verify: the 1M-event store", "build (append 10 x 100k + checkpoint)",
                f"{built:.1f} s; {size / 2**20:,.0f} MiB on disk, "
                f"{len(_canonical(0, sample[0]))} B per event")
    return path


def test_verify_million(million: Path, node_key: PrivateKey, figures: Figures,
                        tmp_path: Path) -> None:
    db = sqlite3.connect(million)
    start = time.perf_counter()
    n = 0
    for _ in db.execute("SELECT idx, hash, event, day, removed FROM leaves ORDER BY idx"):
        n += 1
    plain = time.perf_counter() - start
    assert n == VERIFY_EVENTS
    figures.time(VERIFY_TABLE, "plain read of all rows (sqlite3 SELECT)", plain,
                 baseline=True, unit="run")

    start = time.perf_counter()
    bad = 0
    for _, h, event in db.execute("SELECT idx, hash, event FROM leaves ORDER BY idx"):
        bad += leaf_hash(event) != h
    hashed = time.perf_counter() - start
    assert bad == 0
    db.close()
    figures.time(VERIFY_TABLE, "read + leaf hash of every event", hashed, unit="run")

    store = AuditStore(million, create=False)
    start = time.perf_counter()
    report = verify_log(store, node_key.public)
    verified = time.perf_counter() - start
    assert report.ok, report.problems
    assert (report.size, report.checkpoints) == (VERIFY_EVENTS, VERIFY_EVENTS // BUILD_BATCH)
    figures.time(VERIFY_TABLE, "verify_log", verified, unit="run",
                 note="every leaf rehashed, tree rebuilt, 10 checkpoints checked")
    figures.target("verify_log of 1M events <= 60 s", VERIFY_TABLE, "verify_log", "seconds", 60)

    pub = tmp_path / "node.pub"
    pub.write_bytes(node_key.public.pem())
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "netfilter.cli", "audit", "verify", "--log",
                             str(million), "--trust", str(pub)],
                            capture_output=True, text=True, timeout=600)
    cli = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert f"OK {million}: 1000000 events, 10 signed checkpoints" in result.stdout
    figures.time(VERIFY_TABLE, "netfilter audit verify (subprocess)", cli, unit="run",
                 note="includes interpreter start-up")
