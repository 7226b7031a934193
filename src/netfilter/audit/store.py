"""The audit log's storage: SQLite in WAL mode, shared by every process of a node.

The store, not a process's memory, is the serialization point: a batch's leaf indexes
are assigned inside the write transaction (BEGIN IMMEDIATE), so several writers
(`netfilter serve`, a mitmdump addon, Unbound with the plugin) share one log and the
tree stays one sequence. A committed batch survives kill -9 (WAL, synchronous=FULL).

Retention deletes an event's body but keeps its leaf hash, so every proof and
checkpoint still verifies and an auditor sees what was removed, when.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from netfilter.errors import NetfilterError

__all__ = ["AuditStore", "StoredCheckpoint", "StoredLeaf"]

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
CREATE TABLE IF NOT EXISTS pseudonym_keys (
    day TEXT PRIMARY KEY,      -- a day's key, destroyed when retention passes the day
    key BLOB NOT NULL
);
"""


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


class AuditStore:
    """One SQLite file; a connection per thread (sqlite3 objects are not shareable)."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise NetfilterError(self.path, "audit log not found")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connection() as db:
            db.executescript(SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as e:
                raise NetfilterError(self.path, f"cannot open the audit log ({e})") from e
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

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
            db.execute("ROLLBACK")
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
        db = self._connection()
        db.execute("INSERT OR IGNORE INTO pseudonym_keys (day, key) VALUES (?, ?)",
                   (day, new_key))
        return bytes(db.execute("SELECT key FROM pseudonym_keys WHERE day = ?",
                                (day,)).fetchone()[0])

    def remove_before(self, day: str, now: str) -> int:
        """Retention: drop event bodies (and pseudonym keys) of days before `day`."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            removed = db.execute(
                "UPDATE leaves SET event = NULL, removed = ? WHERE day < ? AND event IS NOT NULL",
                (now, day)).rowcount
            db.execute("DELETE FROM pseudonym_keys WHERE day < ?", (day,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return int(removed)

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
        rows = self._connection().execute(
            "SELECT size, root, note, created, frontier FROM checkpoints ORDER BY size")
        return [StoredCheckpoint(int(s), bytes(r), bytes(n), c, bytes(f))
                for s, r, n, c, f in rows]

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        rows = self.checkpoints()
        return rows[-1] if rows else None

    def cosignatures(self, size: int) -> list[tuple[str, str]]:
        rows = self._connection().execute(
            "SELECT witness, line FROM cosignatures WHERE size = ? ORDER BY witness", (size,))
        return [(w, line) for w, line in rows]
