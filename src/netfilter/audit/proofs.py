"""Proofs an operator and an auditor exchange: one JSON object, checked with merkle's
verifiers, so neither side needs the other's tools.

Inclusion (``netfilter audit prove --index N [--size M] --json``)::

    {"index": N, "tree_size": M, "event": "<canonical JSON>" | null,
     "leaf_hash": H, "inclusion": [H, ...], "root": H, "checkpoint": "<signed note>"}

Consistency (``netfilter audit prove --old-size M [--size N] --json``)::

    {"old_size": M, "old_root": H, "tree_size": N, "new_root": H,
     "consistency": [H, ...], "checkpoint": "<signed note>",
     "old_checkpoint": "<signed note>"}

H is a SHA-256 hash: base64 of its 32 bytes (as in checkpoints, 44 characters) or 64
hex digits; the lengths tell them apart. `event`, when present, is hashed and must give
`leaf_hash`; `checkpoint` and `old_checkpoint` (the node's signed checkpoints of those
sizes, when it signed them) are used only with a key, and then they give the roots. A
proof only shows something against a root you trust: a checkpoint signed by the
node's key, or a root learnt elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from netfilter.audit import merkle
from netfilter.audit.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from netfilter.audit.note import NoteError, Verifier
from netfilter.audit.store import AuditStore
from netfilter.audit.verify import checkpoint_origin
from netfilter.errors import NetfilterError
from netfilter.keys import PublicKey

__all__ = [
    "MAX_PROOF_FILE",
    "InputError",
    "ProofCheck",
    "VerificationError",
    "check_proof",
    "parse_hash",
    "parse_record",
    "proof_record",
]

MAX_PROOF_FILE = 1 << 20
"""Longest proof file read, in bytes (a proof has at most 64 hashes; events are small)."""

_MAX_HASHES = 64  # the depth of a tree of 2**64 leaves
_HEX = re.compile(r"[0-9a-fA-F]{64}")


class InputError(NetfilterError):
    """A proof file or argument is malformed: the user's mistake, not the log's."""


def encode_hash(h: bytes) -> str:
    return base64.b64encode(h).decode()


def parse_hash(value: object, what: str) -> bytes:
    """A hash as base64 (44 characters) or hex (64 digits); InputError names `what`."""
    if isinstance(value, str) and _HEX.fullmatch(value):
        return bytes.fromhex(value)
    if isinstance(value, str) and len(value) == 44:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == merkle.HASH_SIZE:
            return raw
    raise InputError(what, "not a SHA-256 hash (want base64 of 32 bytes or 64 hex digits)")


# --------------------------------------------------------------------------- making
def _root(store: AuditStore, size: int) -> tuple[bytes, bytes | None]:
    """The root at `size` and the node's signed checkpoint there, if it signed one."""
    stored = store.checkpoint_at(size)
    if stored is not None:
        return stored.root, stored.note
    return merkle.tree_root(size, store), None


def proof_record(store: AuditStore, size: int, *, index: int | None = None,
                 old_size: int | None = None) -> dict[str, Any]:
    """The JSON object of an inclusion (index) or consistency (old_size) proof at size.

    Raises ValueError (from merkle) for an index or old size that does not fit."""
    root, note = _root(store, size)
    record: dict[str, Any]
    if index is not None:
        proof = merkle.inclusion_proof(index, size, store)
        leaf = store.leaf(index)
        assert leaf is not None, "proofs: a leaf below the size is missing"
        record = {"index": index, "tree_size": size,
                  "event": None if leaf.event is None else leaf.event.decode(),
                  "leaf_hash": encode_hash(leaf.hash),
                  "inclusion": [encode_hash(h) for h in proof], "root": encode_hash(root)}
    else:
        assert old_size is not None
        proof = merkle.consistency_proof(old_size, size, store)
        old_root, old_note = _root(store, old_size)
        record = {"old_size": old_size, "old_root": encode_hash(old_root), "tree_size": size,
                  "new_root": encode_hash(root),
                  "consistency": [encode_hash(h) for h in proof]}
        if old_note is not None:
            record["old_checkpoint"] = old_note.decode()
    if note is not None:
        record["checkpoint"] = note.decode()
    return record


# --------------------------------------------------------------------------- reading
def parse_record(data: bytes, where: str) -> dict[str, Any]:
    """The JSON object of a proof file; InputError names the file."""
    if len(data) > MAX_PROOF_FILE:
        raise InputError(where, f"longer than {MAX_PROOF_FILE} bytes: not a proof")
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(where, f"not JSON ({e})") from None
    if not isinstance(record, dict):
        raise InputError(where, "not a JSON object")
    if ("inclusion" in record) == ("consistency" in record):
        raise InputError(where, 'want exactly one of "inclusion" and "consistency" '
                                "(the output of netfilter audit prove --json)")
    return record


