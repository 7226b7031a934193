"""Delta bundles at 1M entries: bytes and apply time of a 1% change against the full bundle.

The base is the synthetic 1M-entry bundle (`synth.write_fast_bundle`, reserved names
only). Version 2 drops 5,000 entries chosen at random (0.5%) and adds 5,000 new ones
(0.5%: half domains `n<hex>.example`, half URLs on new hosts `n<hex>.test`, so the host
index changes too), with new references. `listdelta.make_delta` writes the full bundle
of version 2 and the delta 1 -> 2, as `netfilter list build --diff-from` does.

Measured in the same run, page cache warm, fastest of 3:
- bytes: the delta file against the full bundle of version 2;
- time: `apply_delta` on a node that holds version 1 open (verify the delta and the
  authority's signature over the result manifest, check the base, derive the result,
  check its digest-set checksum and every member's SHA-256, write the full bundle
  atomically) against the baseline `open_bundle` of the full version 2 (what a node
  does with a downloaded full bundle before it builds its filters); and apply plus
  `open_bundle` of the result, the node's whole verified path to version 2 by delta.

Asserted: the applied file equals the authority's full bundle byte for byte; added
entries block, removed ones do not, a kept one still does.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np

import netfilter
from netfilter.keys import load_public_key
from netfilter.listdelta import ListContent, apply_delta, make_delta
from netfilter.listfile import ENTRY_DTYPE, open_bundle, sort_unique
from support import BigBundles, Figures, timed
from synth import CATEGORIES, Spec, entry, hit_url

ENTRIES = 1_000_000
CHANGED = ENTRIES // 200  # 0.5% removed and 0.5% added: a 1% change
TABLE = "delta bundle: 1M entries, 1% change (0.5% removed, 0.5% added)"


def _added(count: int) -> tuple[list[str], list[bool], list[str]]:
    """(expressions, is_url, hosts of URL entries) of the new entries, reserved names."""
    expressions, is_url, hosts = [], [], []
    for k in range(count):
        if k % 2:
            host = f"n{k:x}.test"
            expressions.append(f"{host}/new/p{k:x}.html")
            hosts.append(host)
        else:
            expressions.append(f"n{k:x}.example/")
        is_url.append(bool(k % 2))
    return expressions, is_url, hosts


def _version2(base: ListContent, spec: Spec, rng: random.Random) -> tuple[ListContent, list[int]]:
    """Version 2's content: 0.5% of the entries gone, 0.5% new; and the removed indexes."""
    removed = rng.sample(range(spec.entries), CHANGED)
    gone = b"".join(hashlib.sha256(entry(spec, i)[1].encode()).digest() for i in removed)
    rows = np.searchsorted(base.digests.view("S32").ravel(), np.frombuffer(gone, dtype="S32"))
    assert (base.digests[rows].view("S32").ravel() == np.frombuffer(gone, dtype="S32")).all()
    keep = np.ones(len(base.digests), dtype=bool)
    keep[rows] = False
    expressions, is_url, hosts = _added(CHANGED)
    new_digests = np.frombuffer(b"".join(hashlib.sha256(e.encode()).digest()
                                         for e in expressions), np.uint8).reshape(-1, 32)
    refs = [f"NF-2027-{9_000_000 + k:07d}".encode() for k in range(CHANGED)]
    new_entries = np.zeros(CHANGED, dtype=ENTRY_DTYPE)
    new_entries["ref_offset"] = len(base.refs) + 15 * np.arange(CHANGED)
    new_entries["ref_length"] = 15
    new_entries["category"] = np.arange(CHANGED) % len(CATEGORIES)
    new_entries["kind"] = is_url
    digests = np.concatenate([base.digests[keep], new_digests])
    entries = np.concatenate([base.entries[keep], new_entries])
    order, dups = sort_unique(digests)
    assert dups == 0
    assert base.hosts is not None
    host_rows = np.frombuffer(b"".join(hashlib.sha256(f"{h}/".encode()).digest()
                                       for h in hosts), np.uint8).reshape(-1, 32)
    all_hosts = np.concatenate([base.hosts, host_rows])
    host_order, _ = sort_unique(all_hosts)
    content = ListContent(digests[order], entries[order], base.refs + b"".join(refs),
                          list(base.categories), all_hosts[host_order])
    return content, removed


def test_delta_bundle_1m(tmp_path: Path, big_bundles: BigBundles, figures: Figures) -> None:
    spec, v1_path = big_bundles.get(ENTRIES)
    authority = big_bundles.authority
    trusted = [load_public_key(authority.public_path)]
    base = open_bundle(v1_path, trusted)
    try:
        new, removed = _version2(ListContent.of(base), spec, random.Random(5))
        full, delta = tmp_path / "v2.nfl", tmp_path / "v2.from-v1.delta.nfl"
        build = timed(lambda: make_delta(base, new, full, delta, key=authority.key,
                                         version=2, hash_name="sha256"), 1)
        outs = iter(tmp_path / f"applied-{k}.nfl" for k in range(6))  # a new file each
        load_full = timed(lambda: open_bundle(full, trusted).close(), 3)
        apply = timed(lambda: apply_delta(base, delta, trusted, next(outs)), 3)
        apply_load = timed(lambda: open_bundle(apply_delta(base, delta, trusted, next(outs)),
                                               trusted).close(), 3)
    finally:
        base.close()
    out = tmp_path / "applied-5.nfl"
    assert out.read_bytes() == full.read_bytes()

    lists = netfilter.load_lists([netfilter.ListSource(out, [authority.public_path])])
    expressions, _, _ = _added(CHANGED)
    for k in (0, 1, CHANGED - 1):
        match = lists.check_url("http://" + expressions[k])
        assert match is not None and match.ref == f"NF-2027-{9_000_000 + k:07d}"
    for i in removed[:50]:
        match = lists.check_url(hit_url(spec, i))
        assert match is None or match.ref != f"NF-{2020 + i % 7}-{i % 10**7:07d}"
    kept = next(i for i in range(spec.entries) if i not in set(removed))
    assert lists.check_url(hit_url(spec, kept)) is not None

    full_bytes, delta_bytes = full.stat().st_size, delta.stat().st_size
    figures.time(TABLE, "open_bundle(full v2): verify", load_full, baseline=True,
                 unit="bundle")
    figures.time(TABLE, "apply_delta(v1 held, delta)", apply, unit="bundle",
                 note="verify delta, derive, checksum, member hashes, write")
    figures.time(TABLE, "apply_delta + open_bundle(result)", apply_load, unit="bundle")
    rows = f"{TABLE}: sizes"
    figures.row(rows, "full bundle v2", f"{full_bytes:,} bytes ({full_bytes / ENTRIES:.1f} "
                                        "B/entry)", full_bytes)
    figures.row(rows, "delta v1 -> v2", f"{delta_bytes:,} bytes = {delta_bytes / full_bytes:.2%}"
                                        f" of the full bundle ({full_bytes / delta_bytes:.0f}x "
                                        "smaller)", delta_bytes)
    figures.row(rows, "authority: make_delta", f"{build:.2f} s (diff, derive, write full + "
                                               "delta, sign)")
