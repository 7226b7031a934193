"""The baseline: what a user of the design card's library would write.

For each lookup expression of the URL (netfilter's own canonicalizer, so both sides do
the same canonicalization work): SHA-256 with hashlib, `digest in
pybloom_live.BloomFilter` with its default hashing, then `digest in set`, stopping at
the first hit. No host index: every expression of every URL is hashed and probed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt
from pybloom_live import BloomFilter

from netfilter.canonical import expressions, host_expressions

__all__ = ["PybloomBaseline", "digest_objects"]


def digest_objects(digests: npt.NDArray[np.uint8]) -> list[bytes]:
    """One fresh `bytes` object per row of an (n, 32) digest array."""
    raw = np.ascontiguousarray(digests).tobytes()
    return [raw[i : i + 32] for i in range(0, len(raw), 32)]


class PybloomBaseline:
    """pybloom-live filter + set over the entry digests of one list."""

    def __init__(self, digests: npt.NDArray[np.uint8], error_rate: float = 1e-4) -> None:
        items = digest_objects(digests)
        self.bloom = BloomFilter(capacity=max(1, len(items)), error_rate=error_rate)
        for item in items:
            self.bloom.add(item)
        self.members = set(items)

    def check_url(self, url: str) -> str | None:
        """The first expression of `url` that is listed, or None."""
        sha256, bloom, members = hashlib.sha256, self.bloom, self.members
        for expression in expressions(url):
            digest = sha256(expression.encode()).digest()
            if digest in bloom and digest in members:
                return expression
        return None

    def check_host(self, name: str) -> str | None:
        """hashlib + set over the host expressions (`host/` of each suffix)."""
        sha256, members = hashlib.sha256, self.members
        for expression in host_expressions(name):
            if sha256(expression.encode()).digest() in members:
                return expression
        return None
