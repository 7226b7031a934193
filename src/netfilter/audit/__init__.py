"""The pure cryptographic core of the tamper-evident audit log.

- `merkle`: RFC 9162 Merkle tree hashes, inclusion and consistency proofs (no I/O).
- `note`: signed notes (c2sp.org/signed-note) with Ed25519 keys.
- `checkpoint`: log checkpoints (c2sp.org/tlog-checkpoint) and witness cosignatures
  (c2sp.org/tlog-cosignature).

`merkle` imports neither of the others; `checkpoint` builds on `note`.
"""

from netfilter.audit import checkpoint, merkle, note

__all__ = ["checkpoint", "merkle", "note"]
