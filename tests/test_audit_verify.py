"""`netfilter audit verify` against what an attacker with write access to the store can
do beyond altering a hashed body, and `netfilter audit export`, as an auditor runs them
(a real subprocess over real logs built with AuditLog):

- a body removed outside retention (the `day` and `removed` columns are not hashed):
  accepted only as a retention event after it explains it, and never behind a kept
  event from after the cutoff;
- the summary claims consistency with the auditor's checkpoint only when it held;
- no input file ends in a traceback: one line naming the file and the reason;
- the newest events no checkpoint covers are named (a warning), with the latest
  checkpoint's size and time;
- an export carries no pseudonym keys, includes what is only in a running node's WAL,
  and verifies as the original does.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from netfilter.audit import merkle
from netfilter.audit.checkpoint import Checkpoint, sign_checkpoint
from netfilter.audit.log import AuditLog, load_node_key
from netfilter.audit.merkle import leaf_hash
from netfilter.audit.note import Signer
from netfilter.audit.store import AuditStore, StoredCheckpoint, keys_path
from netfilter.audit.verify import verify_log
from netfilter.events import Event
from netfilter.keys import PrivateKey
from netfilter.privacy import ClientRecorder

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = "verify-node"
RETENTION_DAYS = 30


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netfilter.cli", "audit", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def run_all(cases: Sequence[Sequence[str | Path]]) -> list[subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda args: run(*args), cases))


def iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds")


def row(time: str, ref: str) -> tuple[bytes, bytes, str]:
    data = Event("block", ORIGIN, time=time, ref=ref).to_json().encode()
    return leaf_hash(data), data, time[:10]


def copy_log(src: Path, dst: Path) -> Path:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return dst


def change(path: Path, *sql: str | tuple[str, tuple[object, ...]]) -> Path:
    db = sqlite3.connect(path, isolation_level=None)
    for statement in sql:
        db.execute(*((statement,) if isinstance(statement, str) else statement))
    db.close()
    return path


def created(path: Path, size: int) -> str:
    cp = AuditStore(path, create=False).checkpoint_at(size)
    assert cp is not None
    return cp.created


def note(path: Path, size: int) -> bytes:
    cp = AuditStore(path, create=False).checkpoint_at(size)
    assert cp is not None
    return cp.note


class Node:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.key: PrivateKey = load_node_key(directory / "node.key")
        self.pub = directory / "node.pub"

    def log(self, path: Path, rows: Sequence[tuple[bytes, bytes, str]]) -> Path:
        """Append `rows` as they are, then run a node over the log: it signs a checkpoint
        (the rows are covered by none), applies retention, signs again on close."""
        store = AuditStore(path)
        store.append(rows)
        AuditLog(store, origin=ORIGIN, key=self.key, retention_days=RETENTION_DAYS,
                 checkpoint_interval=3600).close()
        store.close()
        return path


def recent(count: int, ref: str) -> list[tuple[bytes, bytes, str]]:
    now = datetime.now(UTC)
    return [row(iso(now - timedelta(milliseconds=count - i)), f"{ref}-{i}")
            for i in range(count)]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Node:
    return Node(tmp_path_factory.mktemp("node"))


def cutoff() -> str:
    return (datetime.now(UTC) - timedelta(days=RETENTION_DAYS)).strftime("%Y-%m-%d")


@pytest.fixture(scope="module")
def base(node: Node) -> Path:
    """20 events, checkpoints at 8 and 20."""
    path = node.log(node.dir / "base.sqlite", recent(8, "FIRST"))
    return node.log(path, recent(12, "THEN"))


@pytest.fixture(scope="module")
def retained(node: Node) -> Path:
    """Events 0..5 from 100 days ago (removed), 6..11 from today, 12 the retention event
    (before=<cutoff>), 13..15 recorded later; checkpoints at 12, 13 and 16."""
    old = datetime.now(UTC) - timedelta(days=100)
    rows = [row(iso(old + timedelta(seconds=i)), f"OLD-{i}") for i in range(6)]
    path = node.log(node.dir / "retained.sqlite", rows + recent(6, "NEW"))
    path = node.log(path, recent(3, "LATER"))
    store = AuditStore(path, create=False)
    assert [cp.size for cp in store.iter_checkpoints()] == [12, 13, 16]
    retention = store.leaf(12)
    assert retention is not None and retention.event is not None
    assert f"removed=6 before={cutoff()}".encode() in retention.event
    return path


# ---------------------------------------------------------------- removed bodies

def _today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def _old_day() -> str:
    return (datetime.now(UTC) - timedelta(days=100)).strftime("%Y-%m-%d")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


REMOVALS: dict[str, tuple[Callable[[], list[str | tuple[str, tuple[object, ...]]]], str]] = {
    "a recent body, its day kept": (
        lambda: [("UPDATE leaves SET event = NULL, removed = ? WHERE idx = 8", (_now(),))],
        "FAIL event 8: body removed outside retention (day {today} is not before the "
        "retention cutoff {cutoff})"),
    "recent bodies, their day forged": (
        lambda: [("UPDATE leaves SET event = NULL, removed = ?, day = ? WHERE idx >= 8"
                  " AND idx <= 10", (_now(), _old_day()))],
        "FAIL events 8..10: body removed behind event 7 of {today}"),
    "a body after the last retention event": (
        lambda: [("UPDATE leaves SET event = NULL, removed = ?, day = ? WHERE idx = 14",
                  (_now(), _old_day()))],
        "FAIL event 14: body removed, but no retention event after it records a removal"),
    "no removal mark": (
        lambda: ["UPDATE leaves SET event = NULL WHERE idx = 8"],
        "FAIL event 8: body removed without a valid removal time (removed None)"),
    "a removal mark that is not a time": (
        lambda: ["UPDATE leaves SET removed = 'yesterday' WHERE idx = 2"],
        "FAIL event 2: body removed without a valid removal time (removed 'yesterday')"),
    "removed before its day": (
        lambda: ["UPDATE leaves SET removed = '2000-01-01T00:00:00+00:00' WHERE idx = 2"],
        "FAIL event 2: body removed at 2000-01-01T00:00:00+00:00, before its day"),
    "a day that is not a day": (
        lambda: ["UPDATE leaves SET day = 'someday' WHERE idx = 3"],
        "FAIL event 3: body removed, and its day 'someday' is not a date"),
    "the retention event altered": (
        lambda: ["UPDATE leaves SET event = replace(event, 'before=', 'before=2999') "
                 "WHERE idx = 12"],
        "FAIL events 0..5: body removed, but no retention event after it records a removal"),
    "a kept event's day forged": (
        lambda: [("UPDATE leaves SET day = ? WHERE idx = 9", (_old_day(),))],
        "FAIL event 9: its day column '{old}' is not the day of its time '{today}"),
}


def test_genuine_retention_passes(node: Node, retained: Path) -> None:
    result = run("verify", "--log", retained, "--trust", node.pub)
    assert result.returncode == 0, result
    assert result.stdout.startswith(f"OK {retained}: 16 events, 3 signed checkpoints, 6 event "
                                    "bodies removed by retention")


def test_removed_bodies_are_held_to_retention(node: Node, retained: Path,
                                              tmp_path: Path) -> None:
    paths = [change(copy_log(retained, tmp_path / f"r{n}.sqlite"), *sql())
             for n, (sql, _) in enumerate(REMOVALS.values())]
    results = run_all([("verify", "--log", path, "--trust", node.pub) for path in paths])
    for (case, (_, expected)), path, result in zip(REMOVALS.items(), paths, results,
                                                   strict=True):
        expected = expected.format(today=_today(), cutoff=cutoff(), old=_old_day())
        assert result.returncode == 1 and result.stderr == "", (case, result)
        lines = result.stdout.splitlines()
        assert any(line.startswith(expected) for line in lines), (case, expected, lines)
        assert lines[-1].startswith(f"FAIL {path}: "), (case, lines)


@pytest.mark.parametrize(("kept_at", "ok"), [("00:10", True), ("02:00", False)])
def test_midnight_grace(node: Node, tmp_path: Path, kept_at: str, ok: bool) -> None:
    """Writers racing at midnight append an event of the day before after one of the new
    day: retention removes the older behind the newer, within an hour of midnight."""
    day = datetime.fromisoformat(cutoff()).replace(tzinfo=UTC)
    rows = [row(f"{cutoff()}T{kept_at}:00.000+00:00", "NEW-DAY"),
            row(iso(day - timedelta(seconds=1)), "DAY-BEFORE")]
    path = node.log(tmp_path / "midnight.sqlite", rows)
    leaf = AuditStore(path, create=False).leaf(1)
    assert leaf is not None and leaf.event is None  # retention removed the day before
    result = run("verify", "--log", path, "--trust", node.pub)
    if ok:
        assert result.returncode == 0, result
    else:
        assert result.returncode == 1
        assert result.stdout.startswith(f"FAIL event 1: body removed behind event 0 of "
                                        f"{cutoff()}T02:00"), result.stdout


# ---------------------------------------------------------------- --since


def _rewrite(path: Path, key: PrivateKey) -> None:
    """The node key's holder rewrites event 2 and re-signs every checkpoint."""
    event = Event("block", ORIGIN, time=iso(datetime.now(UTC)), ref="REWRITTEN")
    data = event.to_json().encode()
    change(path, ("UPDATE leaves SET event = ?, hash = ?, day = ? WHERE idx = 2",
                  (data, leaf_hash(data), event.time[:10])), "DELETE FROM checkpoints")
    store = AuditStore(path, create=False, read_only=False)  # the forger writes
    compact = merkle.CompactRange()
    compact.extend(store.leaf_hashes(0, 20))
    signed = sign_checkpoint(Checkpoint(ORIGIN, 20, compact.root()), Signer(ORIGIN, key))
    store.add_checkpoint(StoredCheckpoint(20, compact.root(), signed, _now(),
                                          b"".join(compact.hashes)))
    store.close()


