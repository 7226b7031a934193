"""Merkle tree hashes and proofs of RFC 9162 section 2.1 (the RFC 6962 tree, SHA-256).

Pure functions on bytes and ints: storage comes in through `HashReader`, so no I/O
happens here. A proof that does not check raises the one opaque `ProofError`; bad
arguments (an index outside the tree, sizes out of order) raise `ValueError` prefixed
"merkle:"; a broken internal invariant is an `AssertionError`.

Hashes in proofs are complete-subtree hashes. A reader that also implements
`SubtreeHashReader` (as `MemoryHashStore` does) serves them directly, so a proof costs
O(log n) reads; otherwise they are recomputed from leaf hashes read in chunks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Protocol, runtime_checkable

from netfilter.errors import NetfilterError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "HashReader",
    "MemoryHashStore",
    "ProofError",
    "SubtreeHashReader",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root",
    "tree_root",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH({}) = SHA-256() (RFC 9162 section 2.1.1)."""

_CHUNK_LEVEL = 14  # leaf hashes are read 2**14 (512 KiB) at a time
_sha256 = hashlib.sha256


class ProofError(NetfilterError):
    """invalid transparency proof"""

    def __init__(self) -> None:
        super().__init__("merkle", "invalid transparency proof")


def leaf_hash(data: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d) (RFC 9162 section 2.1.1)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right), an interior node (RFC 9162 section 2.1.1)."""
    return _sha256(b"\x01" + left + right).digest()


def _mth(hashes: list[bytes]) -> bytes:
    """MTH over already-checked hashes, level by level.

    Carrying an odd last node up unchanged builds exactly the RFC 9162 2.1.1 tree,
    whose left subtree is always the largest perfect one.
    """
    if not hashes:
        return EMPTY_ROOT
    level = hashes
    while len(level) > 1:
        pairs = iter(level)  # zip(pairs, pairs) takes them two at a time
        nxt = [
            _sha256(b"\x01" + left + right).digest()
            for left, right in zip(pairs, pairs, strict=False)
        ]
        if len(level) & 1:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _check_leaf_hashes(hashes: Sequence[bytes], what: str) -> list[bytes]:
    out = [bytes(h) for h in hashes]
    for h in out:
        if len(h) != HASH_SIZE:
            raise ValueError(f"merkle: {what}: a hash of {len(h)} bytes, want {HASH_SIZE}")
    return out


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of the leaf hashes, in order (RFC 9162 section 2.1.1)."""
    return _mth(_check_leaf_hashes(leaf_hashes, "root"))


class CompactRange:
    """The compact range [0, size): the roots of the perfect subtrees that make up a tree.

    Holds popcount(size) hashes, largest subtree first, so a tree of any size
    grows one leaf at a time in O(log n) space and gives its root at every size.
    ``CompactRange(cr.size, cr.hashes)`` resumes a stored state.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if size < 0:
            raise ValueError(f"merkle: negative tree size {size}")
        if len(hashes) != size.bit_count():
            raise ValueError(
                f"merkle: a compact range of size {size} has {size.bit_count()} hashes, "
                f"not {len(hashes)}"
            )
        self._size = size
        self._hashes = _check_leaf_hashes(hashes, "compact range")

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        return tuple(self._hashes)

    def append(self, leaf_hash: bytes) -> None:
        """Add the next leaf hash; merges the subtrees it completes."""
        if len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"merkle: a leaf hash of {len(leaf_hash)} bytes, want {HASH_SIZE}")
        hashes, h, n = self._hashes, bytes(leaf_hash), self._size
        while n & 1:
            h = _sha256(b"\x01" + hashes.pop() + h).digest()
            n >>= 1
        hashes.append(h)
        self._size += 1

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Append many leaf hashes, hashing aligned runs of them level by level.

        A bad hash raises `ValueError`; the chunks of 2**14 before its own stay appended.
        """
        it = iter(leaf_hashes)
        while chunk := _check_leaf_hashes(list(islice(it, 1 << _CHUNK_LEVEL)), "extend"):
            i = 0
            while i < len(chunk):
                # The largest perfect subtree that starts at the current size and fits.
                size = self._size
                level = (len(chunk) - i).bit_length() - 1
                if size:
                    level = min(level, (size & -size).bit_length() - 1)
                width = 1 << level
                self._push(level, _mth(chunk[i : i + width]))
                i += width

    def _push(self, level: int, h: bytes) -> None:
        """Add a perfect subtree of 2**level leaves at a size that is a multiple of it."""
        assert self._size & ((1 << level) - 1) == 0, "merkle: bad math in CompactRange"
        hashes, n = self._hashes, self._size >> level
        while n & 1:
            h = _sha256(b"\x01" + hashes.pop() + h).digest()
            n >>= 1
        hashes.append(h)
        self._size += 1 << level

    def root(self) -> bytes:
        """MTH(D[size]): the subtree roots folded right to left."""
        if not self._hashes:
            return EMPTY_ROOT
        h = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            h = _sha256(b"\x01" + left + h).digest()
        return h

    def copy(self) -> CompactRange:
        return CompactRange(self._size, self._hashes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other._size and self._hashes == other._hashes

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, root={self.root().hex()})"


