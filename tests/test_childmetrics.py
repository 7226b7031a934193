"""The parent asks a child for its counters over a socket pair: real threads and sockets,
and a real child process for the descriptor hand-over."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from netfilter.childmetrics import (
    ANSWER_BOUND,
    ENV,
    ChildCounters,
    add_snapshots,
    export_counters,
    merged,
)


def test_each_refresh_asks_again() -> None:
    counters = ChildCounters()
    values = {"proxy": {"requests": 0}}

    export_counters(os.dup(counters.theirs.fileno()), lambda: values)
    counters.started()
    counters.refresh()
    assert counters.part("proxy") == {"requests": 0}
    values["proxy"]["requests"] = 7
    assert counters.part("proxy") == {"requests": 0}  # read between scrapes: as asked
    counters.refresh()
    assert counters.part("proxy") == {"requests": 7}
    counters.close()


def test_matches_and_parts_keep_only_well_formed_values() -> None:
    counters = ChildCounters()
    snapshot = {"matches": [["proxy", "demo", "csam", "stoppage", 3], ["bad"], "x"],
                "engine": {"checks": 5, "name": "not a number"}}
    export_counters(os.dup(counters.theirs.fileno()), lambda: snapshot)
    counters.started()
    counters.refresh()
    assert counters.matches() == {("proxy", "demo", "csam", "stoppage"): 3}
    assert counters.part("engine") == {"checks": 5}
    assert counters.part("absent") == {}
    counters.close()


def test_a_child_that_does_not_answer_leaves_the_scrape_empty_not_stuck() -> None:
    counters = ChildCounters()  # nobody reads the other end
    done = threading.Event()

    def scrape() -> None:
        counters.refresh()
        done.set()

    threading.Thread(target=scrape, daemon=True).start()
    assert done.wait(ANSWER_BOUND + 5)  # bounded by the ask, not by the child
    assert counters.latest() == {}
    counters.close()


def test_an_endless_line_is_refused() -> None:
    counters = ChildCounters()
    theirs = counters.theirs

    def flood() -> None:
        theirs.recv(1)
        chunk = b"x" * 65536
        try:
            while True:
                theirs.sendall(chunk)
        except OSError:
            return

    threading.Thread(target=flood, daemon=True).start()
    counters.refresh()
    assert counters.latest() == {}
    counters.close()


def test_merged_sums_each_counter_over_processes() -> None:
    total = merged(lambda: {"appended": 2, "queued": 1}, [lambda: {"appended": 3}])
    assert total() == {"appended": 5, "queued": 1}


def test_the_descriptor_reaches_a_child_process() -> None:
    """As ProxyProcess hands it over: inherited by number, named in the environment."""
    counters = ChildCounters()
    fd = counters.child_fd()
    code = ("from netfilter.childmetrics import export_from_environment\n"
            "thread = export_from_environment(lambda: {'proxy': {'requests': 42}})\n"
            "assert thread is not None\n"
            "thread.join(20)\n")
    child = subprocess.Popen([sys.executable, "-c", code], pass_fds=(fd,),
                             env={**os.environ, ENV: str(fd)})
    counters.started()
    try:
        for _ in range(50):  # the child needs a moment to start its thread
            counters.refresh()
            if counters.latest():
                break
        assert counters.part("proxy") == {"requests": 42}
    finally:
        counters.close()  # the child's thread sees EOF and ends
        assert child.wait(20) == 0


@pytest.mark.parametrize("value", ["", "not-a-number", "999999"])
def test_a_bad_descriptor_is_one_warning(value: str, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    from netfilter.childmetrics import export_from_environment

    monkeypatch.setenv(ENV, value)
    assert export_from_environment(lambda: {}) is None
    assert ENV not in os.environ
    assert len(caplog.records) == (0 if value == "" else 1)



def test_an_earlier_runs_counts_are_carried_but_not_its_gauges() -> None:
    """What a restarted worker's earlier run counted is added to what it counts now:
    plain counters, histogram buckets and sums, rows per key; gauges and anything that
    is not a count are the live run's."""
    carried = {"engine": {"sink_failures": 2, "blocks_pending": 7},
               "dns": {"blocked": 10, "servfail": 1},
               "latency": {"counts": [1, 2, 3], "sum": 0.5},
               "matches": [["dns", "l1", "csam", "nxdomain", 4]],
               "upstreams": [["127.0.0.1:53", 1, 2]],
               "upstream_ok": False}
    live = {"engine": {"sink_failures": 0, "blocks_pending": 1},
            "dns": {"blocked": 3},
            "latency": {"counts": [0, 1, 1], "sum": 0.25},
            "matches": [["dns", "l1", "csam", "nxdomain", 1], ["dns", "l2", "csam", "refused", 5]],
            "upstreams": [["127.0.0.1:53", 0, 1]],
            "upstream_ok": True}
    total = add_snapshots(carried, live, {"engine": frozenset({"blocks_pending"})})
    assert total["engine"] == {"sink_failures": 2, "blocks_pending": 1}
    assert total["dns"] == {"blocked": 13, "servfail": 1}
    assert total["latency"] == {"counts": [1, 3, 4], "sum": 0.75}
    assert sorted(total["matches"]) == [["dns", "l1", "csam", "nxdomain", 5],
                                        ["dns", "l2", "csam", "refused", 5]]
    assert total["upstreams"] == [["127.0.0.1:53", 1, 3]]
    assert total["upstream_ok"] is True
    assert add_snapshots({}, live, {}) == live
