"""A two-word register-blocked Bloom filter over SHA-256 digests, built with numpy.

Why not a library (figures in benchmarks/README.md): rbloom probes fastest but hashes
with Python's per-process `hash()`, so its filter must be rebuilt at every load one
Python object per entry (~6 s for a 10M-entry list); pybloom-live probes at 2-3 us.
Digests are already uniform random bits, so this filter takes its hash values
straight from digest slices and is built vectorised:

- bytes 0..3 choose a first 64-bit word as `(x * nwords) >> 32`, bytes 4..5 (12 bits)
  one of 4096 fixed 4-bit patterns to test in it; bytes 6..9 and 10..11 a second word
  and pattern (k = 8 in two words);
- a probe is a handful of small-integer operations on an `array('Q')`, and a clean
  digest almost always fails on the first word, so the second is rarely read.

At 28 bits per entry the measured false-positive rate is ~6e-5; every "maybe" is
confirmed by an exact look-up, so a false positive costs time, never a wrong block.
"""

from __future__ import annotations

import functools
import struct
from array import array
from collections.abc import Callable, Iterable

import numpy as np
import numpy.typing as npt

__all__ = ["BITS_PER_ENTRY", "PROBE_FIELDS", "TABLE_MASK", "BlockedBloom", "pattern_arrays",
           "pattern_masks"]

BITS_PER_ENTRY = 28
PATTERN_BITS = 4  # bits set per pattern, one pattern per word
TABLE_MASK = 4095  # 12 bits of the digest pick a pattern
_CHUNK = 1 << 20  # digests per vectorised build step (bounds temporary memory)
PROBE_FIELDS = struct.Struct(">IHIH")  # word 1, pattern 1, word 2, pattern 2


@functools.cache
def _patterns() -> npt.NDArray[np.uint64]:
    """Two fixed tables of 4096 64-bit patterns, shape (2, 4096)."""
    rng = np.random.Generator(np.random.PCG64(0x6E66))
    bits = rng.integers(0, 64, size=(2, TABLE_MASK + 1, PATTERN_BITS), dtype=np.uint64)
    masks = np.zeros((2, TABLE_MASK + 1), dtype=np.uint64)
    for k in range(PATTERN_BITS):
        masks |= np.uint64(1) << bits[:, :, k]
    return masks


@functools.cache
def pattern_arrays() -> tuple[array[int], array[int]]:
    """The patterns as two array('Q') buffers, for the C probe."""
    masks = _patterns()
    return array("Q", masks[0].tobytes()), array("Q", masks[1].tobytes())


@functools.cache
def pattern_masks() -> tuple[list[int], list[int]]:
    """The same patterns as Python ints, for the probe."""
    masks = _patterns()
    return masks[0].tolist(), masks[1].tolist()


class BlockedBloom:
    """Set membership with false positives, never false negatives, for 32-byte digests."""

    __slots__ = ("contains", "nwords", "size", "words")

    def __init__(
        self,
        digests: npt.NDArray[np.uint8] | Iterable[npt.NDArray[np.uint8]],
        *,
        size: int | None = None,
        bits_per_entry: int = BITS_PER_ENTRY,
        nwords: int | None = None,
    ) -> None:
        """Build from (k, 32) uint8 arrays (one, or an iterable of chunks streamed once).

        `size` is the number of digests, needed up front to size a streamed filter;
        `nwords` overrides the sizing (tests saturate a one-word filter).
        """
        chunks: Iterable[npt.NDArray[np.uint8]]
        if isinstance(digests, np.ndarray):
            chunks = [digests]
        elif size is None:
            chunks = list(digests)
        else:
            chunks = digests
        if size is None:
            size = sum(int(c.shape[0]) for c in chunks)
        self.size = size
        self.nwords = nwords or max(1, -(-size * bits_per_entry // 64))
        self.words = _build_words(chunks, self.nwords)
        self.contains: Callable[[bytes], bool] = _make_probe(self.words, self.nwords)

    def __contains__(self, digest: bytes) -> bool:
        return self.contains(digest)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the filter's words."""
        return self.nwords * 8

    def __repr__(self) -> str:
        return f"BlockedBloom(size={self.size}, nwords={self.nwords})"


def _build_words(chunks: Iterable[npt.NDArray[np.uint8]], nwords: int) -> array[int]:
    masks = _patterns()
    words = np.zeros(nwords, dtype=np.uint64)
    n = np.uint64(nwords)
    shift = np.uint64(32)
    for digests in chunks:
        if digests.ndim != 2 or digests.shape[1] != 32:
            raise ValueError("digests must be (k, 32) uint8 arrays")
        for start in range(0, digests.shape[0], _CHUNK):
            chunk = np.ascontiguousarray(digests[start : start + _CHUNK])
            fields = [chunk[:, i : i + w].copy().view(f">u{w}").ravel()
                      for i, w in ((0, 4), (4, 2), (6, 4), (10, 2))]
            for table, (where, pattern) in enumerate(((fields[0], fields[1]),
                                                      (fields[2], fields[3]))):
                index = (where.astype(np.uint64) * n) >> shift
                np.bitwise_or.at(words, index, masks[table][pattern & TABLE_MASK])
    return array("Q", words.tobytes())


def _make_probe(words: array[int], nwords: int) -> Callable[[bytes], bool]:
    """A closure over locals: the cheapest call Python offers."""
    unpack = PROBE_FIELDS.unpack_from
    first, second = pattern_masks()

    def contains(digest: bytes) -> bool:
        w1: int
        a: int
        w2: int
        b: int
        w1, a, w2, b = unpack(digest)
        mask = first[a & TABLE_MASK]
        if words[(w1 * nwords) >> 32] & mask != mask:
            return False
        mask = second[b & TABLE_MASK]
        return words[(w2 * nwords) >> 32] & mask == mask

    return contains
