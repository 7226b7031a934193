"""Resident memory per entry, page cache, and load time at 1M and 10M entries (slow).

Each measurement runs in a fresh interpreter (loadchild.py) so nothing of this process
is counted. The child imports everything and loads a tiny bundle first (imports and
fixed tables are not per-entry costs), reads VmRSS/RssAnon/RssFile from
/proc/self/status, loads the big bundle with `load_lists`, reads them again, runs
checks (1% hits, 10% indexed hosts, near misses, DNS names) and reads them a third time.

What is counted as the process's memory: RssAnon is the heap (Bloom filter words,
prefix index, Python objects); RssFile stays ~0 per entry, since bundles are no longer
memory-mapped: look-ups pread the bundle's bytes on demand. Those bytes live in the
page cache, shared and reclaimable, outside the RSS: `load_lists` writes a private copy
of the bundle (so that copy is fully cached right after a load) and the kernel may drop
what is not read. The report shows, apart from the RSS, how much of that copy is cached
after the checks (mincore), and the bundle's size per entry as the upper bound of the
page cache it can occupy. On a tmpfs temporary directory the copy would be shared
memory instead (not reclaimable without swap); the report names the file system.

Load time: `load_lists` wall time (private copy, tar index, signature, SHA-256 and
order/range checks of every member in one streaming pass, prefix index, Bloom filter),
against the floor of reading the same file and SHA-256-ing it once in the same
process, page cache warm for both.
"""

from __future__ import annotations

import json
import pstats
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support import BigBundles, Figures
from synth import Spec, host_queries, near_miss_urls, url_queries, write_fast_bundle

CHILD = Path(__file__).with_name("loadchild.py")
SIZES = [pytest.param(1_000_000, id="1M"), pytest.param(10_000_000, id="10M")]
MiB = 1 << 20


@pytest.fixture(scope="module")
def warm_bundle(big_bundles: BigBundles) -> Path:
    path = big_bundles.directory / "warm.nfl"
    write_fast_bundle(Spec(100, list_id="warm"), path, big_bundles.authority.key)
    return path


def run_child(cfg: dict[str, Any], directory: Path) -> dict[str, Any]:
    cfg_path = directory / "child.json"
    cfg_path.write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, str(CHILD), str(cfg_path)], capture_output=True,
                          text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _data_bytes(path: Path) -> int:
    """Bytes of the bundle's data members (everything but the tar headers and manifest)."""
    import tarfile

    with tarfile.open(path) as tar:
        return sum(m.size for m in tar.getmembers()
                   if m.name in ("digests.bin", "entries.bin", "refs.txt", "hosts.bin"))


