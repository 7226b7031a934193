"""Our RFC 9162 tree against an independent implementation (pymerkle, tests only)."""

from __future__ import annotations

import os
import random
import warnings

import pytest

from netfilter.audit import merkle

pymerkle = pytest.importorskip("pymerkle", reason="pymerkle (a test extra) is not installed")


def _root_of(tree: object) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        getter = getattr(tree, "get_state", None) or tree.get_root  # type: ignore[attr-defined]
        return bytes(getter())


def test_roots_equal_at_every_size_up_to_300() -> None:
    rng = random.Random(11)
    entries = [os.urandom(rng.randrange(0, 70)) for _ in range(300)]
    theirs = pymerkle.InmemoryTree(algorithm="sha256")
    compact = merkle.CompactRange()
    for size, entry in enumerate(entries, start=1):
        theirs.append_entry(entry)
        compact.append(merkle.leaf_hash(entry))
        assert compact.root() == _root_of(theirs), size
    assert merkle.root([merkle.leaf_hash(e) for e in entries]) == compact.root()


def test_our_proofs_verify_against_their_roots() -> None:
    entries = [f"event {i}".encode() for i in range(97)]
    theirs = pymerkle.InmemoryTree(algorithm="sha256")
    store = merkle.MemoryHashStore()
    roots = {}
    for size, entry in enumerate(entries, start=1):
        theirs.append_entry(entry)
        store.append(merkle.leaf_hash(entry))
        roots[size] = _root_of(theirs)
    for size in (1, 2, 7, 32, 33, 64, 97):
        for index in range(0, size, max(1, size // 7)):
            proof = merkle.inclusion_proof(index, size, store)
            merkle.verify_inclusion(index, size, merkle.leaf_hash(entries[index]), proof,
                                    roots[size])
        for old in range(1, size, max(1, size // 5)):
            proof = merkle.consistency_proof(old, size, store)
            merkle.verify_consistency(old, size, roots[old], roots[size], proof)
