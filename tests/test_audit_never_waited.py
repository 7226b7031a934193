"""A resolver never waits on its log: with the store's write lock held by another process,
then with its disk full, every clean and blocked query is answered in time; the log sheds
(counted, loudly, rate-limited) and says so itself once it takes writes again, so every
block answered is still accounted for in the log."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from netfilter.audit.store import AuditStore
from netfilter.audit.verify import verify_log
from netfilter.keys import load_public_key
from tests.dns_support import (
    HOST,
    Netfilter,
    Unbound,
    free_port,
    read_events,
    require_tools,
    start_all,
)
from tests.support import fill_disk, hold_write_lock, small_tmpfs

CLIENTS = [f"127.0.0.{i}" for i in range(2, 202)]  # many keys: aggregation cannot absorb them


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MB tmpfs for the audit store. Not much smaller: SQLite lets its WAL grow to
    ~4 MB before it folds it back."""
    with small_tmpfs(tmp_path / "disk", 32) as disk:
        yield disk


class Tally:
    """Queries sent, and how each was answered (or not, within the client's timeout)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.blocked = 0
        self.clean = 0
        self.unanswered: list[str] = []
        self.sent = 0

    def ask(self, name: str, source: str, *, blocked: bool) -> None:
        self.sent += 1
        query = dns.message.make_query(name, "A")
        try:
            answer = dns.query.udp(query, HOST, port=self.port, timeout=2.0, source=source)
        except (dns.exception.Timeout, OSError) as e:
            self.unanswered.append(f"{name} from {source}: {type(e).__name__}")
            return
        if blocked:
            assert answer.rcode() == dns.rcode.NXDOMAIN, answer
            self.blocked += 1
        else:
            assert answer.rcode() == dns.rcode.NOERROR and answer.answer, answer
            self.clean += 1

    def run(self, seconds: float) -> None:
        """Clean and blocked names from many client addresses for `seconds` (bounded)."""
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end and i < 20000:
            source = CLIENTS[i % len(CLIENTS)]
            self.ask(f"n{i % 7}.blocked.example", source, blocked=True)
            self.ask("clean.example", source, blocked=False)
            i += 1


def metrics(port: int) -> dict[str, float]:
    """The node's /metrics, parsed by Prometheus' own parser."""
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5).read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples}


def test_locked_store_and_full_disk_never_stop_answers(tmp_path: Path,
                                                      small_disk: Path) -> None:
    require_tools("unbound")
    upstream = Unbound(tmp_path)
    node = Netfilter(tmp_path / "nf", upstreams=[upstream.address], audit_client="full")
    store_path = small_disk / "audit.sqlite"
    node.config["audit"].update({"path": str(store_path), "queue_size": 64,
                                 "checkpoint_interval": 1})
    metrics_port = free_port()
    node.config["metrics"] = {"listen": f"{HOST}:{metrics_port}"}
    node.conf.write_text(yaml.safe_dump(node.config), encoding="utf-8")
    start_all([upstream, node])
    try:
        tally = Tally(node.port)
        tally.run(1.0)  # the log takes writes
        holder = hold_write_lock(store_path, 6)
        tally.run(5.0)  # the store's write lock is held by another process
        assert holder.wait(30) == 0
        filler = fill_disk(small_disk)
        tally.run(5.0)  # the disk is full
        filler.unlink()
        tally.run(3.0)  # writes go through again
        assert tally.unanswered == [], tally.unanswered[:5]
        assert tally.blocked > 1000 and tally.clean > 1000
        scraped = metrics(metrics_port)  # the node says so in its metrics
        assert urllib.request.urlopen(f"http://{HOST}:{metrics_port}/healthz",
                                      timeout=5).read() == b"ok\n"
    finally:
        node.stop()
        upstream.stop()
    output = node.log()
    assert "Traceback" not in output
    shedding = [line for line in output.splitlines() if "events shed since" in line]
    assert 1 <= len(shedding) <= 4, shedding  # loud, and rate-limited (one per 10 s)
    events = read_events(store_path)
    shed = sum(int(e.get("count", 0)) for e in events if e["type"] == "shed")
    logged = sum(int(e.get("count", 1)) for e in events if e["type"] == "block")
    assert shed > 0, "the log says nothing of what it lost"
    assert logged + shed == tally.blocked  # every block answered is accounted for
    assert scraped["netfilter_audit_shed_total"] > 0
    assert scraped["netfilter_audit_shed_blocks_total"] <= shed
    assert scraped["netfilter_audit_append_failures_total"] > 0  # the full disk
    assert scraped["netfilter_audit_appended_total"] > 0
    assert scraped["netfilter_engine_sink_failures_total"] == 0
    store = AuditStore(store_path, create=False)
    report = verify_log(store, load_public_key(tmp_path / "nf" / "var" / "node.pub"))
    assert report.ok, report.problems
