"""Bounded memo dicts: the caches in front of look-ups whose answers cannot change
while the dict lives (an engine's list state, a matcher).

Cleared wholesale when full: no LRU bookkeeping on the hot path, and a cleared cache
refills at the look-ups' own speed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["remember"]

K = TypeVar("K")
V = TypeVar("V")


def remember(cache: dict[K, V], key: K, compute: Callable[[K], V], limit: int) -> V:
    """`cache[key]`, or `compute(key)` kept there (what `compute` raises is not kept)."""
    try:
        return cache[key]
    except KeyError:
        pass
    value = compute(key)
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value