class HashReader(Protocol):
    """Storage of a log's leaf hashes, as the proofs read it."""

    def leaf_hashes(self, start: int, end: int) -> Sequence[bytes]:
        """The hashes of leaves start..end-1, exactly end - start of them."""
        ...


@runtime_checkable
class SubtreeHashReader(HashReader, Protocol):
    """A `HashReader` that also has the hash of every complete (perfect) subtree."""

    def subtree_hash(self, level: int, index: int) -> bytes:
        """MTH(D[index * 2**level : (index + 1) * 2**level])."""
        ...


class MemoryHashStore:
    """An in-memory log of leaf hashes that keeps every perfect subtree hash.

    Appending is amortised O(1); it holds about 2n hashes.
    """

    __slots__ = ("_levels",)

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        for h in leaf_hashes:
            self.append(h)

    def __len__(self) -> int:
        return len(self._levels[0])

    def append(self, leaf_hash: bytes) -> int:
        """Store the next leaf hash; returns its index."""
        if len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"merkle: a leaf hash of {len(leaf_hash)} bytes, want {HASH_SIZE}")
        levels, h = self._levels, bytes(leaf_hash)
        index = len(levels[0])
        levels[0].append(h)
        i, level = index, 0
        while i & 1:  # this node completes its parent
            h = _sha256(b"\x01" + levels[level][i - 1] + h).digest()
            level, i = level + 1, i >> 1
            if level == len(levels):
                levels.append([])
            levels[level].append(h)
        return index

    def leaf_hashes(self, start: int, end: int) -> Sequence[bytes]:
        if not 0 <= start <= end <= len(self._levels[0]):
            raise ValueError(f"merkle: leaves [{start}, {end}) not in a store of {len(self)}")
        return self._levels[0][start:end]

    def subtree_hash(self, level: int, index: int) -> bytes:
        if level < 0 or level >= len(self._levels) or not 0 <= index < len(self._levels[level]):
            raise ValueError(f"merkle: no complete subtree ({level}, {index}) in the store")
        return self._levels[level][index]

    def __repr__(self) -> str:
        return f"MemoryHashStore(size={len(self)})"


def _read(reader: HashReader, start: int, end: int) -> list[bytes]:
    hashes = reader.leaf_hashes(start, end)
    if len(hashes) != end - start:
        raise ValueError(f"merkle: reader gave {len(hashes)} hashes for leaves [{start}, {end})")
    return _check_leaf_hashes(hashes, f"leaves [{start}, {end})")


_PerfectHash = Callable[[int, int], bytes]
"""(level, index) -> MTH of leaves [index * 2**level, (index + 1) * 2**level)."""


def _perfect_hashes(reader: HashReader) -> _PerfectHash:
    """Where perfect subtree hashes come from: the reader's cache, or its leaf hashes."""
    if isinstance(reader, SubtreeHashReader):  # checked once per proof: it is slow
        read = reader.subtree_hash

        def cached(level: int, index: int) -> bytes:
            h = read(level, index)
            if len(h) != HASH_SIZE:
                raise ValueError(f"merkle: reader gave a subtree hash of {len(h)} bytes")
            return h

        return cached

    def computed(level: int, index: int) -> bytes:
        start, width = index << level, 1 << level
        if level <= _CHUNK_LEVEL:
            return _mth(_read(reader, start, start + width))
        step = 1 << _CHUNK_LEVEL
        return _mth([_mth(_read(reader, s, s + step)) for s in range(start, start + width, step)])

    return computed