def _size(record: dict[str, Any], key: str, where: str) -> int:
    value = record.get(key)
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise InputError(where, f'"{key}" must be a tree size or index (0 .. 2**64-1)')
    return value


def _hashes(record: dict[str, Any], key: str, where: str) -> list[bytes]:
    value = record.get(key)
    if not isinstance(value, list) or len(value) > _MAX_HASHES:
        raise InputError(where, f'"{key}" must be a list of at most {_MAX_HASHES} hashes')
    return [parse_hash(h, f'{where}: "{key}"[{i}]') for i, h in enumerate(value)]


def _signed(note: bytes, key: PublicKey, where: str) -> Checkpoint:
    """A checkpoint that the node's key signed; a bad one is a failed proof (exit 1)."""
    try:
        origin = checkpoint_origin(note)
        return open_checkpoint(note, Verifier.from_public_key(origin, key))
    except (NoteError, CheckpointError, ValueError) as e:
        raise VerificationError(where, f"the checkpoint does not verify with {key.source}: "
                                       f"{e}") from None


class VerificationError(NetfilterError):
    """What was given does not verify (a bad signature, a root that differs)."""


@dataclass(frozen=True)
class ProofCheck:
    """What a verified proof shows, for the one line the command prints."""

    kind: str
    text: str


def _root_for(record: dict[str, Any], key: str, note_key: str, size: int, where: str,
              checkpoint: bytes | None, pub: PublicKey | None) -> tuple[bytes, str]:
    """The root to check against and where it came from: a signed checkpoint (given, or
    in the file, when a key is given) or the file's own root field."""
    note = checkpoint
    if note is None and pub is not None and isinstance(record.get(note_key), str):
        note = record[note_key].encode()
    if note is not None:
        if pub is None:
            raise InputError(where, "a checkpoint needs --key NODE.pub to be verified")
        cp = _signed(note, pub, where)
        if cp.size != size:
            raise VerificationError(where, f"the checkpoint is of size {cp.size}, the proof "
                                           f"of size {size}")
        if key in record and parse_hash(record[key], f'{where}: "{key}"') != cp.root:
            raise VerificationError(where, f'"{key}" is not the signed checkpoint\'s root')
        return cp.root, f"signed by {pub.source} ({cp.origin})"
    if pub is not None:
        raise InputError(where, f'no signed checkpoint of size {size} (no "{note_key}"): '
                                "give one, or leave out --key to check against the file's "
                                f'"{key}"')
    if key not in record:
        raise InputError(where, f'no "{key}": give it, or --checkpoint and --key')
    return parse_hash(record[key], f'{where}: "{key}"'), "given in the file (unsigned)"


def check_proof(record: dict[str, Any], where: str, *, key: PublicKey | None = None,
                checkpoint: bytes | None = None,
                old_checkpoint: bytes | None = None) -> ProofCheck:
    """Check the proof in `record`; raises merkle.ProofError when it does not verify."""
    size = _size(record, "tree_size", where)
    if "inclusion" in record:
        index = _size(record, "index", where)
        if index >= size:
            raise InputError(where, f"index {index} is not in a tree of size {size}")
        proof = _hashes(record, "inclusion", where)
        event, leaf = record.get("event"), record.get("leaf_hash")
        if event is not None and not isinstance(event, str):
            raise InputError(where, '"event" must be the event\'s canonical JSON text')
        if event is None and leaf is None:
            raise InputError(where, 'neither "event" nor "leaf_hash"')
        h = merkle.leaf_hash(event.encode()) if event is not None else b""
        if leaf is not None:
            given = parse_hash(leaf, f'{where}: "leaf_hash"')
            if event is not None and given != h:
                raise merkle.ProofError
            h = given
        root, source = _root_for(record, "root", "checkpoint", size, where, checkpoint, key)
        merkle.verify_inclusion(index, size, h, proof, root)
        return ProofCheck("inclusion", f"event {index} is in the tree of size {size}, "
                                       f"root {encode_hash(root)} {source}")
    old = _size(record, "old_size", where)
    if not 0 < old <= size:
        raise InputError(where, f"no consistency proof from size {old} to size {size} "
                                "(need 0 < old size <= tree size)")
    proof = _hashes(record, "consistency", where)
    new_root, source = _root_for(record, "new_root", "checkpoint", size, where, checkpoint,
                                 key)
    old_root, old_source = _root_for(record, "old_root", "old_checkpoint", old, where,
                                     old_checkpoint, key)
    merkle.verify_consistency(old, size, old_root, new_root, proof)
    return ProofCheck("consistency", f"the tree of size {size} (root {source}) extends "
                                     f"the tree of size {old} (root {old_source})")
