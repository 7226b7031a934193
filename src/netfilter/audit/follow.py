"""`netfilter audit follow`: an auditor's view of a node's log over HTTP.

Each run fetches the node's checkpoint, verifies its signature with the node's key,
reads from the tiles only what proves the new tree extends the checkpoint kept in the
state directory (`merkle.consistency_proof` over a `TileReader`, checked with
`merkle.verify_consistency`), and only then replaces the kept checkpoint. A log that
was rewritten or forked leaves the kept checkpoint as it was, and the conflicting one
beside it as evidence (two checkpoints signed by one key that no history can join).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from netfilter.audit import merkle
from netfilter.audit.checkpoint import (
    Checkpoint,
    CheckpointError,
    CosignatureVerifier,
    open_checkpoint,
)
from netfilter.audit.fetch import TIMEOUT, Fetcher, base_url
from netfilter.audit.note import (
    InvalidSignatureError,
    NoteError,
    UnknownVerifierError,
    UnverifiedNoteError,
    Verifier,
    open_note,
)
from netfilter.audit.proofs import VerificationError
from netfilter.audit.tilereader import Get, TileError, TileReader
from netfilter.audit.tiles import WIDTH, tile_path
from netfilter.audit.verify import checkpoint_origin
from netfilter.errors import NetfilterError
from netfilter.keys import PublicKey

__all__ = ["MAX_BUNDLE", "MAX_CHECKPOINT", "FollowError", "FollowResult", "State", "follow"]

MAX_CHECKPOINT = 1 << 17
"""Bytes of a served checkpoint with its cosignatures (the text is at most 64 KiB)."""
MAX_BUNDLE = 1 << 22
"""Bytes of one entry bundle (256 events; ours are well under 1 KiB each)."""

KEPT = "checkpoint"
CONFLICT = "conflicting-checkpoint"
LOCK = ".lock"  # held by the round in progress (flock)


class FollowError(VerificationError):
    """The node's log does not verify: a bad signature, bad tiles, or a rewritten log."""


class State:
    """The auditor's directory: the last checkpoint that verified (0700, files 0600)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise NetfilterError(self.dir, "not a directory (the --state of follow)")

    def kept(self) -> bytes | None:
        try:
            return (self.dir / KEPT).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise NetfilterError(self.dir / KEPT, f"cannot read ({e.strerror})") from None

    def _make(self) -> None:
        if not self.dir.is_dir():
            self.dir.mkdir(mode=0o700, parents=True)
            os.chmod(self.dir, 0o700)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One round at a time per directory: two at once would each keep what they
        fetched, the later write winning even when it is the older checkpoint."""
        try:
            self._make()
            fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise NetfilterError(self.dir, f"cannot lock ({e.strerror or e})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise NetfilterError(self.dir, "another `audit follow` is using this state "
                                               "directory now") from None
            yield
        finally:
            os.close(fd)

    def write(self, name: str, data: bytes) -> Path:
        """Atomically (temporary file, fsync, rename, fsync of the directory)."""
        try:
            self._make()
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.")  # 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.dir / name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise NetfilterError(self.dir / name, f"cannot write ({e.strerror or e})") from None
        return self.dir / name


@dataclass
class FollowResult:
    """What one run saw; `line()` is what the command prints."""

    url: str
    origin: str
    old_size: int
    new_size: int
    cosigners: list[str] = field(default_factory=list)
    entries_checked: int | None = None
    entries_removed: int = 0
    requests: int = 0
    stale: bool = False  # an older checkpoint of the same history: the kept one stays

    def line(self) -> str:
        cosigned = ", ".join(self.cosigners) or "none"
        text = (f"{self.origin} at {self.url}: {self.old_size} -> {self.new_size}, "
                f"consistent; cosigners: {cosigned}")
        if self.stale:
            text += (f"; the node serves an older checkpoint than the one kept "
                     f"({self.old_size}), which stays")
        if self.entries_checked is not None:
            text += (f"; {self.entries_checked} entries match their leaf hashes "
                     f"({self.entries_removed} removed by retention)")
        return text


def _open(note: bytes, key: PublicKey, origin: str, where: str) -> Checkpoint:
    """The checkpoint, if the node's key signed it for `origin`; FollowError if not."""
    try:
        return open_checkpoint(note, Verifier.from_public_key(origin, key), origin=origin)
    except (UnverifiedNoteError, UnknownVerifierError):
        raise FollowError(where, f"not signed by the key in {key.source} for {origin!r} "
                                 "(a wrong key, or another node)") from None
    except InvalidSignatureError:
        raise FollowError(where, f"the signature by {origin!r} does not verify with "
                                 f"{key.source} (forged or altered)") from None
    except (NoteError, CheckpointError, ValueError) as e:
        raise FollowError(where, f"not a signed checkpoint ({e})") from None


