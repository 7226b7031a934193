"""List updates from a local directory source: install, conditional checks, rollback
refused across restarts (and forced with --allow-rollback), freeze alarm, the periodic
task with its back-off, and the updater killed with -9 at every step of an install.

Real bundles from the project's builder (reserved names only), a real SQLite state
file, real child processes for the restarts and the kills.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from netfilter.config import load_config
from netfilter.errors import ConfigError
from netfilter.events import MemorySink
from netfilter.keys import generate_keypair, load_public_key
from netfilter.listfile import open_bundle
from netfilter.lists import ListSource, load_lists
from netfilter.updates import STEPS, Updater, VersionState, judge, state_path
from netfilter.updates.state import Judgement
from tests.conftest import SOURCE, BuildBundle
from tests.support import REPO, read_events

OTHER = SOURCE + "  - {domain: another.test, ref: T-9, category: csam}\n"


class Node:
    """A node directory with one list whose source is a directory (or `source`)."""

    def __init__(self, tmp_path: Path, pub: Path, *, source: str | None = None,
                 audit: bool = False, updates: dict[str, Any] | None = None) -> None:
        self.dir = tmp_path / "node"
        self.published = tmp_path / "published"
        self.published.mkdir(parents=True, exist_ok=True)
        self.target = self.dir / "lists" / "test.nfl"
        self.pub = pub
        self.data: dict[str, Any] = {
            "node": {"id": "updates-test.example", "key": "node.key"},
            "lists": [{"path": "lists/test.nfl", "trust": [str(pub)],
                       "source": source or str(self.published)}],
            "updates": updates or {},
        }
        if audit:
            self.data["audit"] = {"path": "audit.sqlite", "client": "none",
                                  "checkpoint_interval": 3600}
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "netfilter.yaml"
        self.config.write_text(yaml.safe_dump(self.data), encoding="utf-8")
        self.settings = load_config(self.config)

    def publish(self, bundle: Path) -> None:
        """What an authority's mirror does: the new file appears whole, new inode."""
        tmp = self.published / ".incoming"
        shutil.copyfile(bundle, tmp)
        os.replace(tmp, self.published / "test.nfl")

    def updater(self, sink: MemorySink | None = None, **kw: Any) -> Updater:
        return Updater(self.settings, sink if sink is not None else MemorySink(), **kw)

    def installed_version(self) -> int:
        bundle = open_bundle(self.target, [load_public_key(self.pub)], allow_expired=True)
        try:
            return bundle.manifest.version
        finally:
            bundle.close()

    def stages(self) -> list[Path]:
        return sorted(self.target.parent.glob(".test.nfl.update-*"))


@pytest.fixture
def node(tmp_path: Path, authority: tuple[Path, Path]) -> Node:
    return Node(tmp_path, authority[1])


def _types(sink: MemorySink) -> list[tuple[str, str | None, int | None]]:
    return [(e.type, e.action, e.version) for e in sink.events]


# ------------------------------------------------------------ install and check


def test_a_directory_source_installs_then_checks_cheaply(node: Node, build: BuildBundle) -> None:
    node.publish(build(version=1))
    sink = MemorySink()
    updater = node.updater(sink)
    [first] = updater.run_once()
    assert (first.outcome, first.list_id, first.version, first.previous) == (
        "installed", "test", 1, None)
    assert node.target.read_bytes() == (node.published / "test.nfl").read_bytes()
    assert _types(sink) == [("list-loaded", "install", 1)]
    # not world-writable; the state file is the node's alone
    assert stat.S_IMODE(node.target.stat().st_mode) == 0o644
    state = state_path(node.settings)
    assert state == node.dir / "list-state.sqlite"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600

    before = node.target.stat()
    [second] = updater.run_once()
    assert (second.outcome, second.version, second.not_modified) == ("current", 1, True)
    after = node.target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(sink.events) == 1  # nothing happened, nothing recorded

    node.publish(build(version=2))
    [third] = updater.run_once()
    assert (third.outcome, third.version, third.previous) == ("installed", 2, 1)
    assert node.installed_version() == 2
    assert _types(sink)[-1] == ("list-loaded", "install", 2)
    assert not node.stages()
    updater.close()


def test_the_callback_runs_once_after_an_install(node: Node, build: BuildBundle) -> None:
    calls: list[list[str]] = []
    updater = node.updater(on_install=calls.append)
    node.publish(build(version=3))
    updater.run_once()
    updater.run_once()
    assert calls == [["test"]]
    updater.close()


