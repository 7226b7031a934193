"""Bloom filter probe and build time: pybloom-live (baseline), rbloom, BlockedBloom, set.

Probes use 200k real entry digests (SHA-256 of the synthetic list's expressions).
Every round probes fresh `bytes` objects, as check_url does: a digest is a new object
each time, so rbloom and set pay Python's `hash()` of 32 bytes on every probe instead
of reading the hash cached in a reused object.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import rbloom
from pybloom_live import BloomFilter

from baseline import digest_objects
from netfilter.bloom import BlockedBloom
from support import Figures, LoadedList, best_of, timed

ERROR_RATE = 1e-4
BATCH = 20_000
BUILD_ENTRIES = 1_000_000
IMPLS = ("pybloom-live", "rbloom", "rbloom+digest-hash", "BlockedBloom", "set")


def _digest_hash(digest: bytes) -> int:
    """A persistable rbloom hash: the digest's first 16 bytes (rbloom wants a signed i128)."""
    return int.from_bytes(digest[:16], "little", signed=True)


def build(name: str, digests: npt.NDArray[np.uint8]) -> tuple[Callable[[bytes], bool], int]:
    """(membership test, bytes held) of one implementation, from an (n, 32) array."""
    n = max(1, len(digests))
    if name == "BlockedBloom":
        blocked = BlockedBloom(digests)
        return blocked.contains, blocked.memory_bytes
    items = digest_objects(digests)
    if name == "pybloom-live":
        bf = BloomFilter(capacity=n, error_rate=ERROR_RATE)
        for item in items:
            bf.add(item)
        return bf.__contains__, bf.num_bits // 8
    if name == "rbloom":
        rb = rbloom.Bloom(n, ERROR_RATE)
        rb.update(items)
        return rb.__contains__, rb.size_in_bits // 8
    if name == "rbloom+digest-hash":
        rh = rbloom.Bloom(n, ERROR_RATE, hash_func=_digest_hash)
        rh.update(items)
        return rh.__contains__, rh.size_in_bits // 8
    members = set(items)
    held = sys.getsizeof(members) + sum(sys.getsizeof(item) for item in items)
    return members.__contains__, held


@pytest.fixture(scope="module")
def members(list200k: LoadedList) -> npt.NDArray[np.uint8]:
    return list200k.lists.bundles[0].array("digests.bin")


@pytest.fixture(scope="module")
def absent() -> npt.NDArray[np.uint8]:
    """Digests of nothing in the list (uniform random, as SHA-256 of clean expressions)."""
    return np.random.default_rng(7).integers(0, 256, size=(2_000_000, 32), dtype=np.uint8)


@pytest.fixture(scope="module")
def filters(members: npt.NDArray[np.uint8]) -> dict[str, tuple[Callable[[bytes], bool], int]]:
    return {name: build(name, members) for name in IMPLS}


@pytest.mark.parametrize("name", IMPLS)
def test_no_member_missed(name: str, filters: dict[str, Any],
                          members: npt.NDArray[np.uint8]) -> None:
    contains = filters[name][0]
    missed = [d for d in digest_objects(members) if not contains(d)]
    assert not missed, f"{name} missed {len(missed)} of {len(members)} members"


@pytest.mark.parametrize("name", [n for n in IMPLS if n != "set"])
def test_false_positive_rate(name: str, filters: dict[str, Any], members: Any,
                             absent: npt.NDArray[np.uint8], figures: Figures) -> None:
    contains, held = filters[name]
    probes = absent[:300_000] if name == "pybloom-live" else absent
    hits = sum(map(contains, digest_objects(probes)))
    rate = hits / len(probes)
    figures.row(f"Bloom filters over {len(members):,} digests (target error rate 1e-4)", name,
                f"false positives {hits}/{len(probes):,} = {rate:.2e};  "
                f"{held / len(members):.2f} bytes/entry")
    assert rate < 1e-3  # sanity only: every "maybe" is confirmed exactly anyway


def test_set_size(filters: dict[str, Any], members: Any, figures: Figures) -> None:
    held = filters["set"][1]
    figures.row(f"Bloom filters over {len(members):,} digests (target error rate 1e-4)", "set",
                f"exact;  {held / len(members):.2f} bytes/entry (set + bytes objects)")