def _cosigners(note: bytes, node: tuple[str, int],
               witnesses: Sequence[CosignatureVerifier]) -> list[str]:
    """The other signers of the note: "verified" by a --witness key, "BAD SIGNATURE"
    when that key's signature does not verify, "unchecked" without its key."""
    try:
        open_note(note, [])
    except UnverifiedNoteError as e:
        sigs = e.note.unverified_sigs
    status: dict[tuple[str, int], str] = {}
    for witness in witnesses:
        try:
            open_note(note, [witness])
            status[(witness.name, witness.key_hash)] = "verified"
        except InvalidSignatureError:
            status[(witness.name, witness.key_hash)] = "BAD SIGNATURE"
        except UnverifiedNoteError:
            pass
    return [f"{s.name} ({status.get((s.name, s.key_hash), 'unchecked')})"
            for s in sigs if (s.name, s.key_hash) != node]


def _check_entries(reader: TileReader, start: int, end: int,
                   result: FollowResult) -> None:
    """The entry bundles of leaves start..end-1 against the (checked) level-0 tiles."""
    checked = removed = 0
    for index in range(start // WIDTH, -(-end // WIDTH) if end > start else 0):
        lo = index * WIDTH
        entries = reader.entries(index, MAX_BUNDLE)
        hashes = reader.tile(0, index)
        for i in range(max(start, lo), min(end, lo + WIDTH)):
            entry = entries[i - lo]
            if not entry:
                removed += 1  # retention removed its body; its leaf hash stays
            elif merkle.leaf_hash(entry) != hashes[i - lo]:
                raise FollowError(tile_path("entries", index), f"entry {i} does not hash to its "
                                                      "leaf in the level-0 tile")
            checked += 1
    result.entries_checked, result.entries_removed = checked, removed


def follow(url: str, key: PublicKey, state: State, *, allow_http: bool = False,
           entries: bool = False, witnesses: Sequence[CosignatureVerifier] = (),
           timeout: float = TIMEOUT) -> FollowResult:
    """One round: fetch, verify, prove consistency with the kept checkpoint, keep."""
    base = base_url(url, allow_http=allow_http)
    with state.locked():
        return _follow(base, key, state, entries=entries, witnesses=witnesses,
                       timeout=timeout)


def _follow(base: str, key: PublicKey, state: State, *, entries: bool,
            witnesses: Sequence[CosignatureVerifier], timeout: float) -> FollowResult:
    kept_note = state.kept()
    kept: Checkpoint | None = None
    if kept_note is not None:
        where = str(state.dir / KEPT)
        try:
            origin = checkpoint_origin(kept_note)
            kept = open_checkpoint(kept_note, Verifier.from_public_key(origin, key))
        except (NoteError, CheckpointError, ValueError) as e:
            raise NetfilterError(where, f"the kept checkpoint does not verify with "
                                        f"{key.source} (another node's key, or an altered "
                                        f"state directory): {e}") from None
    with Fetcher(base, timeout=timeout) as fetcher:
        where = base + "checkpoint"
        note = fetcher.get("checkpoint", MAX_CHECKPOINT)
        if note is None:
            raise FollowError(where, "not served (404): is this a tlog-tiles URL?")
        try:
            origin = kept.origin if kept is not None else checkpoint_origin(note)
        except ValueError as e:
            raise FollowError(where, f"not a signed checkpoint ({e})") from None
        new = _open(note, key, origin, where)
        result = FollowResult(base, origin, kept.size if kept else 0, new.size,
                              _cosigners(note, (origin, Verifier.from_public_key(
                                  origin, key).key_hash), witnesses))
        reader = TileReader(fetcher.get, new.size, new.root)  # the edge tiles, checked
        newer = kept is None or _consistent(state, kept, new, note, reader, fetcher.get,
                                            where)
        if entries and newer:
            _check_entries(reader, result.old_size, new.size, result)
        result.requests = fetcher.requests
    if not newer:
        result.stale = True
    elif kept is None or new.size != kept.size or note != kept_note:
        state.write(KEPT, note)
    return result


def _extends(old: Checkpoint, new: Checkpoint, reader: TileReader) -> bool:
    """Does the tree `new` (whose tiles `reader` reads) extend the tree `old`?"""
    try:
        if old.size == 0:
            return old.root == merkle.EMPTY_ROOT
        proof = merkle.consistency_proof(old.size, new.size, reader)
        merkle.verify_consistency(old.size, new.size, old.root, new.root, proof)
    except merkle.ProofError:
        return False
    return True


def _consistent(state: State, kept: Checkpoint, new: Checkpoint, note: bytes,
                reader: TileReader, get: Get, where: str) -> bool:
    """Prove `new` extends `kept` from the tiles (True), or that it is an older
    checkpoint of the same history (False: a cache or mirror that lags, the kept one
    stays); on a fork keep the evidence and raise."""
    if new.size >= kept.size:
        if _extends(kept, new, reader):
            return True
        why = (f"it does not extend the kept one of size {kept.size} "
               "(the log was rewritten or forked)")
    else:
        try:  # the kept tree's tiles, if the node still serves them, hold the new one
            if _extends(new, kept, TileReader(get, kept.size, kept.root)):
                return False
        except TileError:
            pass
        why = (f"it is smaller than the kept one of size {kept.size} and not part of it "
               "(events were removed, or the log was rewritten)")
    saved = state.write(CONFLICT, note)
    raise FollowError(where, f"NOT CONSISTENT: the checkpoint of size {new.size} is "
                             f"signed by the node's key, but {why}; kept "
                             f"{state.dir / KEPT}, the other saved as {saved}")
