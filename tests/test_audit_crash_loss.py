"""What a kill -9 during a block flood loses from the log is bounded, by time and by count,
also while the keeper signs checkpoints and writes tiles every second; the log then
verifies, and its next start signs a checkpoint over what no checkpoint covered."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import yaml

from netfilter.audit.store import AuditStore
from netfilter.audit.verify import verify_log
from netfilter.keys import load_public_key
from tests.dns_support import Netfilter, Unbound, read_events, require_tools, start_all
from tests.flood import Flood, flood

QUEUE = 2048  # audit.queue_size for the test
LINGER = 0.25  # the appender's linger (audit/log.py)


def crash_during_flood(tmp_path: Path, *, window: float) -> tuple[Netfilter, Flood, float]:
    """A node flooded from two clients, killed with SIGKILL 3 s in; the answers' times."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    upstream = Unbound(tmp_path)
    node = Netfilter(tmp_path / "nf", upstreams=[upstream.address], audit_client="full")
    node.config["audit"].update({"queue_size": QUEUE, "checkpoint_interval": 1,
                                 "aggregate_window": window,
                                 "tiles": str(tmp_path / "nf" / "tiles")})
    node.conf.write_text(yaml.safe_dump(node.config), encoding="utf-8")
    start_all([upstream, node])
    results: list[Flood] = []
    stop = threading.Event()
    clients = [threading.Thread(target=lambda s=s: results.append(
        flood(node.port, 8.0, source=s, stop=stop))) for s in ("127.0.0.2", "127.0.0.3")]
    try:
        for c in clients:
            c.start()
        time.sleep(3.0)  # a flood under way, checkpoints and tiles every second
        assert node.proc is not None
        killed_at = time.monotonic()
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(10)
        stop.set()
        for c in clients:
            c.join(15)
    finally:
        stop.set()
        node.stop()
        upstream.stop()
    merged = Flood(answers=sorted(t for r in results for t in r.answers))
    return node, merged, killed_at


def test_kill_9_during_a_flood_loses_only_the_last_moments(tmp_path: Path) -> None:
    """Aggregation off, so every block is an event and the appender is overrun: what it
    cannot take is shed and said so in the log; what a kill loses beyond that is the
    last appender cycle (the linger and one commit), never seconds of blocks."""
    require_tools("unbound")
    node, answered, killed_at = crash_during_flood(tmp_path, window=0)
    events = read_events(node.events_path)
    # blocks the relay answered from its cache come as one event with a count per
    # (answer, client) and second: the log's blocks are the sum of the counts
    logged = sum(int(e.get("count") or 1) for e in events if e["type"] == "block")
    shed = sum(int(e.get("count", 0)) for e in events if e["type"] == "shed")
    accounted = logged + shed  # blocks the log holds, or says it could not hold
    total = answered.answered_before(killed_at + 1)  # answers in flight at the kill
    assert total > 2000, f"too little load to say anything ({total} answers)"
    lost = total - accounted
    # the oldest answer the log does not account for came this long before the kill
    missing_since = killed_at - answered.answers[accounted] if lost > 0 else 0.0
    print(f"kill -9 under load: {total} blocks answered, {logged} logged, {shed} shed "
          f"(and said so), {lost} lost, the oldest lost answered {missing_since:.3f} s "
          "before the kill")
    assert answered.answered_before(killed_at - (LINGER + 2.0)) <= accounted, (
        "blocks answered seconds before the kill are missing: the appender was starved")
    # the next start covers what no checkpoint covered, and the log verifies
    store = AuditStore(node.events_path)
    from netfilter.audit.log import AuditLog, load_node_key

    key = load_node_key(tmp_path / "nf" / "var" / "node.key")
    latest = store.latest_checkpoint()
    assert latest is None or latest.size <= store.size()
    tiles = tmp_path / "nf" / "tiles"  # whatever the killed keeper managed to write
    log = AuditLog(store, origin="dns-test", key=key, tiles=tiles)
    deadline = time.monotonic() + 10
    stored = len(events)
    while ((cp := store.latest_checkpoint()) is None or cp.size < stored) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    log.close()
    report = verify_log(store, load_public_key(tmp_path / "nf" / "var" / "node.pub"))
    assert report.ok, report.problems
    # the tiles catch up with the checkpoint the restart signed (the killed keeper may
    # have written some, or none under a loaded machine: either way they must follow)
    cp = store.latest_checkpoint()
    assert cp is not None
    published = (tiles / "checkpoint").read_text(encoding="utf-8")
    assert published.splitlines()[1] == str(cp.size), published


def test_kill_9_with_aggregation_keeps_the_first_block_of_every_key(tmp_path: Path) -> None:
    """With the default window, what a crash loses is repeat counts of open windows; the
    first block of each key (here: each client) was passed on at once and is logged."""
    require_tools("unbound")
    node, answered, _ = crash_during_flood(tmp_path, window=10.0)
    events = [e for e in read_events(node.events_path) if e["type"] == "block"]
    assert {e["client"] for e in events} == {"127.0.0.2", "127.0.0.3"}
    assert len(answered.answers) > 2000
    assert len(events) <= 2 * 2, [json.dumps(e) for e in events]  # a flood: 1 per window
