"""What is hashed and how: one place, so the authority's builder and the matcher agree.

`sha256` is the Safe Browsing full hash of an expression. `hmac-sha256` keys it with a
list key that only licensed operators receive, so a leaked bundle cannot be reversed
by hashing a dictionary of URLs.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from netfilter.errors import KeyFileError

__all__ = ["HashName", "hmac_key_id", "make_hasher", "read_hmac_key"]

HashName = Literal["sha256", "hmac-sha256"]
MIN_HMAC_KEY = 16


def make_hasher(name: HashName, key: bytes | None = None) -> Callable[[str], bytes]:
    """A function from expression to its 32-byte digest."""
    if name == "sha256":
        sha256 = hashlib.sha256

        def plain(expression: str) -> bytes:
            return sha256(expression.encode()).digest()

        return plain
    if key is None:
        raise ValueError("hmac-sha256 needs a list key")
    digest = hmac.digest

    def keyed(expression: str) -> bytes:
        return digest(key, expression.encode(), "sha256")

    return keyed


def hmac_key_id(key: bytes) -> str:
    """Names a list key without revealing it, so a wrong key is caught at load."""
    return hashlib.sha256(b"netfilter-list-key\n" + key).digest()[:8].hex()


def read_hmac_key(path: str | Path) -> bytes:
    """The list key: the file's bytes without surrounding whitespace, at least 16 bytes."""
    try:
        key = Path(path).read_bytes().strip()
    except FileNotFoundError as e:
        raise KeyFileError(path, "list key file not found") from e
    except OSError as e:
        raise KeyFileError(path, f"cannot read list key ({e.strerror})") from e
    if len(key) < MIN_HMAC_KEY:
        raise KeyFileError(path, f"list key shorter than {MIN_HMAC_KEY} bytes")
    return key