def test_since_claimed_only_when_it_held(node: Node, base: Path, tmp_path: Path) -> None:
    kept = tmp_path / "kept-20.checkpoint"
    kept.write_bytes(note(base, 20))
    cut = change(copy_log(base, tmp_path / "cut.sqlite"), "DELETE FROM leaves WHERE idx >= 10",
                 "DELETE FROM checkpoints WHERE size > 8")
    rewritten = copy_log(base, tmp_path / "rewritten.sqlite")
    _rewrite(rewritten, node.key)
    genuine, shorter, other = run_all([
        ("verify", "--log", log, "--trust", node.pub, "--since", kept)
        for log in (base, cut, rewritten)])
    assert genuine.returncode == 0
    assert genuine.stdout.rstrip().endswith(", consistent with your checkpoint of size 20")
    for result, problem in ((shorter, "FAIL your checkpoint (size 20) is larger than the log"),
                            (other, "FAIL the log is not consistent with your checkpoint")):
        assert result.returncode == 1, result
        assert problem in result.stdout
        assert "consistent with your checkpoint of size" not in result.stdout.splitlines()[-1]


# ---------------------------------------------------------------- no checkpoint covers it


def test_events_after_the_latest_checkpoint_are_named(node: Node, base: Path,
                                                      tmp_path: Path) -> None:
    appended = copy_log(base, tmp_path / "appended.sqlite")
    now = iso(datetime.now(UTC))
    late = AuditStore(appended, create=False, read_only=False)
    late.append([row(now, f"LATE-{i}") for i in range(3)])
    cut = change(copy_log(base, tmp_path / "cut.sqlite"), "DELETE FROM leaves WHERE idx >= 10",
                 "DELETE FROM checkpoints WHERE size > 8")
    bare = change(copy_log(base, tmp_path / "bare.sqlite"), "DELETE FROM checkpoints")
    kept = tmp_path / "kept-20.checkpoint"
    kept.write_bytes(note(base, 20))
    unsigned = change(copy_log(base, tmp_path / "unsigned.sqlite"),
                      "DELETE FROM checkpoints WHERE size > 8")
    results = run_all([("verify", "--log", appended, "--trust", node.pub),
                       ("verify", "--log", cut, "--trust", node.pub),
                       ("verify", "--log", bare, "--trust", node.pub),
                       ("verify", "--log", unsigned, "--trust", node.pub, "--since", kept)])
    hint = ("; keep checkpoints (netfilter audit checkpoint) or compare with a witness's to "
            "detect removal of the newest events")
    expected = [
        (f"WARN events 20..22 are not covered by any signed checkpoint (the latest, of size 20, "
         f"was signed at {created(base, 20)}){hint}", f"latest checkpoint: size 20, signed at "
         f"{created(base, 20)}"),
        (f"WARN events 8..9 are not covered by any signed checkpoint (the latest, of size 8, "
         f"was signed at {created(base, 8)}){hint}", f"latest checkpoint: size 8, signed at "
         f"{created(base, 8)}"),
        (f"WARN events 0..19 are not covered by any signed checkpoint (the log has none){hint}",
         "20 events, 0 signed checkpoints"),
        (None, "consistent with your checkpoint of size 20"),
    ]
    for result, (warning, summary) in zip(results, expected, strict=True):
        assert result.returncode == 0, result  # a warning, not a failure
        lines = result.stdout.splitlines()
        assert lines[-1].startswith("OK ") and summary in lines[-1], lines
        assert lines[:-1] == ([warning] if warning else []), lines


