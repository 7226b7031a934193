"""The durable record of what is installed: rollback refused across restarts.

Per list id: the highest installed version, the SHA-256 of its signed manifest, when
it was issued and installed. Per source: the validators of its last good answer
(ETag, Last-Modified) for conditional requests. A small SQLite file (0600) in the
node's state directory, beside the audit log; every change is one transaction with
`synchronous=FULL`, so a crash leaves the record before or after, never between.

`judge` is the rule (pure): a higher version is new; the same version with the same
digest is the same; a lower version, or the same version with another digest, is
refused unless an operator forces it (`--allow-rollback`), which is then recorded.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from netfilter.config import Settings
from netfilter.errors import NetfilterError
from netfilter.listfile import Bundle
from netfilter.updates.install import manifest_digest

__all__ = ["Held", "Installed", "Judgement", "Rejected", "Validators", "VersionState", "judge",
           "state_path"]

STATE_NAME = "list-state.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS installed (
    list_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    digest TEXT NOT NULL,          -- SHA-256 (hex) of the signed manifest bytes
    issued TEXT NOT NULL,          -- the manifest's `issued`, ISO 8601
    installed_at TEXT NOT NULL,
    forced INTEGER NOT NULL DEFAULT 0,  -- installed with --allow-rollback
    freeze_alarm INTEGER            -- the version a freeze alarm was recorded for
);
CREATE TABLE IF NOT EXISTS held (
    list_id TEXT PRIMARY KEY,      -- one held version per list: a newer one replaces it
    version INTEGER NOT NULL,
    digest TEXT NOT NULL,          -- SHA-256 (hex) of the held bundle's signed manifest
    trigger TEXT NOT NULL,         -- entry-change | protected-name (joined by +)
    reason TEXT NOT NULL,          -- the one line recorded in list-held (no private name)
    path TEXT NOT NULL,            -- the kept bundle (.held/ beside the list)
    held_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    list_id TEXT NOT NULL,
    version INTEGER NOT NULL,      -- this version from the source is not held again
    digest TEXT NOT NULL,
    operator TEXT NOT NULL,
    rejected_at TEXT NOT NULL,
    PRIMARY KEY (list_id, version)
);
CREATE TABLE IF NOT EXISTS sources (
    source TEXT PRIMARY KEY,
    etag TEXT,
    last_modified TEXT,
    checked_at TEXT
);
"""


class Judgement(StrEnum):
    NEW = "new"  # higher than the recorded version: install
    SAME = "same"  # the recorded version and digest: nothing to do
    ROLLBACK = "rollback"  # lower than the recorded version: refused
    CONFLICT = "conflict"  # the recorded version with another digest: refused


@dataclass(frozen=True)
class Installed:
    list_id: str
    version: int
    digest: str
    issued: datetime
    installed_at: datetime
    forced: bool = False
    freeze_alarm: int | None = None


@dataclass(frozen=True)
class Held:
    """A verified version kept aside for an operator (update sanity checks)."""

    list_id: str
    version: int
    digest: str
    trigger: str
    reason: str
    path: Path
    held_at: datetime


@dataclass(frozen=True)
class Rejected:
    """A held version an operator rejected: never held or installed again."""

    list_id: str
    version: int
    digest: str
    operator: str
    rejected_at: datetime


@dataclass(frozen=True)
class Validators:
    """What a source said about its last good answer, sent back to ask "changed?"."""

    etag: str | None = None
    last_modified: str | None = None


def judge(recorded: Installed | None, version: int, digest: str) -> Judgement:
    """How a candidate (version, manifest digest) relates to the recorded one."""
    if recorded is None or version > recorded.version:
        return Judgement.NEW
    if version < recorded.version:
        return Judgement.ROLLBACK
    return Judgement.SAME if digest == recorded.digest else Judgement.CONFLICT


def refusal(recorded: Installed, version: int, judgement: Judgement) -> str:
    """The one-line reason for a refused candidate."""
    if judgement is Judgement.ROLLBACK:
        return (f"version {version} is lower than the installed version {recorded.version} "
                f"of list {recorded.list_id} (rollback refused)")
    return (f"version {version} of list {recorded.list_id} differs from the installed "
            f"version {recorded.version} (another manifest digest: refused)")


def state_path(settings: Settings) -> Path:
    """Where the state file is: `updates.state`, else beside the audit log, else beside
    the node key (the node's state directory either way)."""
    if settings.updates is not None and settings.updates.state is not None:
        return settings.resolve(settings.updates.state)
    if settings.audit is not None:
        return settings.resolve(settings.audit.path).parent / STATE_NAME
    return settings.resolve(settings.node.key).parent / STATE_NAME


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


