"""The audit log's storage: SQLite in WAL mode, shared by every process of a node.

The store, not a process's memory, is the serialization point: a batch's leaf indexes
are assigned inside the write transaction (BEGIN IMMEDIATE), so several writers
(`netfilter serve`, a mitmdump addon, Unbound with the plugin) share one log and the
tree stays one sequence. A committed batch survives kill -9 (WAL, synchronous=FULL).

Retention deletes an event's body but keeps its leaf hash, so every proof and
checkpoint still verifies and an auditor sees what was removed, when.

The store is created 0600 (0640 when the operator names a group that may read it), and
its -wal/-shm files follow the database's mode (SQLite copies it). The daily pseudonym
keys live in a second file beside it (`NAME.keys.sqlite`, always 0600): the log itself
can be handed to an auditor without the keys that would turn pseudonyms back into
addresses.
"""

from __future__ import annotations

import grp
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from netfilter.errors import NetfilterError

__all__ = ["AuditStore", "StoredCheckpoint", "StoredLeaf", "keys_path"]

RETENTION_BATCH = 50_000  # bodies removed per write transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS leaves (
    idx INTEGER PRIMARY KEY,   -- position in the tree, from 0
    hash BLOB NOT NULL,        -- RFC 9162 leaf hash of the event bytes
    event BLOB,                -- the event's canonical JSON; NULL once retention removed it
    day TEXT NOT NULL,         -- UTC day of the event, for retention and reports
    removed TEXT               -- when retention removed the body
);
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,  -- tree size the checkpoint commits to
    root BLOB NOT NULL,
    note BLOB NOT NULL,        -- the signed note, exactly as served to auditors
    created TEXT NOT NULL,
    frontier BLOB NOT NULL     -- compact-range hashes at this size, to extend from
);
CREATE TABLE IF NOT EXISTS cosignatures (
    size INTEGER NOT NULL, witness TEXT NOT NULL, line TEXT NOT NULL,
    PRIMARY KEY (size, witness)
);
"""
KEYS_SCHEMA = """
CREATE TABLE IF NOT EXISTS pseudonym_keys (
    day TEXT PRIMARY KEY,      -- a day's key, destroyed when retention passes the day
    key BLOB NOT NULL
);
"""


def keys_path(path: Path) -> Path:
    """Where the pseudonym keys of the log at `path` are kept (never handed out)."""
    return path.with_name(f"{path.stem}.keys{path.suffix or '.sqlite'}")


def _group_id(group: str | None, where: Path) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise NetfilterError(where, f"audit.group {group!r} is not a group here") from None


def _narrow(path: Path, mode: int, gid: int | None) -> None:
    """Create `path` with `mode`, or take an existing file's extra permission bits away.

    SQLite creates -wal and -shm with the database's mode, so they follow."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        os.close(fd)
    except FileExistsError:
        pass
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            info = name.stat()
        except FileNotFoundError:
            continue
        if info.st_uid != os.getuid() and os.getuid() != 0:
            continue  # another user's file: not ours to change (an auditor's read)
        if gid is not None and info.st_gid != gid:
            os.chown(name, -1, gid)
        if stat.S_IMODE(info.st_mode) & ~mode:
            os.chmod(name, stat.S_IMODE(info.st_mode) & mode)


def _blob(value: bytes | str) -> bytes:
    """A BLOB column as bytes, also when someone stored TEXT in it (e.g. by editing)."""
    return value.encode() if isinstance(value, str) else bytes(value)


@dataclass(frozen=True)
class StoredLeaf:
    index: int
    hash: bytes
    event: bytes | None
    day: str
    removed: str | None


@dataclass(frozen=True)
class StoredCheckpoint:
    size: int
    root: bytes
    note: bytes
    created: str
    frontier: bytes


def _set_wal(db: sqlite3.Connection, tries: int = 50) -> None:
    """WAL mode; its switch can fail with "database is locked" at once, without the busy
    time-out, while another connection (the appender's, the keeper's) opens the same
    file: tried again for up to ~2.5 s."""
    for attempt in range(tries):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == tries - 1:
                raise
            time.sleep(0.05)


