"""What an auditor runs: recompute the whole tree from the store and hold every signed
checkpoint, and optionally a checkpoint the auditor kept, against it.

Each kind of tampering is named: an altered event (its body no longer hashes to its
leaf), a missing index, a tree that differs from a signed checkpoint (events removed,
inserted or reordered), a forged checkpoint (bad signature), a log that is not
consistent with the auditor's older checkpoint, and an event body removed where
retention did not remove it.

A row's `day` and `removed` columns are not covered by its leaf hash, so a removed body
is accepted only as the node's own retention events explain it: a retention event
after it (its body present and hashing to its leaf) whose cutoff is after its day, and
no body kept before it from after that cutoff (retention removes whole days from the
start of the log; a hole behind kept events is a targeted deletion). Events after the
latest signed checkpoint are covered by nothing: they are named as a warning, since a
running node always has some, and only a checkpoint kept elsewhere shows them removed.
"""

from __future__ import annotations

import json
import re
import sqlite3
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TypeVar

from netfilter.audit.checkpoint import CheckpointError, open_checkpoint
from netfilter.audit.merkle import EMPTY_ROOT, HASH_SIZE, CompactRange, leaf_hash
from netfilter.audit.note import NoteError, Verifier
from netfilter.audit.store import AuditStore, StoredLeaf
from netfilter.errors import NetfilterError
from netfilter.keys import PublicKey

__all__ = ["RETENTION_GRACE", "VerifyReport", "checkpoint_origin", "verify_log"]

RETENTION_GRACE = timedelta(hours=1)
"""A body may be removed behind a kept event this long past the retention cutoff's
midnight: writers racing around midnight (and the writer's queue) append an event of
the day before after one of the new day."""

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_BEFORE = re.compile(r"(?:^| )before=(\S+)(?: |$)")
_T = TypeVar("_T")


@dataclass
class VerifyReport:
    size: int = 0
    checkpoints: int = 0
    removed: int = 0  # bodies deleted by retention (leaf hashes kept)
    since: int | None = None  # size of the auditor's checkpoint, if checked
    since_consistent: bool = False  # ... and the log extends it
    latest: tuple[int, str] | None = None  # size and time of the latest checkpoint that holds
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # not failures: what nothing covers

    @property
    def ok(self) -> bool:
        return not self.problems


def checkpoint_origin(note: bytes) -> str:
    """The origin line of a signed checkpoint (to name the key that must have signed it)."""
    return note.split(b"\n", 1)[0].decode("utf-8", "replace")


def _events(first: int, last: int) -> str:
    return f"event {first}" if first == last else f"events {first}..{last}"


def _time(event: bytes) -> str:
    """The `time` of a canonical event (flat JSON: the key cannot occur inside a value)."""
    at = event.find(b'"time":"')
    return "" if at < 0 else event[at + 8 : event.find(b'"', at + 8)].decode("utf-8", "replace")


def _is_day(text: object) -> bool:
    """A YYYY-MM-DD day (what the store writes; compared as text)."""
    try:
        return (isinstance(text, str) and _DAY.fullmatch(text) is not None
                and date.fromisoformat(text) is not None)
    except ValueError:
        return False


def _is_time(text: object) -> bool:
    """An ISO time that starts with its day (a removal mark)."""
    try:
        return (isinstance(text, str) and _is_day(text[:10])
                and datetime.fromisoformat(text) is not None)
    except ValueError:
        return False


@dataclass
class _Run:
    """Consecutive removed bodies with one day and one removal mark."""

    first: int
    last: int
    day: object
    removed: object
    kept_time: str  # the latest time of a body kept before the run, and its event
    kept_index: int


class _Retention:
    """Collects removed bodies as runs and the retention events after them; the runs are
    judged at the end, when every retention event is known (one pass over the log)."""

    def __init__(self) -> None:
        self.kept_time, self.kept_index = "", -1
        self.runs: list[_Run] = []
        self.cutoffs: list[tuple[int, str]] = []  # (index, before) of retention events

    def kept(self, index: int, event: bytes, time: str) -> None:
        if time > self.kept_time:
            self.kept_time, self.kept_index = time, index
        if b'"type":"retention"' not in event:
            return
        try:
            record = json.loads(event)
        except ValueError:
            return
        if not isinstance(record, dict) or record.get("type") != "retention":
            return
        detail = record.get("detail")
        found = _BEFORE.search(detail) if isinstance(detail, str) else None
        if found and _is_day(found[1]):
            self.cutoffs.append((index, found[1]))

    def removed(self, leaf: StoredLeaf) -> None:
        run = self.runs[-1] if self.runs else None
        if (run is not None and run.last == leaf.index - 1 and run.day == leaf.day
                and run.removed == leaf.removed):
            run.last = leaf.index
        else:
            self.runs.append(_Run(leaf.index, leaf.index, leaf.day, leaf.removed,
                                  self.kept_time, self.kept_index))

    def problems(self) -> Iterator[str]:
        # cutoff[i]: the furthest cutoff of the retention events from the i-th on
        indexes = [i for i, _ in self.cutoffs]
        cutoff = [b for _, b in self.cutoffs]
        for i in range(len(cutoff) - 2, -1, -1):
            cutoff[i] = max(cutoff[i], cutoff[i + 1])
        for run in self.runs:
            which = _events(run.first, run.last)
            if not _is_time(run.removed):
                yield (f"{which}: body removed without a valid removal time "
                       f"(removed {run.removed!r})")
            if not _is_day(run.day):
                yield f"{which}: body removed, and its day {run.day!r} is not a date"
                continue
            at = bisect_right(indexes, run.last)
            if at == len(indexes):
                yield (f"{which}: body removed, but no retention event after it records "
                       "a removal")
                continue
            before = cutoff[at]
            if str(run.day) >= before:
                yield (f"{which}: body removed outside retention (day {run.day} is not "
                       f"before the retention cutoff {before})")
            if _is_time(run.removed) and str(run.removed)[:10] < str(run.day):
                yield (f"{which}: body removed at {run.removed}, before its day {run.day}")
            if run.kept_time >= (datetime.fromisoformat(before) + RETENTION_GRACE).isoformat():
                yield (f"{which}: body removed behind event {run.kept_index} of "
                       f"{run.kept_time}, which retention (cutoff {before}) kept: retention "
                       "removes whole days from the start, so this is a targeted deletion")