class VersionState:
    """The state file, opened (and created 0600) once; thread-safe, and shared safely
    by several processes (SQLite's locking)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(self.path, 0o600)
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise NetfilterError(self.path, f"cannot open the list state ({e})") from e
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VersionState({str(self.path)!r})"

    def installed(self, list_id: str) -> Installed | None:
        with self._lock:
            row = self._db.execute(
                "SELECT list_id, version, digest, issued, installed_at, forced, freeze_alarm "
                "FROM installed WHERE list_id = ?", (list_id,)).fetchone()
        if row is None:
            return None
        return Installed(row[0], row[1], row[2], _time(row[3]), _time(row[4]), bool(row[5]),
                         row[6])

    def all(self) -> list[Installed]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT list_id FROM installed ORDER BY 1")]
        return [i for i in map(self.installed, ids) if i is not None]

    def check(self, list_id: str, version: int, digest: str) -> str | None:
        """Why a bundle may not be loaded (a rollback or another digest), or None.

        For loaders: a node that starts on a bundle older than the one it installed
        before (copied back by hand, restored from a backup) refuses it."""
        recorded = self.installed(list_id)
        verdict = judge(recorded, version, digest)
        if recorded is None or verdict in (Judgement.NEW, Judgement.SAME):
            return None
        return refusal(recorded, version, verdict)

    def check_bundle(self, bundle: Bundle) -> str | None:
        """`check` for a verified bundle (what a loader calls before using it)."""
        m = bundle.manifest
        return self.check(m.list_id, m.version, manifest_digest(bundle))

    def follow_bundle(self, bundle: Bundle) -> Judgement:
        """`follow` for a verified bundle (what a loader calls once it is in force)."""
        m = bundle.manifest
        return self.follow(m.list_id, m.version, manifest_digest(bundle), m.issued)

    def record(self, list_id: str, version: int, digest: str, issued: datetime, *,
               forced: bool = False, now: datetime | None = None) -> None:
        """The version now installed (called after the bundle is in place)."""
        at = (now or datetime.now(UTC)).isoformat()
        with self._lock:
            self._db.execute(
                "INSERT INTO installed (list_id, version, digest, issued, installed_at, "
                "forced) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (list_id) DO UPDATE SET "
                "version = excluded.version, digest = excluded.digest, "
                "issued = excluded.issued, installed_at = excluded.installed_at, "
                "forced = excluded.forced, freeze_alarm = NULL",
                (list_id, version, digest, issued.isoformat(), at, int(forced)))

    def follow(self, list_id: str, version: int, digest: str, issued: datetime, *,
               now: datetime | None = None) -> Judgement:
        """A bundle loaded or found in place: a newer one becomes the record (the floor
        only rises); returns how it relates to the record as it was."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT version, digest FROM installed "
                                       "WHERE list_id = ?", (list_id,)).fetchone()
                if row is None or version > row[0]:
                    verdict = Judgement.NEW
                    at = (now or datetime.now(UTC)).isoformat()
                    self._db.execute(
                        "INSERT OR REPLACE INTO installed (list_id, version, digest, issued, "
                        "installed_at, forced) VALUES (?, ?, ?, ?, ?, 0)",
                        (list_id, version, digest, issued.isoformat(), at))
                elif version < row[0]:
                    verdict = Judgement.ROLLBACK
                else:
                    verdict = Judgement.SAME if digest == row[1] else Judgement.CONFLICT
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back itself (disk
                    self._db.execute("ROLLBACK")  # full): keep the error's own cause
                raise
        return verdict

    def mark_freeze_alarm(self, list_id: str, version: int) -> bool:
        """Note that a freeze alarm was recorded for this version; False if it was already
        (an alarm goes to the audit log once per version, to the log at every check)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE installed SET freeze_alarm = ? WHERE list_id = ? AND "
                "(freeze_alarm IS NULL OR freeze_alarm != ?)", (version, list_id, version))
            return cur.rowcount > 0

    # ------------------------------------------------------------ held versions

    def held(self, list_id: str) -> Held | None:
        """The version held for this list, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT list_id, version, digest, trigger, reason, path, held_at FROM held "
                "WHERE list_id = ?", (list_id,)).fetchone()
        if row is None:
            return None
        return Held(row[0], row[1], row[2], row[3], row[4], Path(row[5]), _time(row[6]))

    def all_held(self) -> list[Held]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT list_id FROM held ORDER BY 1")]
        return [h for h in map(self.held, ids) if h is not None]

    def hold(self, held: Held) -> None:
        """Record a held version (replacing the one held before for its list)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO held (list_id, version, digest, trigger, reason, path, "
                "held_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (held.list_id, held.version, held.digest, held.trigger, held.reason,
                 str(held.path), held.held_at.isoformat()))

    def release(self, list_id: str) -> None:
        """No version is held for this list any more (confirmed, rejected, superseded)."""
        with self._lock:
            self._db.execute("DELETE FROM held WHERE list_id = ?", (list_id,))

    def reject(self, held: Held, operator: str, now: datetime | None = None) -> None:
        """Drop the held version and remember its rejection, in one transaction."""
        at = (now or datetime.now(UTC)).isoformat()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM held WHERE list_id = ?", (held.list_id,))
                self._db.execute(
                    "INSERT OR REPLACE INTO rejected (list_id, version, digest, operator, "
                    "rejected_at) VALUES (?, ?, ?, ?, ?)",
                    (held.list_id, held.version, held.digest, operator, at))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back itself (disk
                    self._db.execute("ROLLBACK")  # full): keep the error's own cause
                raise

    def rejected(self, list_id: str, version: int) -> Rejected | None:
        """The rejection of this version of this list, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT list_id, version, digest, operator, rejected_at FROM rejected "
                "WHERE list_id = ? AND version = ?", (list_id, version)).fetchone()
        if row is None:
            return None
        return Rejected(row[0], row[1], row[2], row[3], _time(row[4]))

    # ------------------------------------------------------------ sources

    def validators(self, source: str) -> Validators:
        with self._lock:
            row = self._db.execute("SELECT etag, last_modified FROM sources WHERE source = ?",
                                   (source,)).fetchone()
        return Validators() if row is None else Validators(row[0], row[1])

    def set_validators(self, source: str, validators: Validators,
                       now: datetime | None = None) -> None:
        at = (now or datetime.now(UTC)).isoformat()
        with self._lock:
            self._db.execute(
                "INSERT INTO sources (source, etag, last_modified, checked_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET etag = excluded.etag, "
                "last_modified = excluded.last_modified, checked_at = excluded.checked_at",
                (source, validators.etag, validators.last_modified, at))

    def forget_validators(self, source: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sources WHERE source = ?", (source,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
