"""Witness cosignatures (C2SP tlog-cosignature) kept beside the checkpoints.

A witness that has checked a checkpoint's consistency sends back a signature line
over it. It is stored only if it verifies with one of the configured witness keys;
`audit checkpoint` then serves the checkpoint with its cosignatures attached.
"""

from __future__ import annotations

from collections.abc import Sequence

from netfilter.audit.checkpoint import new_cosignature_verifier
from netfilter.audit.note import NoteError, open_note
from netfilter.audit.store import AuditStore, StoredCheckpoint
from netfilter.errors import NetfilterError

__all__ = ["add_cosignatures", "with_cosignatures"]


def add_cosignatures(store: AuditStore, checkpoint: StoredCheckpoint, lines: str,
                     witness_keys: Sequence[str]) -> list[str]:
    """Verify signature lines from witnesses and store those that verify; their names."""
    try:
        verifiers = [new_cosignature_verifier(k) for k in witness_keys]
    except ValueError as e:
        raise NetfilterError("witness key", str(e)) from e
    if not verifiers:
        raise NetfilterError("witness key", "no witness keys configured")
    offered = [line for line in lines.splitlines() if line.strip()]
    stored = []
    for line in offered:
        try:
            note = open_note(checkpoint.note + line.encode() + b"\n", verifiers)
        except (NoteError, ValueError) as e:
            raise NetfilterError("cosignature", f"does not verify with a configured witness "
                                                f"key: {e}") from e
        for sig in note.sigs:
            if line.endswith(sig.base64):
                store.add_cosignature(checkpoint.size, sig.name, line)
                stored.append(sig.name)
    return stored


def with_cosignatures(store: AuditStore, checkpoint: StoredCheckpoint) -> bytes:
    """The signed checkpoint with the stored witness lines appended."""
    extra = "".join(f"{line}\n" for _, line in store.cosignatures(checkpoint.size))
    return checkpoint.note + extra.encode()