def test_a_bundle_in_place_seeds_the_record(node: Node, build: BuildBundle) -> None:
    """A node that installed v5 by hand before updates were configured: v4 from the
    source is a rollback, even though the updater never ran before."""
    node.target.parent.mkdir(parents=True)
    shutil.copyfile(build(version=5), node.target)
    node.publish(build(version=4))
    [result] = node.updater().run_once()
    assert result.outcome == "refused" and "rollback" in result.reason
    assert node.installed_version() == 5


def test_a_damaged_bundle_in_place_is_fetched_whole(node: Node, build: BuildBundle) -> None:
    node.publish(build(version=1))
    updater = node.updater()
    updater.run_once()
    node.target.write_bytes(node.target.read_bytes()[:2000])  # truncated by a disk fault
    [result] = updater.run_once()  # no conditional check: the bundle is not the record's
    assert (result.outcome, result.version) == ("installed", 1)
    assert node.installed_version() == 1
    updater.close()


@pytest.mark.parametrize("fault", ["foreign key", "expired", "not a bundle", "absent"])
def test_a_bad_source_leaves_the_list_in_place(node: Node, build: BuildBundle,
                                               tmp_path: Path, fault: str) -> None:
    node.publish(build(version=1))
    sink = MemorySink()
    updater = node.updater(sink)
    updater.run_once()
    if fault == "foreign key":
        from netfilter.keys import load_private_key
        from netfilter.listfile import build_bundle

        key, _ = generate_keypair(tmp_path / "intruder")
        (tmp_path / "src.yaml").write_text(SOURCE, encoding="utf-8")
        build_bundle(tmp_path / "src.yaml", tmp_path / "foreign.nfl",
                     key=load_private_key(key), list_id="test", version=2)
        node.publish(tmp_path / "foreign.nfl")
    elif fault == "expired":
        node.publish(build(version=2, expires=datetime.now(UTC) - timedelta(hours=1)))
    elif fault == "not a bundle":
        (tmp_path / "junk").write_bytes(b"<html>maintenance</html>")
        node.publish(tmp_path / "junk")
    else:
        (node.published / "test.nfl").unlink()
    [result] = updater.run_once()
    if fault == "absent":
        assert result.outcome == "failed" and "no bundle" in result.reason
    else:
        assert result.outcome == "refused"
        refused = sink.events[-1]
        assert refused.type == "list-refused"
        assert refused.action == ("expired" if fault == "expired" else "verify")
    assert node.installed_version() == 1
    assert not node.stages()
    updater.close()


def test_a_source_serving_another_list_is_refused(node: Node, build: BuildBundle) -> None:
    node.publish(build(version=1))
    updater = node.updater()
    updater.run_once()
    node.publish(build(version=9, list_id="other"))
    [result] = updater.run_once()
    assert result.outcome == "refused" and "serves list other" in result.reason
    assert node.installed_version() == 1
    updater.close()


# ------------------------------------------------------------ rollback


def test_judge() -> None:
    from netfilter.updates.state import Installed

    now = datetime.now(UTC)
    rec = Installed("l", 5, "a" * 64, now, now)
    assert judge(None, 1, "x") is Judgement.NEW
    assert judge(rec, 6, "b" * 64) is Judgement.NEW
    assert judge(rec, 5, "a" * 64) is Judgement.SAME
    assert judge(rec, 5, "b" * 64) is Judgement.CONFLICT
    assert judge(rec, 4, "a" * 64) is Judgement.ROLLBACK