def test_checkpoints_are_read_one_at_a_time(node: Node, base: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def every(self: AuditStore) -> None:
        raise AssertionError("verify holds every checkpoint in memory")

    monkeypatch.setattr(AuditStore, "checkpoints", every)
    report = verify_log(AuditStore(base, create=False), node.key.public)
    assert report.ok and report.checkpoints == 2 and report.latest == (20, created(base, 20))


# ---------------------------------------------------------------- bad files


def _recreate(table: str, columns: str, then: str) -> list[str]:
    """The table made again without its types and constraints, then changed by `then`."""
    return [f"ALTER TABLE {table} RENAME TO old", f"CREATE TABLE {table} ({columns})",
            f"INSERT INTO {table} SELECT * FROM old", "DROP TABLE old", then]


def _garbage_after_page_one(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[4096:] = bytes((i * 131 + 7) % 256 for i in range(len(data) - 4096))
    path.write_bytes(bytes(data))


def test_bad_files_are_one_line(node: Node, base: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("not a database\n" * 100, encoding="utf-8")
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    corrupt = copy_log(base, tmp_path / "corrupt.sqlite")
    _garbage_after_page_one(corrupt)
    truncated = copy_log(base, tmp_path / "truncated.sqlite")
    truncated.write_bytes(truncated.read_bytes()[:5000])
    cases: list[tuple[Path, tuple[str, ...]]] = [
        (text, ("cannot open the audit log", "file is not a database")),
        (empty, ("not an audit log", "no checkpoints or leaves table")),
        (corrupt, ("cannot", "malformed")),
        (truncated, ("cannot", "malformed")),
        (change(copy_log(base, tmp_path / "no-leaves.sqlite"), "DROP TABLE leaves"),
         ("not an audit log: it has no leaves table",)),
        (change(copy_log(base, tmp_path / "no-checkpoints.sqlite"), "DROP TABLE checkpoints"),
         ("not an audit log: it has no checkpoints table",)),
        (change(copy_log(base, tmp_path / "null-hash.sqlite"), *_recreate(
            "leaves", "idx INTEGER PRIMARY KEY, hash, event, day, removed",
            "UPDATE leaves SET hash = NULL WHERE idx = 3")),
         ("a malformed row in its leaves",)),
        (change(copy_log(base, tmp_path / "text-size.sqlite"), *_recreate(
            "checkpoints", "size, root, note, created, frontier",
            "UPDATE checkpoints SET size = 'eight' WHERE size = 8")),
         ("a malformed row in its checkpoints", "eight")),
        (change(copy_log(base, tmp_path / "null-note.sqlite"), *_recreate(
            "checkpoints", "size INTEGER PRIMARY KEY, root, note, created, frontier",
            "UPDATE checkpoints SET note = NULL WHERE size = 8")),
         ("a malformed row in its checkpoints",)),
    ]
    results = run_all([("verify", "--log", path, "--trust", node.pub) for path, _ in cases])
    for (path, needles), result in zip(cases, results, strict=True):
        assert result.returncode == 1 and "Traceback" not in result.stderr, (path, result)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"netfilter: error: {path}: "), lines
        assert all(needle in lines[0] for needle in needles), (needles, lines)
        assert result.stdout == ""
    # the files were only read: no table was made in them
    tables = sqlite3.connect(tmp_path / "no-leaves.sqlite").execute(
        "SELECT name FROM sqlite_master WHERE name = 'leaves'").fetchall()
    assert tables == []


def test_a_hash_of_the_wrong_length_is_named(node: Node, base: Path, tmp_path: Path) -> None:
    path = change(copy_log(base, tmp_path / "short.sqlite"),
                  "UPDATE leaves SET hash = substr(hash, 1, 31) WHERE idx = 3")
    result = run("verify", "--log", path, "--trust", node.pub)
    assert result.returncode == 1 and result.stderr == "", result
    lines = result.stdout.splitlines()
    assert lines[0] == "FAIL event 3: its leaf hash has 31 bytes, not 32"
    assert "FAIL the tree at size 8 differs from its signed checkpoint" in result.stdout


def test_a_checkpoint_note_stored_as_text(node: Node, base: Path, tmp_path: Path) -> None:
    path = change(copy_log(base, tmp_path / "text-note.sqlite"),
                  "UPDATE checkpoints SET note = CAST(note AS TEXT)")
    assert sqlite3.connect(path).execute(
        "SELECT count(*) FROM checkpoints WHERE typeof(note) = 'text'").fetchone() == (2,)
    verified, printed = run_all([("verify", "--log", path, "--trust", node.pub),
                                 ("checkpoint", "--log", path)])
    assert verified.returncode == 0, verified
    assert verified.stdout.startswith(f"OK {path}: 20 events, 2 signed checkpoints")
    assert printed.returncode == 0 and printed.stdout.encode() == note(base, 20)


# ---------------------------------------------------------------- export


def _pseudonymous_log(node: Node, path: Path) -> tuple[AuditLog, list[bytes]]:
    """A running node's log with pseudonymous clients; returns it (open) and its keys."""
    log = AuditLog(AuditStore(path), origin=ORIGIN, key=node.key, checkpoint_interval=3600)
    clients = ClientRecorder("pseudonym", log.pseudonym_key)
    for i in range(12):
        log.record(Event("block", ORIGIN, ref=f"P-{i}", client=clients.record(f"192.0.2.{i}")))
    log.flush()
    log.checkpoint()
    keys = [bytes(k) for (k,) in sqlite3.connect(keys_path(path)).execute(
        "SELECT key FROM pseudonym_keys")]
    assert keys and all(len(k) == 32 for k in keys)
    return log, keys


def test_export_carries_no_keys_and_verifies(node: Node, tmp_path: Path) -> None:
    source = tmp_path / "var" / "audit.sqlite"
    log, keys = _pseudonymous_log(node, source)
    out = tmp_path / "handed-over.sqlite"
    try:  # while the node runs: its last commits are still in the -wal file
        assert Path(f"{source}-wal").stat().st_size > 0
        exported = run("export", "--log", source, "--out", out)
    finally:
        log.close()
        log.store.close()
    assert exported.returncode == 0, exported
    assert exported.stdout == (f"wrote {out}: 12 events, the latest signed checkpoint of size "
                               "12; no pseudonym keys; mode 0644 (readable by every local "
                               "user)\n")
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert not Path(f"{out}-wal").exists() and not Path(f"{out}-journal").exists()
    data = out.read_bytes()
    assert not any(key in data for key in keys)
    db = sqlite3.connect(out)
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'pseudonym_keys'"
                      ).fetchall() == []
    assert db.execute("SELECT count(*) FROM leaves").fetchone() == (12,)
    db.close()
    # the export verifies as the original (now closed) does
    original, copy = run_all([("verify", "--log", log, "--trust", node.pub)
                              for log in (source, out)])
    assert original.returncode == copy.returncode == 0, (original, copy)
    assert copy.stdout == original.stdout.replace(str(source), str(out))
    assert copy.stdout.startswith(f"OK {out}: 12 events, ")


def test_export_verifies_like_the_original(node: Node, base: Path, retained: Path,
                                           tmp_path: Path) -> None:
    for source in (base, retained):
        out = tmp_path / f"export-{source.name}"
        exported = run("export", "--log", source, "--out", out, "--mode", "0600")
        assert exported.returncode == 0, exported
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        original, copy = run_all([("verify", "--log", log, "--trust", node.pub)
                                  for log in (source, out)])
        assert original.returncode == copy.returncode == 0
        assert copy.stdout == original.stdout.replace(str(source), str(out))


def test_export_drops_keys_an_old_format_log_kept(node: Node, base: Path,
                                                  tmp_path: Path) -> None:
    secret = os.urandom(32)
    old = change(copy_log(base, tmp_path / "old-format.sqlite"),
                 "CREATE TABLE pseudonym_keys (day TEXT PRIMARY KEY, key BLOB NOT NULL)",
                 ("INSERT INTO pseudonym_keys VALUES ('2026-01-01', ?)", (secret,)))
    assert secret in old.read_bytes()
    out = tmp_path / "export.sqlite"
    assert run("export", "--log", old, "--out", out).returncode == 0
    assert secret not in out.read_bytes()
    assert sqlite3.connect(out).execute(
        "SELECT name FROM sqlite_master WHERE name = 'pseudonym_keys'").fetchall() == []
    assert run("verify", "--log", out, "--trust", node.pub).returncode == 0


def test_export_refusals_are_one_line(node: Node, base: Path, tmp_path: Path) -> None:
    cases: list[tuple[tuple[str | Path, ...], str]] = [
        (("--mode", "0666"), "--mode: 0666 grants more than 0644"),
        (("--mode", "rw"), "--mode: 'rw' is not an octal file mode"),
    ]
    results = run_all([("export", "--log", base, "--out", tmp_path / "x.sqlite", *extra)
                       for extra, _ in cases]
                      + [("export", "--log", base, "--out", base),
                         ("export", "--log", base, "--out", tmp_path / "no" / "x.sqlite")])
    needles = [text for _, text in cases] + [f"{base}: is the log itself",
                                              "x.sqlite: cannot write the export"]
    for result, needle in zip(results, needles, strict=True):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (needle, lines)
    assert not (tmp_path / "x.sqlite").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_reading_an_auditors_copy_changes_nothing_in_it(node: Node, base: Path,
                                                        tmp_path: Path) -> None:
    """An auditor's copy is evidence: verify, prove and checkpoint read it and leave every
    byte as it was, even a copy in rollback-journal mode of a log from before cosignatures
    were kept (once switched to WAL and given the missing table on open)."""
    (tmp_path / "evidence").mkdir()
    copy = copy_log(base, tmp_path / "evidence" / "audit.sqlite")
    change(copy, "DROP TABLE cosignatures", "PRAGMA journal_mode=DELETE")
    before = copy.read_bytes()
    for args in (("verify", "--log", copy, "--trust", node.pub),
                 ("prove", "--log", copy, "--index", "3"),
                 ("checkpoint", "--log", copy)):
        result = run(*args)
        assert result.returncode == 0, result
    assert copy.read_bytes() == before
    assert sorted(p.name for p in copy.parent.iterdir()) == ["audit.sqlite"]
