"""Signed notes (c2sp.org/signed-note, the format of Go's golang.org/x/mod/sumdb/note).

A note is UTF-8 text ending in a newline, a blank line, then one or more lines
``— <key name> <base64(key ID || signature)>``. Its text must be ignored unless a
trusted key's signature on it verifies. Keys are Ed25519 (signature type 0x01); the
key ID is the first 4 bytes of SHA-256(name || 0x0A || 0x01 || public key), big-endian.

Errors::

    NetfilterError
    └── NoteError                 a signed note did not open
        ├── MalformedNoteError    not a well-formed note (the reason says where)
        ├── UnknownVerifierError  no known key has this name and key ID
        ├── InvalidSignatureError a known key's signature does not verify
        └── UnverifiedNoteError   well formed, but no known key signed it (.note)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Protocol, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from netfilter.errors import NetfilterError
from netfilter.keys import PrivateKey, PublicKey

__all__ = [
    "MAX_SIGNATURES",
    "SIG_TYPE_ED25519",
    "InvalidSignatureError",
    "MalformedNoteError",
    "Note",
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "Signature",
    "Signer",
    "UnknownVerifierError",
    "UnverifiedNoteError",
    "Verifier",
    "VerifierList",
    "is_valid_name",
    "key_hash",
    "new_signer",
    "new_verifier",
    "open_note",
    "sign",
]

SIG_TYPE_ED25519 = 0x01
MAX_SIGNATURES = 100
"""More signature lines than this make a note malformed (the Go package's limit)."""

_SIG_PREFIX = "\u2014 "  # em dash, space
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")


# --------------------------------------------------------------------------- errors
class NoteError(NetfilterError):
    """A signed note did not open."""


class MalformedNoteError(NoteError):
    """The message is not a well-formed signed note."""

    def __init__(self, reason: str) -> None:
        super().__init__("note", f"malformed note: {reason}")


class UnknownVerifierError(NoteError):
    """No known key has this name and key ID."""

    def __init__(self, name: str, key_hash: int) -> None:
        self.name = name
        self.key_hash = key_hash
        super().__init__("note", f"unknown key {name}+{key_hash:08x}")


class InvalidSignatureError(NoteError):
    """A known key's signature on the note does not verify."""

    def __init__(self, name: str, key_hash: int) -> None:
        self.name = name
        self.key_hash = key_hash
        super().__init__("note", f"invalid signature for key {name}+{key_hash:08x}")


class UnverifiedNoteError(NoteError):
    """The note is well formed, but no known key signed it; `.note` has it, unverified."""

    def __init__(self, note: Note) -> None:
        self.note = note
        super().__init__("note", "note has no verifiable signatures")


# --------------------------------------------------------------------------- keys
def is_valid_name(name: str) -> bool:
    """A key name is non-empty UTF-8 without Unicode spaces, plus signs or controls."""
    if not name or "+" in name or _CONTROL.search(name):
        return False
    if any(c.isspace() for c in name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def key_hash(name: str, key: bytes) -> int:
    """The key ID: SHA-256(name || 0x0A || key)[:4] as a big-endian uint32.

    ``key`` is the signature type byte followed by the public key.
    """
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + key).digest()
    return int.from_bytes(digest[:4], "big")


class NoteVerifier(Protocol):
    """Checks signatures by one key (Go's note.Verifier)."""

    @property
    def name(self) -> str: ...

    @property
    def key_hash(self) -> int: ...

    def verify(self, msg: bytes, sig: bytes) -> bool: ...


class NoteSigner(Protocol):
    """Signs note texts with one key (Go's note.Signer)."""

    @property
    def name(self) -> str: ...

    @property
    def key_hash(self) -> int: ...

    def sign(self, msg: bytes) -> bytes: ...


@dataclass(frozen=True)
class Verifier:
    """An Ed25519 note verifier: a key name and a raw 32-byte public key."""

    name: str
    public_key: bytes
    sig_type: ClassVar[int] = SIG_TYPE_ED25519  # the key type byte of key hash and vkey

    def __post_init__(self) -> None:
        if not is_valid_name(self.name):
            raise ValueError(f"note: invalid key name {self.name!r}")
        if len(self.public_key) != 32:
            raise ValueError("note: an Ed25519 public key has 32 bytes")

    @classmethod
    def from_public_key(cls, name: str, key: PublicKey) -> Self:
        return cls(name, key.raw)

    @property
    def key_hash(self) -> int:
        return key_hash(self.name, bytes([self.sig_type]) + self.public_key)

    @property
    def vkey(self) -> str:
        """The verifier key ``<name>+<key ID hex>+<base64(type || public key)>``."""
        data = base64.b64encode(bytes([self.sig_type]) + self.public_key).decode()
        return f"{self.name}+{self.key_hash:08x}+{data}"

    def verify(self, msg: bytes, sig: bytes) -> bool:
        if len(sig) != 64:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(sig, msg)
        except (InvalidSignature, ValueError):
            return False
        return True


class Signer:
    """An Ed25519 note signer: a key name and a netfilter private key; never printed."""

    __slots__ = ("_key", "_verifier")

    def __init__(self, name: str, key: PrivateKey) -> None:
        self._verifier = Verifier(name, key.public.raw)
        self._key = key

    @classmethod
    def from_private_key(cls, name: str, key: PrivateKey) -> Signer:
        return cls(name, key)

    @property
    def name(self) -> str:
        return self._verifier.name

    @property
    def key_hash(self) -> int:
        return self._verifier.key_hash

    def verifier(self) -> Verifier:
        """The matching verifier, to hand to those who check this signer's notes."""
        return self._verifier

    def sign(self, msg: bytes) -> bytes:
        return self._key.sign(msg)

    def __repr__(self) -> str:
        return f"Signer({self.name}+{self.key_hash:08x})"


def _split_key(text: str, parts: int) -> list[str] | None:
    """Cut at the first parts - 1 plus signs: base64 key data may hold more."""
    fields = text.split("+", parts - 1)
    return fields if len(fields) == parts else None


def _decode_b64(text: str) -> bytes | None:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if base64.b64encode(data).decode() == text else None


def _parse_key_hash(text: str) -> int | None:
    if not re.fullmatch(r"[0-9a-f]{8}", text):
        return None
    return int(text, 16)


def new_verifier(vkey: str) -> Verifier:
    """Parse a verifier key ``<name>+<hash>+<base64(0x01 || public key)>``."""
    fields = _split_key(vkey, 3)
    if fields is None:
        raise ValueError("note: malformed verifier key (want name+hash+key)")
    name, hash_hex, key64 = fields
    hash_ = _parse_key_hash(hash_hex)
    key = _decode_b64(key64)
    if hash_ is None or key is None or not key or not is_valid_name(name):
        raise ValueError("note: malformed verifier key")
    if key[0] != SIG_TYPE_ED25519:
        raise ValueError(f"note: verifier key of unknown signature type 0x{key[0]:02x}")
    if len(key) != 33:
        raise ValueError("note: malformed verifier key (an Ed25519 key has 32 bytes)")
    if key_hash(name, key) != hash_:
        raise ValueError("note: verifier key hash does not match the key")
    return Verifier(name, key[1:])


def new_signer(skey: str) -> Signer:
    """Parse a signer key ``PRIVATE+KEY+<name>+<hash>+<base64(0x01 || seed)>``.

    Error messages never repeat the key.
    """
    fields = _split_key(skey, 5)
    if fields is None or fields[:2] != ["PRIVATE", "KEY"]:
        raise ValueError("note: malformed signer key (want PRIVATE+KEY+name+hash+key)")
    name, hash_hex, key64 = fields[2:]
    hash_ = _parse_key_hash(hash_hex)
    key = _decode_b64(key64)
    if hash_ is None or key is None or not key or not is_valid_name(name):
        raise ValueError("note: malformed signer key")
    if key[0] != SIG_TYPE_ED25519:
        raise ValueError(f"note: signer key of unknown signature type 0x{key[0]:02x}")
    if len(key) != 33:
        raise ValueError("note: malformed signer key (an Ed25519 seed has 32 bytes)")
    signer = Signer(name, PrivateKey(Ed25519PrivateKey.from_private_bytes(key[1:])))
    if signer.key_hash != hash_:
        raise ValueError("note: signer key hash does not match the key")
    return signer


class VerifierList:
    """Known verifiers, looked up by key name and key ID (Go's note.VerifierList)."""

    def __init__(self, verifiers: Iterable[NoteVerifier] = ()) -> None:
        self._by_id: dict[tuple[str, int], list[NoteVerifier]] = {}
        for v in verifiers:
            same = self._by_id.setdefault((v.name, v.key_hash), [])
            if v not in same:
                same.append(v)

    def verifier(self, name: str, key_hash: int) -> NoteVerifier:
        """The verifier for (name, key_hash); `UnknownVerifierError` if there is none.

        Two different keys with one name and key ID are a configuration error
        (`ValueError`), but only once a signature needs them.
        """
        found = self._by_id.get((name, key_hash))
        if not found:
            raise UnknownVerifierError(name, key_hash)
        if len(found) > 1:
            raise ValueError(f"note: ambiguous key {name}+{key_hash:08x}")
        return found[0]


# --------------------------------------------------------------------------- notes
@dataclass(frozen=True)
class Signature:
    """One signature line of a note, verified or not."""

    name: str
    key_hash: int
    base64: str


@dataclass(frozen=True)
class Note:
    """The text of a note and its signatures, those checked and those not."""

    text: str
    sigs: tuple[Signature, ...] = ()
    unverified_sigs: tuple[Signature, ...] = ()


def _check_text(text: str) -> bytes:
    if not text.endswith("\n"):
        raise ValueError("note: the text must end in a newline")
    if _CONTROL.search(text):
        raise ValueError("note: the text has a control character other than newline")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError("note: the text is not valid UTF-8") from e


def _sig_line(name: str, sig64: str) -> str:
    return f"{_SIG_PREFIX}{name} {sig64}\n"


def sign(note: str | Note, *signers: NoteSigner) -> bytes:
    """Sign a text (or re-sign a Note, keeping its signatures by other keys).

    The text must end in a newline and may not hold control characters other than it.
    """
    if not signers:
        raise ValueError("note: sign needs at least one signer")
    old = note if isinstance(note, Note) else Note(note)
    msg = _check_text(old.text)
    lines: list[str] = []
    new: list[str] = []
    have: set[tuple[str, int]] = set()
    for s in signers:
        name, hash_ = s.name, s.key_hash
        if not is_valid_name(name):
            raise ValueError(f"note: invalid signer name {name!r}")
        have.add((name, hash_))
        raw = hash_.to_bytes(4, "big") + s.sign(msg)
        new.append(_sig_line(name, base64.b64encode(raw).decode()))
    for sig in (*old.sigs, *old.unverified_sigs):
        if (sig.name, sig.key_hash) in have:
            continue
        raw_old = _decode_b64(sig.base64)
        if not is_valid_name(sig.name) or raw_old is None or len(raw_old) < 5:
            raise ValueError("note: a kept signature is malformed")
        if int.from_bytes(raw_old[:4], "big") != sig.key_hash:
            raise ValueError("note: a kept signature's key ID does not match its hash")
        lines.append(_sig_line(sig.name, sig.base64))
    lines.extend(new)
    if len(lines) > MAX_SIGNATURES:
        raise ValueError(f"note: more than {MAX_SIGNATURES} signatures")
    return msg + b"\n" + "".join(lines).encode("utf-8")


def _as_list(verifiers: VerifierList | Iterable[NoteVerifier]) -> VerifierList:
    return verifiers if isinstance(verifiers, VerifierList) else VerifierList(verifiers)


def open_note(msg: bytes, verifiers: VerifierList | Iterable[NoteVerifier]) -> Note:
    """Parse a signed note and check its signatures by known keys.

    Signatures by unknown keys are kept in `Note.unverified_sigs`; a known key's bad
    signature raises `InvalidSignatureError`; a note no known key signed raises
    `UnverifiedNoteError`. Repeated lines count once.
    """
    known = _as_list(verifiers)
    try:
        whole = msg.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedNoteError("not valid UTF-8") from None
    if _CONTROL.search(whole):
        raise MalformedNoteError("a control character other than newline")
    split = msg.rfind(b"\n\n")
    if split < 0:
        raise MalformedNoteError("no blank line before the signatures")
    text, block = msg[: split + 1], msg[split + 2 :].decode("utf-8")
    if not block.endswith("\n"):
        raise MalformedNoteError("the signatures do not end in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNoteError(f"more than {MAX_SIGNATURES} signatures")

    verified: list[Signature] = []
    unverified: list[Signature] = []
    seen: set[tuple[str, int, str]] = set()
    for number, line in enumerate(lines, 1):
        if not line.startswith(_SIG_PREFIX):
            raise MalformedNoteError(f"signature line {number} does not start with '— '")
        name, _, sig64 = line[len(_SIG_PREFIX) :].partition(" ")
        raw = _decode_b64(sig64)
        if not is_valid_name(name) or raw is None or len(raw) < 5:
            raise MalformedNoteError(f"signature line {number} is not '— name base64'")
        sig = Signature(name, int.from_bytes(raw[:4], "big"), sig64)
        if (name, sig.key_hash, sig64) in seen:
            continue
        seen.add((name, sig.key_hash, sig64))
        try:
            verifier = known.verifier(name, sig.key_hash)
        except UnknownVerifierError:
            unverified.append(sig)
            continue
        if not verifier.verify(text, raw[4:]):
            raise InvalidSignatureError(name, sig.key_hash)
        if all((s.name, s.key_hash) != (name, sig.key_hash) for s in verified):
            verified.append(sig)

    note = Note(text.decode("utf-8"), tuple(verified), tuple(unverified))
    if not verified:
        raise UnverifiedNoteError(note)
    return note
