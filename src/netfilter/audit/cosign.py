"""`netfilter audit cosign --nodes NODES.yaml`: a witness over many nodes' logs.

A witness cosigns (C2SP tlog-cosignature, cosignature/v1) only a checkpoint it has
itself proved consistent with the one it kept for that node (`audit follow`'s
round), so a node cannot show one history to its witnesses and another to someone
else without one of them holding two cosigned checkpoints no history joins. A node
that forks, or that cannot be read, is not cosigned.

The tlog-tiles server is read-only, so there is nothing to post to: the witness
writes, per node, DIR/<name>/cosignature (its signature line) and
DIR/<name>/cosigned-checkpoint (the node's checkpoint with that line appended), and
the node's operator stores the line with `netfilter audit cosign --config NODE.yaml
--witness VKEY DIR/<name>/cosignature` (which checks it against the node's latest
checkpoint), after which `audit checkpoint` serves it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from netfilter.audit.checkpoint import CosignatureSigner, open_checkpoint
from netfilter.audit.follow import KEPT, State
from netfilter.audit.many import NodeResult, Status
from netfilter.audit.note import (
    NoteError,
    UnverifiedNoteError,
    Verifier,
    is_valid_name,
    open_note,
    sign,
)
from netfilter.audit.verify import checkpoint_origin
from netfilter.errors import KeyExistsError, KeyFileError, NetfilterError
from netfilter.keys import generate_keypair, load_private_key

__all__ = ["COSIGNATURE", "COSIGNED", "Witness", "load_witness"]

COSIGNATURE = "cosignature"
COSIGNED = "cosigned-checkpoint"


def load_witness(path: str | Path, name: str) -> CosignatureSigner:
    """The witness key at `path` (PEM, created 0600 when missing; refused when others
    may read it), signing as `name`."""
    if not is_valid_name(name):
        raise NetfilterError("--name", f"{name!r} is not a key name (no spaces or '+')")
    key_path = Path(path)
    if not key_path.exists():
        if not key_path.name.endswith(".key"):
            raise NetfilterError(key_path, "a new witness key file is named NAME.key")
        with contextlib.suppress(KeyExistsError):  # made meanwhile by another run: use it
            generate_keypair(key_path.with_suffix(""))
    try:
        mode = key_path.stat().st_mode
    except OSError as e:
        raise KeyFileError(key_path, f"cannot read ({e.strerror})") from None
    if mode & 0o077:
        raise KeyFileError(key_path, f"mode {mode & 0o777:04o}: a witness key must be "
                                     "0600 (chmod 600)")
    return CosignatureSigner(name, load_private_key(key_path))


class Witness:
    """Cosigns, after a node's round, the checkpoint that round kept."""

    def __init__(self, signer: CosignatureSigner) -> None:
        self.signer = signer

    def __call__(self, outcome: NodeResult, state: State) -> None:
        """Cosign the kept checkpoint if this round proved it; else nothing."""
        if outcome.status is not Status.CONSISTENT or outcome.result is None:
            return
        note = state.kept()
        if note is None:  # pragma: no cover - a consistent round always keeps one
            return
        if outcome.result.stale:
            return  # the kept one was cosigned when it was proved
        node = outcome.node
        try:
            origin = checkpoint_origin(note)
            open_checkpoint(note, Verifier.from_public_key(origin, node.key), origin=origin)
            try:
                open_note(note, [])
                raise ValueError("no signature")  # pragma: no cover - none verifies
            except UnverifiedNoteError as e:  # every signature kept, ours replaced
                cosigned = sign(e.note, self.signer)
            line = cosigned.decode().rsplit("\n", 2)[-2] + "\n"
        except (NoteError, ValueError) as e:
            raise NetfilterError(state.dir / KEPT, f"cannot cosign ({e})") from None
        state.write(COSIGNATURE, line.encode())
        state.write(COSIGNED, cosigned)
        outcome.result.cosigners.append(f"{self.signer.name} (cosigned now)")
