"""The synthetic list generator: both build paths agree, and the shape is as documented."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from netfilter.canonical import canonicalize
from netfilter.listfile import pack_entries
from synth import Spec, fast_arrays, source_entries, url_queries


def _sha(expression: str) -> bytes:
    return hashlib.sha256(expression.encode()).digest()


@pytest.mark.parametrize("entries", [0, 1, 7, 4_001, 30_000])
def test_fast_form_equals_plaintext_form(entries: int) -> None:
    """The vectorised generator yields exactly what pack_entries makes from plaintext."""
    spec = Spec(entries)
    digests, meta, refs, categories, hosts, dups = pack_entries(source_entries(spec), _sha)
    fast = fast_arrays(spec)
    assert dups == 0
    np.testing.assert_array_equal(fast[0], digests)
    np.testing.assert_array_equal(fast[1], meta)
    assert fast[2] == refs
    assert fast[3] == categories
    np.testing.assert_array_equal(fast[4], hosts)


def test_shape() -> None:
    spec = Spec(80_000)
    entries = list(source_entries(spec))
    assert sum(e.kind == "url" for e in entries) == 40_000
    assert len({e.host for e in entries if e.kind == "url"}) == spec.n_hosts == 10_000
    assert len({e.ref for e in entries}) == len(entries)
    reserved = (".example", ".test", ".invalid")
    assert all(e.host.endswith(reserved) for e in entries)
    queries = url_queries(spec, 2_000)
    assert all(canonicalize(q.url).split("/")[2].endswith(reserved) for q in queries)