@pytest.mark.parametrize("which", ["absent", "present"])
@pytest.mark.parametrize("name", IMPLS)
def test_probe(benchmark: Any, name: str, which: str, filters: dict[str, Any],
               members: npt.NDArray[np.uint8], absent: npt.NDArray[np.uint8],
               figures: Figures) -> None:
    """Time per probe over a batch of 20k fresh digests (all absent, or all present)."""
    contains = filters[name][0]
    rng = np.random.default_rng(11)
    source = absent[:BATCH] if which == "absent" else members[rng.choice(len(members), BATCH)]
    benchmark.group = f"probe-{which}"

    def setup() -> tuple[tuple[list[bytes]], dict[str, Any]]:
        return (digest_objects(source),), {}

    def probe(batch: list[bytes]) -> int:
        return sum(map(contains, batch))

    rounds = 5 if name == "pybloom-live" else 15
    found = benchmark.pedantic(probe, setup=setup, rounds=rounds, warmup_rounds=1)
    if which == "present":
        assert found == BATCH
    per = best_of(benchmark, BATCH)
    if per is not None:
        figures.time(f"probe, {which} digests, {len(members):,} entries", name, per,
                     baseline=name == "pybloom-live", unit="probe")


@pytest.mark.parametrize("name", ["pybloom-live", "rbloom", "rbloom+digest-hash",
                                  "BlockedBloom"])
def test_build_1m(name: str, figures: Figures) -> None:
    """Build from an (n, 32) digest array, as at list load (object creation included)."""
    digests = np.random.default_rng(5).integers(0, 256, size=(BUILD_ENTRIES, 32),
                                               dtype=np.uint8)
    repeat = 1 if name == "pybloom-live" else 3
    seconds = timed(lambda: build(name, digests), repeat)
    figures.time(f"build from {BUILD_ENTRIES:,} digests", name, seconds / BUILD_ENTRIES,
                 baseline=name == "pybloom-live", unit="entry",
                 note=f"{seconds:.2f} s per 1M (10M: see the slow build test)")


@pytest.fixture(scope="module")
def digests_10m() -> npt.NDArray[np.uint8]:
    """11.25M random digests: the filter of a 10M list (entries + N/8 host index)."""
    return np.random.default_rng(13).integers(0, 256, size=(11_250_000, 32), dtype=np.uint8)


def _build_chunked(name: str, digests: npt.NDArray[np.uint8]) -> Callable[[bytes], bool]:
    """rbloom from 1M-object chunks (bounded temporaries), or BlockedBloom in one call."""
    if name == "BlockedBloom":
        return BlockedBloom(digests).contains
    bloom = rbloom.Bloom(len(digests), ERROR_RATE)
    for start in range(0, len(digests), 1 << 20):
        bloom.update(digest_objects(digests[start : start + (1 << 20)]))
    return bloom.__contains__


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rbloom", "BlockedBloom"])
def test_build_and_probe_10m(name: str, digests_10m: npt.NDArray[np.uint8],
                             figures: Figures) -> None:
    """At 10M scale the filters outgrow the CPU caches: build and probe again."""
    import time

    n = len(digests_10m)
    start = time.perf_counter()
    contains = _build_chunked(name, digests_10m)
    seconds = time.perf_counter() - start
    figures.time(f"build from {n:,} digests (10M list + host index)", name, seconds / n,
                 baseline=name == "rbloom", unit="entry", note=f"{seconds:.2f} s")
    rng = np.random.default_rng(17)
    for which in ("absent", "present"):
        rows = (rng.integers(0, 256, size=(BATCH, 32), dtype=np.uint8) if which == "absent"
                else digests_10m[rng.choice(n, BATCH)])
        best = float("inf")
        for _ in range(7):
            batch = digest_objects(rows)
            begin = time.perf_counter()
            found = sum(map(contains, batch))
            best = min(best, time.perf_counter() - begin)
        if which == "present":
            assert found == BATCH
        figures.time(f"probe, {which} digests, {n:,} entries", name, best / BATCH,
                     baseline=name == "rbloom", unit="probe")