def _list_update(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`netfilter list update ...` in its own process (a restart between any two)."""
    return subprocess.run([sys.executable, "-m", "netfilter.cli", "list", "update",
                           *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_rollback_is_refused_across_restarts_and_forced_with_a_record(
        tmp_path: Path, authority: tuple[Path, Path], build: BuildBundle) -> None:
    node = Node(tmp_path, authority[1], audit=True)
    node.publish(build(version=2))
    done = _list_update("--config", node.config)
    assert done.returncode == 0, done
    assert "installed version 2" in done.stdout
    again = _list_update("--config", node.config)
    assert again.returncode == 0 and "up to date, version 2 (not modified)" in again.stdout

    node.publish(build(version=1))  # lower: a new process, a new state object, refused
    lower = _list_update("--config", node.config)
    assert lower.returncode == 1, lower
    assert "refused" in lower.stdout and "rollback" in lower.stdout
    node.publish(build(OTHER, version=2))  # equal version, another digest
    other = _list_update("--config", node.config)
    assert other.returncode == 1 and "another manifest digest" in other.stdout
    assert node.installed_version() == 2
    assert VersionState(state_path(node.settings)).check("test", 2, "0" * 64) is not None

    forced = _list_update("--config", node.config, "--allow-rollback")
    assert forced.returncode == 0, forced
    assert "ROLLBACK forced" in forced.stdout
    bundle = open_bundle(node.target, [load_public_key(node.pub)])
    assert bundle.manifest.entries == 9  # OTHER's
    bundle.close()

    events = [e for e in read_events(node.dir / "audit.sqlite") if e["type"] != "checkpoint"]
    kinds = [(e["type"], e.get("action"), e.get("version")) for e in events
             if e["type"].startswith("list-")]
    assert kinds == [("list-loaded", "install", 2), ("list-refused", "rollback", 1),
                     ("list-refused", "conflict", 2), ("list-loaded", "allow-rollback", 2)]
    assert "rollback" in events[-1]["detail"].lower() and "--allow-rollback by" in (
        events[-1]["detail"])
    # the forced version is the record now: the old v2 is another digest again
    node.publish(build(version=2))
    assert _list_update("--config", node.config).returncode == 1


def test_the_record_refuses_a_bundle_copied_back_by_hand(node: Node, build: BuildBundle) -> None:
    """What a loader asks the state (VersionState.check) at start."""
    old = build(version=1)
    node.publish(old)
    node.updater().run_once()
    node.publish(build(version=2))
    node.updater().run_once()
    bundle = open_bundle(old, [load_public_key(node.pub)])
    from netfilter.updates.install import manifest_digest

    digest = manifest_digest(bundle)
    bundle.close()
    state = VersionState(state_path(node.settings))
    reason = state.check("test", 1, digest)
    assert reason is not None and "rollback refused" in reason
    assert state.check("test", 3, digest) is None
    state.close()


def test_a_node_refuses_at_start_a_bundle_older_than_its_record(
        tmp_path: Path, authority: tuple[Path, Path], build: BuildBundle) -> None:
    """The engine a node runs on (node.make_engine) asks the durable record: a version
    2 once in force, then version 1 copied back by hand and a restart: refused in one
    line, recorded as list-refused; version 2 back in place loads again."""
    from netfilter.errors import BundleError
    from netfilter.node import make_engine

    node = Node(tmp_path, authority[1], audit=True)
    node.target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(build(version=2), node.target)
    make_engine(node.settings).close()  # in force once: the record rises to 2
    shutil.copyfile(build(version=1), node.target)
    with pytest.raises(BundleError, match="rollback refused.*--allow-rollback"):
        make_engine(node.settings)
    refused = [e for e in read_events(node.dir / "audit.sqlite") if e["type"] == "list-refused"]
    assert len(refused) == 1 and "lower than the installed version 2" in refused[0]["detail"]
    shutil.copyfile(build(version=3), node.target)
    engine = make_engine(node.settings)
    assert engine.lists.versions() == {"test": 3}
    engine.close()
    assert VersionState(state_path(node.settings)).installed("test").version == 3  # type: ignore[union-attr]


def test_a_second_updater_is_told_the_first_runs(node: Node, build: BuildBundle) -> None:
    node.publish(build(version=1))
    lock = state_path(node.settings).with_name("list-state.sqlite.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        [result] = node.updater().run_once()
    assert result.outcome == "busy"
    assert not node.target.exists()


# ------------------------------------------------------------ freeze


def test_a_source_serving_an_old_version_raises_the_freeze_alarm(
        node: Node, build: BuildBundle) -> None:
    node.publish(build(version=1))
    sink = MemorySink()
    later = [datetime.now(UTC)]
    updater = node.updater(sink, clock=lambda: later[0])
    [fresh] = updater.run_once()
    assert not fresh.frozen
    later[0] += timedelta(days=3)  # max_age is 2 days by default
    [stale] = updater.run_once()
    assert stale.outcome == "current" and stale.frozen
    assert "FREEZE" in stale.line()
    [again] = updater.run_once()
    assert again.frozen
    freezes = [e for e in sink.events if e.type == "list-expired"]
    assert len(freezes) == 1 and freezes[0].action == "freeze"  # once per version
    assert "freeze attack" in (freezes[0].detail or "")
    node.publish(build(version=2))
    later[0] = datetime.now(UTC)
    [new] = updater.run_once()
    assert new.outcome == "installed" and not new.frozen
    updater.close()


def test_the_cli_says_freeze_in_its_status(tmp_path: Path, authority: tuple[Path, Path],
                                           build: BuildBundle) -> None:
    node = Node(tmp_path, authority[1], updates={"max_age": 4})
    node.publish(build(version=1))  # issued now (to the second)
    first = _list_update("--config", node.config)
    assert first.returncode == 0, first
    time.sleep(5)  # the bundle in place is now older than max_age
    done = _list_update("--config", node.config)
    assert done.returncode == 4, done
    assert "FREEZE ALARM" in done.stdout


# ------------------------------------------------------------ the periodic task


def test_back_off_doubles_to_its_cap_and_a_success_resets_it(node: Node) -> None:
    cfg = Node(node.dir.parent / "b", node.pub, updates={
        "interval": 600, "jitter": 30, "retry_min": 10, "retry_max": 80})
    updater = cfg.updater(rng=random.Random(7))
    waits = [updater.next_delay(failed=True) for _ in range(6)]
    for wait, cap in zip(waits, [10, 20, 40, 80, 80, 80], strict=True):
        assert cap / 2 <= wait <= cap
    assert 570 <= updater.next_delay(failed=False) <= 630
    assert updater.failures == 0
    assert 5 <= updater.next_delay(failed=True) <= 10


def test_the_periodic_task_installs_and_calls_back(
        tmp_path: Path, authority: tuple[Path, Path], build: BuildBundle) -> None:
    node = Node(tmp_path, authority[1], updates={"interval": 1, "jitter": 0})
    node.publish(build(version=1))
    installed = threading.Event()
    seen: list[list[str]] = []

    def reload(ids: list[str]) -> None:
        seen.append(ids)
        installed.set()

    updater = node.updater(on_install=reload)
    updater.start()
    try:
        assert installed.wait(10)
        installed.clear()
        node.publish(build(version=2))
        assert installed.wait(10)
    finally:
        updater.close()
    assert seen == [["test"], ["test"]]
    assert node.installed_version() == 2


# ------------------------------------------------------------ configuration


@pytest.mark.parametrize("source", ["http://authority.example/test.nfl",
                                    "ftp://authority.example/", " "])
def test_a_source_must_be_https_or_a_path(tmp_path: Path, authority: tuple[Path, Path],
                                          source: str) -> None:
    with pytest.raises(ConfigError, match=r"lists\[0\]\.source"):
        Node(tmp_path, authority[1], source=source)


def test_retry_bounds_are_ordered(tmp_path: Path, authority: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="retry_max"):
        Node(tmp_path, authority[1], updates={"retry_min": 100, "retry_max": 10})


# ------------------------------------------------------------ killed at each step


_KILLED = """
import sys, time
from netfilter.config import load_config
from netfilter.events import MemorySink
from netfilter.updates import Updater

def step(name):
    if name == sys.argv[2]:
        print(name, flush=True)
        time.sleep(60)  # bounded: the test kills us long before

Updater(load_config(sys.argv[1]), MemorySink(), step=step).run_once()
print("finished", flush=True)
"""


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_leaves_a_whole_list(node: Node, build: BuildBundle,
                                                step: str) -> None:
    old, new = build(version=1), build(OTHER, version=2)
    node.publish(old)
    node.updater().run_once()
    node.publish(new)
    child = subprocess.Popen([sys.executable, "-c", _KILLED, str(node.config), step],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == step
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    # the bundle in place is the whole old or the whole new one, and it loads
    data = node.target.read_bytes()
    expect_new = STEPS.index(step) >= STEPS.index("renamed")
    assert data == (new if expect_new else old).read_bytes()
    lists = load_lists([ListSource(node.target, [node.pub])])
    assert lists.versions() == {"test": 2 if expect_new else 1}
    # the next run finishes the job (or sees it done) and cleans up
    [result] = node.updater().run_once()
    assert result.outcome == ("current" if expect_new else "installed"), result
    assert node.installed_version() == 2
    assert not node.stages()
    recorded = VersionState(state_path(node.settings)).installed("test")
    assert recorded is not None and recorded.version == 2


def test_a_failing_source_raises_the_freeze_alarm_too(node: Node, build: BuildBundle) -> None:
    """An attacker who blocks the source freezes the node as well as one who replays."""
    node.publish(build(version=1))
    sink = MemorySink()
    later = [datetime.now(UTC)]
    updater = node.updater(sink, clock=lambda: later[0])
    updater.run_once()
    (node.published / "test.nfl").unlink()
    later[0] += timedelta(days=3)
    [result] = updater.run_once()
    assert (result.outcome, result.version, result.frozen) == ("failed", 1, True)
    [freeze] = [e for e in sink.events if e.type == "list-expired"]
    assert freeze.action == "freeze" and "failed" in (freeze.detail or "")
    updater.close()


def test_a_keyed_list_needs_its_configured_key(tmp_path: Path, authority: tuple[Path, Path],
                                               build: BuildBundle) -> None:
    old_key, new_key = tmp_path / "old.key", tmp_path / "new.key"
    old_key.write_bytes(b"k" * 32)
    new_key.write_bytes(b"n" * 32)
    os.chmod(old_key, 0o600)
    os.chmod(new_key, 0o600)
    node = Node(tmp_path, authority[1])
    node.data["lists"][0]["hmac_key"] = str(old_key)
    node.config.write_text(yaml.safe_dump(node.data), encoding="utf-8")
    node.settings = load_config(node.config)
    node.publish(build(version=1, hash_name="hmac-sha256", hmac_key=b"k" * 32))
    sink = MemorySink()
    updater = node.updater(sink)
    assert updater.run_once()[0].outcome == "installed"
    node.publish(build(version=2, hash_name="hmac-sha256", hmac_key=b"n" * 32))
    [result] = updater.run_once()  # the authority rotated the list key; not configured yet
    assert result.outcome == "refused" and "configure the new key first" in result.reason
    assert sink.events[-1].action == "hmac-key"
    assert node.installed_version() == 1
    updater.close()


def test_the_record_only_rises(tmp_path: Path) -> None:
    state = VersionState(tmp_path / "state.sqlite")
    now = datetime.now(UTC)
    assert state.follow("l", 3, "a" * 64, now) is Judgement.NEW
    assert state.follow("l", 2, "b" * 64, now) is Judgement.ROLLBACK
    assert state.follow("l", 3, "b" * 64, now) is Judgement.CONFLICT
    assert state.follow("l", 3, "a" * 64, now) is Judgement.SAME
    state.close()
    again = VersionState(tmp_path / "state.sqlite")  # a restart
    recorded = again.installed("l")
    assert recorded is not None and (recorded.version, recorded.digest) == (3, "a" * 64)
    again.close()


def test_a_loader_asks_the_record_with_the_bundle(node: Node, build: BuildBundle) -> None:
    """What the engine is to call at load (check_bundle) and once in force (follow_bundle)."""
    keys = [load_public_key(node.pub)]
    v1 = open_bundle(build(version=1), keys)
    v2 = open_bundle(build(version=2), keys)
    state = VersionState(state_path(node.settings))
    try:
        assert state.check_bundle(v1) is None
        assert state.follow_bundle(v2) is Judgement.NEW
        reason = state.check_bundle(v1)
        assert reason is not None and "rollback refused" in reason
        assert state.check_bundle(v2) is None
    finally:
        v1.close()
        v2.close()
        state.close()


def test_only_the_named_lists_are_checked(tmp_path: Path, authority: tuple[Path, Path],
                                          build: BuildBundle) -> None:
    node = Node(tmp_path, authority[1])
    second = tmp_path / "published-2"
    second.mkdir()
    node.data["lists"].append({"path": "lists/second.nfl", "trust": [str(node.pub)],
                               "source": str(second)})
    node.config.write_text(yaml.safe_dump(node.data), encoding="utf-8")
    node.settings = load_config(node.config)
    node.publish(build(version=1))
    shutil.copyfile(build(version=1, list_id="second"), second / "second.nfl")
    updater = node.updater()
    assert [r.list_id for r in updater.run_once(only=["second.nfl"])] == ["second"]
    assert [r.outcome for r in updater.run_once(only=["second"])] == ["current"]  # by id
    assert [(r.list_id, r.outcome) for r in updater.run_once()] == [
        ("test", "installed"), ("second", "current")]
    assert updater.run_once(only=["absent"]) == []
    updater.close()