def _range_hash(perfect: _PerfectHash, lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) for a subtree of the RFC 9162 recursion (lo aligned, hi - lo > 0)."""
    parts: list[bytes] = []
    while lo < hi:
        level = (hi - lo).bit_length() - 1  # largest perfect subtree that fits
        assert lo & ((1 << level) - 1) == 0, "merkle: bad math in _range_hash"
        parts.append(perfect(level, lo >> level))
        lo += 1 << level
    assert parts, "merkle: bad math in _range_hash"
    h = parts.pop()
    while parts:
        h = _sha256(b"\x01" + parts.pop() + h).digest()
    return h


def _split(n: int) -> int:
    """k, the largest power of two smaller than n >= 2 (RFC 9162 section 2.1.1)."""
    return 1 << ((n - 1).bit_length() - 1)


def tree_root(size: int, reader: HashReader) -> bytes:
    """MTH(D[size]) of the first size leaves in a store."""
    if size < 0:
        raise ValueError(f"merkle: negative tree size {size}")
    return EMPTY_ROOT if size == 0 else _range_hash(_perfect_hashes(reader), 0, size)


def inclusion_proof(index: int, size: int, reader: HashReader) -> list[bytes]:
    """PATH(index, D[size]), leaf to root (RFC 9162 section 2.1.3.1)."""
    if not 0 <= index < size:
        raise ValueError(f"merkle: leaf index {index} is not in a tree of size {size}")
    perfect = _perfect_hashes(reader)
    siblings: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            siblings.append(_range_hash(perfect, lo + k, hi))
            hi = lo + k
        else:
            siblings.append(_range_hash(perfect, lo, lo + k))
            lo += k
    siblings.reverse()
    return siblings


def consistency_proof(old_size: int, new_size: int, reader: HashReader) -> list[bytes]:
    """PROOF(old_size, D[new_size]) = SUBPROOF(m, D[n], true) (RFC 9162 section 2.1.4.1)."""
    if not 0 < old_size <= new_size:
        raise ValueError(
            f"merkle: no consistency proof from size {old_size} to size {new_size} "
            "(need 0 < old size <= new size)"
        )
    perfect = _perfect_hashes(reader)
    proof: list[bytes] = []
    lo, hi, known = 0, new_size, True
    while old_size != hi:
        k = _split(hi - lo)
        if old_size <= lo + k:
            proof.append(_range_hash(perfect, lo + k, hi))
            hi = lo + k
        else:
            proof.append(_range_hash(perfect, lo, lo + k))
            lo += k
            known = False
    if not known:
        proof.append(_range_hash(perfect, lo, hi))
    proof.reverse()
    return proof


def _hashes_ok(*hashes: object) -> bool:
    return all(isinstance(h, bytes | bytearray) and len(h) == HASH_SIZE for h in hashes)


def verify_inclusion(
    index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that leaf_hash is leaf index of the tree (size, root) (RFC 9162 2.1.3.2)."""
    if not 0 <= index < size:
        raise ValueError(f"merkle: leaf index {index} is not in a tree of size {size}")
    if not _hashes_ok(leaf_hash, root, *proof):
        raise ProofError
    fn, sn, r = index, size - 1, bytes(leaf_hash)
    for p in proof:
        if sn == 0:
            raise ProofError
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or r != root:
        raise ProofError


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that tree (new_size, new_root) extends (old_size, old_root) (RFC 9162 2.1.4.2).

    Equal sizes need an empty proof and equal roots; a proof from the empty tree means
    nothing, so old_size must be at least 1.
    """
    if not 0 < old_size <= new_size:
        raise ValueError(
            f"merkle: no consistency proof from size {old_size} to size {new_size} "
            "(need 0 < old size <= new size)"
        )
    if not _hashes_ok(old_root, new_root, *proof):
        raise ProofError
    if old_size == new_size:
        if proof or old_root != new_root:
            raise ProofError
        return
    if not proof:
        raise ProofError
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # an exact power of 2
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = bytes(path[0])
    for c in path[1:]:
        if sn == 0:
            raise ProofError
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or fr != old_root or sr != new_root:
        raise ProofError