def _read(store: AuditStore, what: str, rows: Iterator[_T]) -> Iterator[_T]:
    """The store's rows; a file SQLite cannot read, or a row of the wrong type (a NULL
    hash, a text size), becomes one error naming the file instead of a traceback."""
    try:
        yield from rows
    except sqlite3.Error as e:
        raise NetfilterError(store.path, f"cannot read the audit log ({e})") from e
    except (TypeError, ValueError) as e:
        raise NetfilterError(store.path, f"a malformed row in its {what} ({e})") from e


def verify_log(store: AuditStore, key: PublicKey, since: bytes | None = None) -> VerifyReport:
    report = VerifyReport()
    signed: dict[int, bytes] = {}  # size -> root of every checkpoint that verifies
    for cp in _read(store, "checkpoints", store.iter_checkpoints()):
        report.checkpoints += 1
        try:
            parsed = open_checkpoint(cp.note, Verifier.from_public_key(
                checkpoint_origin(cp.note), key))
        except (NoteError, CheckpointError, ValueError) as e:
            report.problems.append(f"checkpoint at size {cp.size}: signature does not verify "
                                   f"with the trusted key (forged or altered): {e}")
            continue
        if parsed.size != cp.size or parsed.root != cp.root:
            report.problems.append(f"checkpoint at size {cp.size}: stored size/root differ "
                                   "from its signed note")
        signed[parsed.size] = parsed.root
    own = None
    if since is not None:
        try:
            own = open_checkpoint(since, Verifier.from_public_key(checkpoint_origin(since), key))
        except (NoteError, CheckpointError, ValueError) as e:
            report.problems.append(f"your checkpoint does not verify with the trusted key: {e}")
        else:
            report.since = own.size
            report.since_consistent = own.size == 0 and own.root == EMPTY_ROOT
    compact = CompactRange()
    retention = _Retention()
    held = 0  # the largest size at which a signed checkpoint matches the tree
    for leaf in _read(store, "leaves", store.leaves()):
        if leaf.index != compact.size:
            report.problems.append(f"events {compact.size}..{leaf.index - 1} are missing")
            break
        h, bad = leaf.hash, len(leaf.hash) != HASH_SIZE
        if bad:
            report.problems.append(f"event {leaf.index}: its leaf hash has {len(h)} bytes, "
                                   f"not {HASH_SIZE}")
            h = bytes(HASH_SIZE)  # the walk goes on; the trees after it cannot match
        if leaf.event is None:
            report.removed += 1
            retention.removed(leaf)
        elif bad:
            pass
        elif leaf_hash(leaf.event) != h:
            report.problems.append(f"event {leaf.index} was altered (it no longer hashes "
                                   "to its leaf)")
        else:
            time = _time(leaf.event)
            if time[:10] != leaf.day:
                report.problems.append(f"event {leaf.index}: its day column {leaf.day!r} is "
                                       f"not the day of its time {time!r} (retention and "
                                       "reports go by the day)")
            retention.kept(leaf.index, leaf.event, time)
        compact.append(h)
        size = compact.size
        mine = own.root if own is not None and own.size == size else None
        root = compact.root() if mine is not None or size in signed else b""
        if size in signed:
            if signed[size] == root:
                held = size
            else:
                report.problems.append(f"the tree at size {size} differs from its signed "
                                       "checkpoint: events before it were removed, inserted, "
                                       "reordered or altered")
        if mine is not None:
            report.since_consistent = mine == root
            if not report.since_consistent:
                report.problems.append(f"the log is not consistent with your checkpoint of "
                                       f"size {size}: it was rewritten")
    report.size = compact.size
    report.problems.extend(retention.problems())
    for size in sorted(s for s in signed if s > report.size):
        report.problems.append(f"checkpoint at size {size} covers events that are not in "
                               f"the log (it holds {report.size})")
    if own is not None and own.size > report.size:
        report.problems.append(f"your checkpoint (size {own.size}) is larger than the "
                               f"log ({report.size}): events were removed")
    _coverage(store, report, held)
    return report


def _coverage(store: AuditStore, report: VerifyReport, held: int) -> None:
    """Name the newest events no signed checkpoint covers: removing them with every
    later checkpoint leaves a log consistent with itself."""
    latest = next(_read(store, "checkpoints", (store.checkpoint_at(s) for s in (held,) if s)),
                  None)
    if latest is not None:
        report.latest = (latest.size, latest.created)
    covered = max(held, report.since or 0) if report.since_consistent else held
    if covered >= report.size:
        return
    if latest is not None:
        which = f"the latest, of size {latest.size}, was signed at {latest.created}"
    else:
        which = "none in the log holds" if report.checkpoints else "the log has none"
    if covered > held:
        which += f"; yours covers {covered}"
    verb = "is" if covered == report.size - 1 else "are"
    report.warnings.append(
        f"{_events(covered, report.size - 1)} {verb} not covered by any signed checkpoint "
        f"({which}); keep checkpoints (netfilter audit checkpoint) or compare with a "
        "witness's to detect removal of the newest events")
