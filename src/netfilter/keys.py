"""Ed25519 keys, signatures and key ids.

Private keys are PKCS#8 PEM files (mode 0600), public keys SubjectPublicKeyInfo PEM,
so `openssl pkey` can read both. A key id is the first 8 bytes of SHA-256 over the raw
32-byte public key, in hex: short enough to print, long enough to tell keys apart.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from netfilter.errors import KeyExistsError, KeyFileError

__all__ = [
    "PrivateKey",
    "PublicKey",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
]


def key_id(raw_public_key: bytes) -> str:
    """The short, stable name of a public key."""
    return hashlib.sha256(raw_public_key).digest()[:8].hex()


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key that checks signatures."""

    raw: bytes
    source: str = ""

    @property
    def id(self) -> str:
        return key_id(self.raw)

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    def pem(self) -> bytes:
        return Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass(frozen=True, repr=False)
class PrivateKey:
    """An Ed25519 private key that signs; never printed."""

    _key: Ed25519PrivateKey

    @property
    def public(self) -> PublicKey:
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PublicKey(raw)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def raw_seed(self) -> bytes:
        """The 32-byte seed, for formats (signed notes) that need the raw key."""
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return f"PrivateKey(id={self.public.id})"


def generate_keypair(out: str | Path) -> tuple[Path, Path]:
    """Write OUT.key (mode 0600, created that way: never world-readable) and OUT.pub.

    The key appears whole or not at all (written beside it, then hard-linked in place,
    which fails if the name exists), so processes starting together on a fresh node
    never read half a key, and the one that loses the race is told `KeyExistsError`."""
    base = Path(out)
    key_path = base.with_name(base.name + ".key")
    pub_path = base.with_name(base.name + ".pub")
    if key_path.exists():
        raise KeyExistsError(key_path, "exists already; refusing to overwrite a private key")
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KeyFileError(base.parent, f"cannot create directory ({e.strerror})") from e
    raw_key = Ed25519PrivateKey.generate()
    pem = raw_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    stem = f".{base.name}.{os.getpid()}.{secrets.token_hex(4)}"
    key_tmp, pub_tmp = base.with_name(stem + ".key"), base.with_name(stem + ".pub")
    try:
        fd = os.open(key_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.chmod(key_tmp, 0o600)
        pub_tmp.write_bytes(PrivateKey(raw_key).public.pem())
        try:
            os.link(key_tmp, key_path)
        except FileExistsError:
            raise KeyExistsError(key_path, "exists already; another process created it") \
                from None
        except OSError as e:  # a file system without hard links: rename, not atomic-exclusive
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP) or key_path.exists():
                raise
            os.rename(key_tmp, key_path)
        os.replace(pub_tmp, pub_path)
    except OSError as e:
        raise KeyFileError(key_path, f"cannot write ({e.strerror})") from e
    finally:
        for leftover in (key_tmp, pub_tmp):
            leftover.unlink(missing_ok=True)
    return key_path, pub_path


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise KeyFileError(path, f"{what} not found") from e
    except OSError as e:
        raise KeyFileError(path, f"cannot read {what} ({e.strerror})") from e


def load_private_key(path: str | Path) -> PrivateKey:
    """Read an Ed25519 private key written by `netfilter keys generate`."""
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(path, "not a PEM private key without password") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(path, "not an Ed25519 private key")
    return PrivateKey(key)


def load_public_key(path: str | Path) -> PublicKey:
    """Read an Ed25519 public key (PEM) that the operator trusts."""
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyFileError(path, "not a PEM public key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(path, "not an Ed25519 public key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(raw, source=str(path))
