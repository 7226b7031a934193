"""Log checkpoints (c2sp.org/tlog-checkpoint) and Ed25519 cosignatures (c2sp.org/tlog-cosignature).

A checkpoint is the text of a signed note::

    <origin>
    <tree size, decimal>
    <base64 root hash>
    [extension lines]

`Checkpoint.parse` is strict and raises `ValueError`; `open_checkpoint` turns a bad
body into `CheckpointError` and lets the note errors through.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from netfilter.audit.note import (
    NoteSigner,
    NoteVerifier,
    Signature,
    Signer,
    Verifier,
    open_note,
    sign,
)
from netfilter.errors import NetfilterError
from netfilter.keys import PrivateKey

__all__ = [
    "MAX_CHECKPOINT_SIZE",
    "SIG_TYPE_COSIGNATURE_V1",
    "Checkpoint",
    "CheckpointError",
    "CosignatureSigner",
    "CosignatureVerifier",
    "cosignature_timestamp",
    "new_cosignature_verifier",
    "open_checkpoint",
    "sign_checkpoint",
]

SIG_TYPE_COSIGNATURE_V1 = 0x04
MAX_CHECKPOINT_SIZE = 1 << 16
"""Longest checkpoint text accepted, in characters."""

_HASH_SIZE = 32
_MAX_TREE_SIZE = (1 << 64) - 1
_MAX_TIMESTAMP = (1 << 63) - 1
_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class CheckpointError(NetfilterError):
    """A signed checkpoint verified, but its text is not a valid checkpoint."""


def _check_line(line: str, what: str) -> None:
    if not line:
        raise ValueError(f"checkpoint: empty {what}")
    if _CONTROL.search(line):
        raise ValueError(f"checkpoint: control character in the {what}")


@dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: its origin, its size and the root hash at that size."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line(self.origin, "origin")
        if not 0 <= self.size <= _MAX_TREE_SIZE:
            raise ValueError(f"checkpoint: tree size {self.size} out of range")
        if len(self.root) != _HASH_SIZE:
            raise ValueError(f"checkpoint: a root hash has 32 bytes, not {len(self.root)}")
        for line in self.extensions:
            _check_line(line, "extension line")

    def to_text(self) -> str:
        """The note text (c2sp.org/tlog-checkpoint, "Note text")."""
        root64 = base64.b64encode(self.root).decode()
        return "".join(f"{line}\n" for line in (self.origin, str(self.size), root64,
                                               *self.extensions))

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse a checkpoint text strictly; raises `ValueError`."""
        if len(text) > MAX_CHECKPOINT_SIZE:
            raise ValueError("checkpoint: text too long")
        if not text.endswith("\n"):
            raise ValueError("checkpoint: text does not end in a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise ValueError("checkpoint: fewer than three lines")
        origin, size, root64, *extensions = lines
        _check_line(origin, "origin")
        if not _SIZE.fullmatch(size):
            raise ValueError("checkpoint: tree size is not a canonical decimal number")
        try:
            root = base64.b64decode(root64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("checkpoint: root hash is not base64") from None
        if len(root) != _HASH_SIZE or base64.b64encode(root).decode() != root64:
            raise ValueError("checkpoint: root hash is not the base64 of 32 bytes")
        return cls(origin, int(size), root, tuple(extensions))


def sign_checkpoint(cp: Checkpoint, signer: NoteSigner, *cosigners: NoteSigner) -> bytes:
    """The checkpoint as a signed note (c2sp.org/tlog-checkpoint, "Signatures")."""
    return sign(cp.to_text(), signer, *cosigners)


def open_checkpoint(
    msg: bytes, verifier: NoteVerifier, *, origin: str | None = None
) -> Checkpoint:
    """Verify a signed checkpoint by the log's key and parse it.

    Other signatures (witnesses, old keys) are ignored. With ``origin``, the
    checkpoint must be for that log.
    """
    note = open_note(msg, [verifier])
    try:
        cp = Checkpoint.parse(note.text)
    except ValueError as e:
        raise CheckpointError(verifier.name, str(e).removeprefix("checkpoint: ")) from e
    if origin is not None and cp.origin != origin:
        raise CheckpointError(verifier.name, f"checkpoint is for {cp.origin!r}, not {origin!r}")
    return cp


# --------------------------------------------------------------------------- cosignatures
def _cosigned_message(timestamp: int, text: bytes) -> bytes:
    """The Ed25519 cosignature/v1 signed message (c2sp.org/tlog-cosignature)."""
    return b"cosignature/v1\ntime %d\n" % timestamp + text


def _is_checkpoint(text: bytes) -> bool:
    try:
        Checkpoint.parse(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class CosignatureVerifier(Verifier):
    """Checks a witness's Ed25519 cosignature/v1 on a checkpoint (signature type 0x04)."""

    sig_type: ClassVar[int] = SIG_TYPE_COSIGNATURE_V1

    def verify(self, msg: bytes, sig: bytes) -> bool:
        """sig is timestamp (8 bytes, big-endian) || Ed25519 signature (64 bytes)."""
        if len(sig) != 72 or not _is_checkpoint(msg):
            return False
        timestamp = int.from_bytes(sig[:8], "big")
        if timestamp > _MAX_TIMESTAMP:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(
                sig[8:], _cosigned_message(timestamp, msg)
            )
        except (InvalidSignature, ValueError):
            return False
        return True


class CosignatureSigner(Signer):
    """Makes Ed25519 cosignature/v1 signatures on checkpoints; never printed.

    ``clock`` gives the POSIX time to sign at (default: now). Name, key hash and
    verifier come from the note Signer; only the type byte and the message differ.
    """

    __slots__ = ("_clock",)

    def __init__(
        self, name: str, key: PrivateKey, *, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(name, key)
        self._verifier = CosignatureVerifier(name, key.public.raw)
        self._clock = clock

    def verifier(self) -> CosignatureVerifier:
        verifier = self._verifier
        assert isinstance(verifier, CosignatureVerifier)
        return verifier

    def sign(self, msg: bytes) -> bytes:
        if not _is_checkpoint(msg):
            raise ValueError("checkpoint: a cosignature signs only a checkpoint")
        timestamp = int(self._clock())
        if not 0 <= timestamp <= _MAX_TIMESTAMP:
            raise ValueError(f"checkpoint: cosignature time {timestamp} out of range")
        return timestamp.to_bytes(8, "big") + self._key.sign(_cosigned_message(timestamp, msg))

    def __repr__(self) -> str:
        return f"CosignatureSigner({self.name}+{self.key_hash:08x})"


def new_cosignature_verifier(vkey: str) -> CosignatureVerifier:
    """Parse a cosigner's verifier key ``<name>+<hash>+<base64(0x04 || public key)>``."""
    name, _, rest = vkey.partition("+")
    hash_hex, _, key64 = rest.partition("+")
    try:
        key = base64.b64decode(key64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("checkpoint: malformed cosigner key") from None
    if (not re.fullmatch(r"[0-9a-f]{8}", hash_hex) or len(key) != 33
            or key[0] != SIG_TYPE_COSIGNATURE_V1 or base64.b64encode(key).decode() != key64):
        raise ValueError("checkpoint: malformed cosigner key (want name+hash+base64(0x04 || key))")
    verifier = CosignatureVerifier(name, key[1:])
    if verifier.key_hash != int(hash_hex, 16):
        raise ValueError("checkpoint: cosigner key hash does not match the key")
    return verifier


def cosignature_timestamp(sig: Signature) -> int:
    """The POSIX time a cosignature/v1 signature line says it was made at."""
    try:
        raw = base64.b64decode(sig.base64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("checkpoint: signature is not base64") from None
    if len(raw) != 4 + 72:
        raise ValueError("checkpoint: not an Ed25519 cosignature")
    return int.from_bytes(raw[4:12], "big")