@pytest.mark.slow
@pytest.mark.parametrize("entries", SIZES)
def test_memory_and_load(entries: int, big_bundles: BigBundles, warm_bundle: Path,
                         figures: Figures, tmp_path: Path) -> None:
    spec, path = big_bundles.get(entries)
    mix = url_queries(spec, 20_000, seed=21)
    urls = [[q.url, q.ref] for q in mix if q.kind != "clean"]
    urls += [[u, None] for u in near_miss_urls(spec, 500, seed=22)]
    hosts = [[q.url, q.ref] for q in host_queries(spec, 5_000, seed=23)]
    indexed = [q.kind == "indexed" for q in host_queries(spec, 5_000, seed=23)]
    clean = [q.url for q in url_queries(spec, 20_000, hit_share=0, indexed_share=0, seed=24)]
    result = run_child({
        "mode": "load", "bundle": str(path), "pub": str(big_bundles.authority.public_path),
        "warm_bundle": str(warm_bundle), "urls": urls, "hosts": hosts, "clean_urls": clean,
    }, tmp_path)

    # correctness after loading: known entries match with their reference, others do not
    assert result["entries"] == entries
    assert result["url_refs"] == [r for _, r in urls]
    assert result["host_refs"] == [r for _, r in hosts]
    assert result["host_indexed"] == indexed
    assert sum(r is not None for _, r in urls) >= 150

    label = f"{entries // 1_000_000}M"
    before, loaded, checked = result["before"], result["after_load"], result["after_checks"]

    def per_entry(after: dict[str, int], key: str) -> float:
        return float(after[key] - before[key]) / entries

    data = _data_bytes(path)
    size = path.stat().st_size / MiB
    table = f"resident memory per entry, {label} entries (bundle {size:,.0f} MiB)"
    for name, after in (("after load_lists", loaded), ("after 25k checks", checked)):
        figures.row(table, name,
                    f"RSS +{per_entry(after, 'VmRSS'):.1f} B/entry "
                    f"(heap/RssAnon {per_entry(after, 'RssAnon'):.1f} + file-backed/RssFile "
                    f"{per_entry(after, 'RssFile'):.1f} + shmem "
                    f"{per_entry(after, 'RssShmem'):.1f}); "
                    f"total +{(after['VmRSS'] - before['VmRSS']) / MiB:,.0f} MiB",
                    value=per_entry(after, "VmRSS"))
    trimmed = result.get("after_trim")
    if trimmed is not None:
        figures.row(table, "after malloc_trim(0) (info)",
                    f"heap {per_entry(trimmed, 'RssAnon'):.1f} B/entry (load_lists already "
                    "trims, so this matches the rows above)")
    figures.row(table, "peak RSS of the process (VmHWM)",
                f"{checked['VmHWM'] / MiB:,.0f} MiB (baseline before load "
                f"{before['VmRSS'] / MiB:,.0f} MiB)")
    cache = result["page_cache"]
    fs = cache["tempdir_fs"]
    kind = ("SHARED MEMORY (tmpfs): not reclaimable without swap" if fs == "tmpfs"
            else "page cache: shared, reclaimable")
    where = f"private copy in {cache['tempdir']} ({fs})"
    if cache["copy_cached"] is not None:
        figures.row(table, "bundle copy cached now (NOT RSS)",
                    f"{cache['copy_cached'] / entries:.1f} B/entry = "
                    f"{cache['copy_cached'] / MiB:,.0f} MiB of the {where}; {kind}")
    figures.row(table, "bundle page cache, upper bound",
                f"{cache['copy_size'] / entries:.1f} B/entry = the bundle file (data "
                f"{data / entries:.1f}: digests 32, records 8, refs 15, hosts "
                f"{spec.n_hosts * 32 / entries:.1f}); read with pread only on Bloom positives")
    if cache["original_cached"] is not None:
        figures.row(table, "original bundle file cached (info)",
                    f"{cache['original_cached'] / entries:.1f} B/entry (read by the load's "
                    "copy and by this benchmark; not read again by the matcher)")
    probe_growth = per_entry(result["after_mincore"], "VmRSS") - per_entry(checked, "VmRSS")
    assert abs(probe_growth) < 0.5, "the page-cache probe must not fault pages in"
    figures.target(f"<= 48 B/entry resident at {label} (process RSS; "
                   "page cache apart)", table, "after 25k checks", "max", 48)

    load_table = f"load, {label} entries"
    figures.time(load_table, "read + SHA-256 of the file (floor)", result["floor_seconds"],
                 baseline=True, unit="load")
    figures.time(load_table, "load_lists (verify + build)", result["load_seconds"], unit="load",
                 note=f"{result['load_seconds'] / result['floor_seconds']:.1f}x the floor")
    if entries >= 10_000_000:
        figures.target(f"<= 6 s to verify and load {label} entries", load_table,
                       "load_lists (verify + build)", "seconds", 6)
    check_table = f"check_url, clean URLs, {label} entries"
    figures.time(check_table, "hashing floor (canonicalize + SHA-256 per suffix)",
                 result["clean_floor_seconds"], baseline=True, unit="URL")
    figures.time(check_table, "netfilter check_url", result["clean_check_seconds"], unit="URL")


@pytest.mark.slow
def test_load_profile(big_bundles: BigBundles, warm_bundle: Path, figures: Figures,
                      tmp_path: Path) -> None:
    """Where the 10M load spends its time: open_bundle vs ListMatcher, top functions."""
    _, path = big_bundles.get(10_000_000)
    profile_out = tmp_path / "load.prof"
    result = run_child({
        "mode": "profile", "bundle": str(path), "pub": str(big_bundles.authority.public_path),
        "warm_bundle": str(warm_bundle), "profile_out": str(profile_out),
    }, tmp_path)
    table = "load profile, 10M entries (cProfile on, so slower than unprofiled)"
    figures.row(table, "open_bundle (copy, verify)", f"{result['open_bundle']:.2f} s")
    figures.row(table, "ListMatcher.from_bundle", f"{result['matcher']:.2f} s")
    stats = pstats.Stats(str(profile_out))
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    for (filename, line, function), (_, calls, tottime, *_rest) in rows[:8]:
        where = f"{Path(filename).name}:{line}({function})" if line else function
        figures.row(table, f"  {tottime:6.2f} s self", f"{where}  [{calls} calls]")