class AuditStore:
    """One SQLite file; a connection per thread (sqlite3 objects are not shareable)."""

    def __init__(self, path: str | Path, *, create: bool = True,
                 group: str | None = None, read_only: bool | None = None) -> None:
        """`create`: a node's own store (made, and its modes narrowed); without it, an
        existing log is only opened (an auditor's copy, the node's web pages), and read
        only unless `read_only=False` (the node's `audit cosign` storing a witness's
        cosignature). `group` may read the log (0640)."""
        self.path = Path(path)
        self.keys_path = keys_path(self.path)
        if not create and not self.path.exists():
            raise NetfilterError(self.path, "audit log not found")
        if create:
            gid = _group_id(group, self.path)
            self.path.parent.mkdir(mode=0o750 if gid is not None else 0o700,
                                   parents=True, exist_ok=True)
            _narrow(self.path, 0o640 if gid is not None else 0o600, gid)
            _narrow(self.keys_path, 0o600, None)
        self._create = create
        self._read_only = not create if read_only is None else read_only
        if self._read_only and create:
            raise ValueError("a store made by this process is written")
        self._local = threading.local()
        db = self._connection()
        if create:
            with db:
                db.executescript(SCHEMA)
            self._move_keys_out()

    def _open(self, path: Path) -> sqlite3.Connection:
        if self._read_only:
            return self._open_read_only(path)
        try:
            db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
            _set_wal(db)
            db.execute("PRAGMA synchronous=FULL")
            # What retention removes (bodies, day keys) is overwritten, not left in free
            # pages; appends free nothing, so they do not pay for it.
            db.execute("PRAGMA secure_delete=ON")
        except sqlite3.Error as e:
            raise NetfilterError(path, f"cannot open the audit log ({e})") from e
        return db

    @staticmethod
    def _open_read_only(path: Path) -> sqlite3.Connection:
        """An existing log opened for reading only (an auditor's copy, the node's pages):
        nothing in the file changes, not even its journal mode. Tables a log of an older
        version lacks are stood in for by empty temporary ones."""
        try:
            db = sqlite3.connect(f"file:{quote(str(path.absolute()))}?mode=ro", uri=True,
                                 timeout=30.0, isolation_level=None)
            present = {row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "leaves" not in present:
                raise NetfilterError(path, "not an audit log (no leaves table)")
            for statement in SCHEMA.split(";"):
                found = re.search(r"CREATE TABLE IF NOT EXISTS (\w+)", statement)
                if found and found.group(1) not in present:
                    db.execute(statement.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))
        except sqlite3.Error as e:
            raise NetfilterError(path, f"cannot open the audit log ({e})") from e
        return db

    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._open(self.path)
        return db

    def _keys(self) -> sqlite3.Connection:
        """The pseudonym-key store (opened on first need: auditors never open it)."""
        db: sqlite3.Connection | None = getattr(self._local, "keys", None)
        if db is None:
            if not self._create:
                raise NetfilterError(self.keys_path, "pseudonym keys are the node's only")
            db = self._local.keys = self._open(self.keys_path)
            db.executescript(KEYS_SCHEMA)
        return db

    def _move_keys_out(self) -> None:
        """Logs written before the keys had their own file kept them inside: move them."""
        db = self._connection()
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                      " AND name = 'pseudonym_keys'").fetchone() is None:
            return
        rows = db.execute("SELECT day, key FROM pseudonym_keys").fetchall()
        self._keys().executemany(
            "INSERT OR IGNORE INTO pseudonym_keys (day, key) VALUES (?, ?)", rows)
        db.execute("DROP TABLE pseudonym_keys")
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # nor the WAL's copies of them

    def close(self) -> None:
        for name in ("db", "keys"):
            db = getattr(self._local, name, None)
            if db is not None:
                db.close()
                setattr(self._local, name, None)

    # ------------------------------------------------------------ writing

    def append(self, leaves: Sequence[tuple[bytes, bytes, str]]) -> int:
        """Append (leaf hash, event, day) rows in one transaction; returns the first index."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            first = db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM leaves").fetchone()[0]
            db.executemany(
                "INSERT INTO leaves (idx, hash, event, day) VALUES (?, ?, ?, ?)",
                [(first + i, h, e, d) for i, (h, e, d) in enumerate(leaves)])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite rolls back itself on some errors (disk full):
                db.execute("ROLLBACK")  # a ROLLBACK then would hide the error's cause
            raise
        return int(first)

    def add_checkpoint(self, checkpoint: StoredCheckpoint) -> bool:
        """Store a checkpoint unless one for that size exists (another writer's)."""
        cursor = self._connection().execute(
            "INSERT OR IGNORE INTO checkpoints (size, root, note, created, frontier)"
            " VALUES (?, ?, ?, ?, ?)",
            (checkpoint.size, checkpoint.root, checkpoint.note, checkpoint.created,
             checkpoint.frontier))
        return cursor.rowcount == 1

    def add_cosignature(self, size: int, witness: str, line: str) -> None:
        self._connection().execute(
            "INSERT OR REPLACE INTO cosignatures (size, witness, line) VALUES (?, ?, ?)",
            (size, witness, line))

    def pseudonym_key(self, day: str, new_key: bytes) -> bytes:
        """The day's key: `new_key` if this process is the first to need one."""
        db = self._keys()
        db.execute("INSERT OR IGNORE INTO pseudonym_keys (day, key) VALUES (?, ?)",
                   (day, new_key))
        return bytes(db.execute("SELECT key FROM pseudonym_keys WHERE day = ?",
                                (day,)).fetchone()[0])

    def removable_before(self, day: str) -> int:
        """How many event bodies retention would remove (a read: no write lock)."""
        row = self._connection().execute(
            "SELECT COUNT(*) FROM leaves WHERE day < ? AND event IS NOT NULL", (day,))
        return int(row.fetchone()[0])

    def removed_range(self, when: str) -> tuple[int, int] | None:
        """The index range (lo, hi) of the bodies one retention run (`when`) removed."""
        row = self._connection().execute(
            "SELECT MIN(idx), MAX(idx) + 1 FROM leaves WHERE removed = ?", (when,)).fetchone()
        return None if row[0] is None else (int(row[0]), int(row[1]))

    def remove_before(self, day: str, now: str) -> int:
        """Retention: drop event bodies (and pseudonym keys) of days before `day`.

        The rows are found by reads, which never hold the store's write lock, and
        removed in write transactions of at most `RETENTION_BATCH` rows by index: a
        scan inside an UPDATE would hold the lock against every appender for as long
        as it reads the table."""
        self._keys().execute("DELETE FROM pseudonym_keys WHERE day < ?", (day,))
        db = self._connection()
        removed, start = 0, 0
        while True:
            found = [int(r[0]) for r in db.execute(
                "SELECT idx FROM leaves WHERE idx >= ? AND day < ? AND event IS NOT NULL"
                " ORDER BY idx LIMIT ?", (start, day, RETENTION_BATCH))]
            if not found:
                return removed
            db.execute("BEGIN IMMEDIATE")
            try:
                removed += db.executemany(
                    "UPDATE leaves SET event = NULL, removed = ? WHERE idx = ?"
                    " AND event IS NOT NULL", [(now, idx) for idx in found]).rowcount
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # as in append: keep the error's own cause
                    db.execute("ROLLBACK")
                raise
            start = found[-1] + 1

    # ------------------------------------------------------------ reading

    def size(self) -> int:
        row = self._connection().execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM leaves")
        return int(row.fetchone()[0])

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        rows = self._connection().execute(
            "SELECT hash FROM leaves WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end))
        return [bytes(r[0]) for r in rows]

    def leaves(self, start: int = 0, end: int | None = None,
               batch: int = 20000) -> Iterator[StoredLeaf]:
        """Leaves in index order, fetched in batches (a million rows need no list).

        Paged by the last index seen, not by fixed windows: a gap in the indexes (rows
        deleted by someone) must reach the verifier, not end the iteration."""
        db = self._connection()
        last = self.size() if end is None else end
        at = start
        while at < last:
            rows = db.execute(
                "SELECT idx, hash, event, day, removed FROM leaves"
                " WHERE idx >= ? AND idx < ? ORDER BY idx LIMIT ?", (at, last, batch)
            ).fetchall()
            if not rows:
                return
            for idx, h, event, day, removed in rows:
                yield StoredLeaf(int(idx), _blob(h), None if event is None else _blob(event),
                                 day, removed)
            at = int(rows[-1][0]) + 1

    def leaf(self, index: int) -> StoredLeaf | None:
        return next(self.leaves(index, index + 1), None)

    def checkpoints(self) -> list[StoredCheckpoint]:
        return list(self.iter_checkpoints())

    def iter_checkpoints(self) -> Iterator[StoredCheckpoint]:
        """Every checkpoint in size order, one at a time (90 days of them are large)."""
        rows = self._connection().execute(
            "SELECT size, root, note, created, frontier FROM checkpoints ORDER BY size")
        for s, r, n, c, f in rows:
            yield StoredCheckpoint(int(s), _blob(r), _blob(n), str(c), _blob(f))

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        row = self._connection().execute(
            "SELECT size, root, note, created, frontier FROM checkpoints"
            " ORDER BY size DESC LIMIT 1").fetchone()
        if row is None:
            return None
        s, r, n, c, f = row
        return StoredCheckpoint(int(s), _blob(r), _blob(n), str(c), _blob(f))

    def cosignatures(self, size: int) -> list[tuple[str, str]]:
        rows = self._connection().execute(
            "SELECT witness, line FROM cosignatures WHERE size = ? ORDER BY witness", (size,))
        return [(w, line) for w, line in rows]

    def checkpoint_at(self, size: int) -> StoredCheckpoint | None:
        """The checkpoint of `size` (verify names the latest that holds, and its time)."""
        row = self._connection().execute(
            "SELECT size, root, note, created, frontier FROM checkpoints WHERE size = ?",
            (size,)).fetchone()
        if row is None:
            return None
        s, r, n, c, f = row
        return StoredCheckpoint(int(s), _blob(r), _blob(n), str(c), _blob(f))
