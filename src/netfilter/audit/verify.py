"""What an auditor runs: recompute the whole tree from the store and hold every signed
checkpoint, and optionally a checkpoint the auditor kept, against it.

Each kind of tampering is named: an altered event (its body no longer hashes to its
leaf), a missing index, a tree that differs from a signed checkpoint (events removed,
inserted or reordered), a forged checkpoint (bad signature), and a log that is not
consistent with the auditor's older checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netfilter.audit.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from netfilter.audit.merkle import CompactRange, leaf_hash
from netfilter.audit.note import NoteError, Verifier
from netfilter.audit.store import AuditStore
from netfilter.keys import PublicKey

__all__ = ["VerifyReport", "checkpoint_origin", "verify_log"]


@dataclass
class VerifyReport:
    size: int = 0
    checkpoints: int = 0
    removed: int = 0  # bodies deleted by retention (leaf hashes kept)
    since: int | None = None  # size of the auditor's checkpoint, if checked
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def checkpoint_origin(note: bytes) -> str:
    """The origin line of a signed checkpoint (to name the key that must have signed it)."""
    return note.split(b"\n", 1)[0].decode("utf-8", "replace")


def verify_log(store: AuditStore, key: PublicKey, since: bytes | None = None) -> VerifyReport:
    report = VerifyReport()
    stored = store.checkpoints()
    wanted: dict[int, tuple[Checkpoint | None, bytes]] = {}
    for cp in stored:
        origin = checkpoint_origin(cp.note)
        try:
            parsed = open_checkpoint(cp.note, Verifier.from_public_key(origin, key))
        except (NoteError, CheckpointError, ValueError) as e:
            report.problems.append(f"checkpoint at size {cp.size}: signature does not verify "
                                   f"with the trusted key (forged or altered): {e}")
            continue
        if parsed.size != cp.size or parsed.root != cp.root:
            report.problems.append(f"checkpoint at size {cp.size}: stored size/root differ "
                                   "from its signed note")
        wanted[parsed.size] = (parsed, cp.note)
    own: Checkpoint | None = None
    if since is not None:
        try:
            own = open_checkpoint(since, Verifier.from_public_key(checkpoint_origin(since), key))
        except (NoteError, CheckpointError, ValueError) as e:
            report.problems.append(f"your checkpoint does not verify with the trusted key: {e}")
    compact = CompactRange()
    expected = 0
    for leaf in store.leaves():
        if leaf.index != expected:
            report.problems.append(f"events {expected}..{leaf.index - 1} are missing")
            break
        if leaf.event is None:
            report.removed += 1
        elif leaf_hash(leaf.event) != leaf.hash:
            report.problems.append(f"event {leaf.index} was altered (it no longer hashes "
                                   "to its leaf)")
        compact.append(leaf.hash)
        expected += 1
        _check_size(report, compact, wanted, own)
    report.size = expected
    report.checkpoints = len(stored)
    for size in sorted(s for s in wanted if s > expected):
        report.problems.append(f"checkpoint at size {size} covers events that are not in "
                               f"the log (it holds {expected})")
    if own is not None:
        report.since = own.size
        if own.size > expected:
            report.problems.append(f"your checkpoint (size {own.size}) is larger than the "
                                   f"log ({expected}): events were removed")
    return report


def _check_size(report: VerifyReport, compact: CompactRange,
                wanted: dict[int, tuple[Checkpoint | None, bytes]],
                own: Checkpoint | None) -> None:
    size = compact.size
    signed = wanted.get(size)
    if signed is None and (own is None or own.size != size):
        return
    root = compact.root()
    if signed is not None and signed[0] is not None and signed[0].root != root:
        report.problems.append(f"the tree at size {size} differs from its signed checkpoint: "
                               "events before it were removed, inserted, reordered or altered")
    if own is not None and own.size == size and own.root != root:
        report.problems.append(f"the log is not consistent with your checkpoint of size "
                               f"{size}: it was rewritten")
