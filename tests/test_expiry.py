"""A list that expires while in force: an hourly line, one event per version, and its
`on_expiry` applied without a reload (the engine's own watch)."""

from __future__ import annotations

import logging
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from netfilter.config import load_config
from netfilter.engine import Engine
from netfilter.events import MemorySink
from netfilter.expiry import ExpiryWatch
from tests.conftest import BuildBundle

BLOCKED = "http://blocked.example/"


def _engine(tmp_path: Path, bundle: Path, pub: Path, policy: str) -> tuple[Engine, MemorySink]:
    shutil.copy(bundle, tmp_path / "in-force.nfl")
    config = tmp_path / "netfilter.yaml"
    config.write_text(f"node: {{id: test-node}}\nlists:\n  - path: in-force.nfl\n"
                      f"    trust: [{pub}]\n    on_expiry: {policy}\n", encoding="utf-8")
    sink = MemorySink()
    return Engine(load_config(config), sink), sink


def _expired_events(sink: MemorySink) -> list[str]:
    return [e.detail or "" for e in sink.events if e.type == "list-expired"]


@pytest.mark.parametrize("policy", ["enforce", "stop"])
def test_a_list_expiring_in_force(policy: str, build: BuildBundle,
                                  authority: tuple[Path, Path], tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    engine, sink = _engine(tmp_path, build(expires=expires), authority[1], policy)
    watch = ExpiryWatch(engine, line_interval=3600)
    assert watch.check() == [] and engine.check_url(BLOCKED).blocked
    later = expires + timedelta(seconds=1)
    with caplog.at_level(logging.WARNING, logger="netfilter"):
        assert watch.check(later) == ["test"]
        for _ in range(5):  # within the hour: no line more, no event more
            watch.check(later)
    lines = [r.getMessage() for r in caplog.records if "expired at" in r.getMessage()]
    assert len(lines) == 1, lines
    assert len(_expired_events(sink)) == 1
    assert ("still enforced" if policy == "enforce" else "no longer enforced") in lines[0]
    # stop: a reload, each time (here the clock of the check is ahead of the load's, so
    # the reload keeps the list; the next test lets it really expire)
    assert (engine.reloads["ok"] > 0) == (policy == "stop")
    engine.close()


def test_stop_leaves_an_expired_list_out_at_once(build: BuildBundle,
                                                  authority: tuple[Path, Path],
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Expiring while in force under `stop`: the engine's own watch reloads and the
    list no longer blocks; the line is said again once an hour after."""
    expires = datetime.now(UTC) + timedelta(seconds=2)
    monkeypatch.setattr("netfilter.expiry.CHECK_INTERVAL", 0.2)
    engine, sink = _engine(tmp_path, build(expires=expires), authority[1], "stop")
    assert engine.expiry._thread is not None  # the watch runs on its own thread
    assert engine.check_url(BLOCKED).blocked
    deadline = time.monotonic() + 20
    while engine.check_url(BLOCKED).blocked and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not engine.check_url(BLOCKED).blocked
    assert engine.lists.stopped and "NOT enforced" in engine.lists.stopped[0]
    assert engine.reloads["ok"] >= 1
    assert len(_expired_events(sink)) >= 1
    engine.close()


def test_enforce_keeps_blocking_and_says_so_each_hour(build: BuildBundle,
                                                      authority: tuple[Path, Path],
                                                      tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    expires = datetime.now(UTC) - timedelta(days=1)  # expired before the start
    engine, sink = _engine(tmp_path, build(expires=expires), authority[1], "enforce")
    assert len(_expired_events(sink)) == 1  # said and recorded by the load
    watch = ExpiryWatch(engine, line_interval=0.2)
    watch.loaded(engine.lists)  # as the engine's own: the load's line counts
    with caplog.at_level(logging.WARNING, logger="netfilter"):
        watch.check()
        time.sleep(0.3)
        watch.check()
    lines = [r.getMessage() for r in caplog.records if "install a newer" in r.getMessage()]
    assert len(lines) == 1, lines  # the first check is within the load's interval
    assert len(_expired_events(sink)) == 1  # one event per version, not per line
    assert engine.check_url(BLOCKED).blocked
    engine.close()


def test_no_expiry_date_no_watch_thread(build: BuildBundle, authority: tuple[Path, Path],
                                        tmp_path: Path) -> None:
    engine, _ = _engine(tmp_path, build(), authority[1], "enforce")
    assert engine.expiry._thread is None
    engine.close()
