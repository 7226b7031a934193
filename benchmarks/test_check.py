"""check_url / check_host throughput on a 200k-entry list, against the baseline.

Baseline (see baseline.py): per expression of the URL, hashlib SHA-256, pybloom-live,
then a set, stopping at the first hit; check_host: hashlib + set over host_expressions.
Both sides canonicalize with netfilter.canonical.

Workloads of 20,000 URLs: "clean" (no URL on a listed host) and "mix" (1% blocked, 10% on
hosts of the host index, the rest clean), all built by synth.py from reserved names.

`test_where_the_time_goes` times the parts of a clean-URL check_url and of check_host
(canonicalization, suffixes, one SHA-256 per suffix, a probe per suffix) in the same
run, so the figures section shows how far netfilter is from the hashing floor.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import pytest

from baseline import PybloomBaseline
from netfilter.canonical import canonical_parts, expressions, host_suffixes, name_suffixes
from support import Figures, LoadedList, best_of
from synth import Query, host_queries, near_miss_urls, url_queries

BATCH = 20_000
IMPLS = ("pybloom-live baseline", "netfilter")
COMPONENT_ROUNDS = 7


@pytest.fixture(scope="module")
def checkers(list200k: LoadedList) -> dict[str, SimpleNamespace]:
    """name -> (check_url, check_host), each returning a truthy value when blocked."""
    baseline = PybloomBaseline(list200k.lists.bundles[0].array("digests.bin"))
    out = {"pybloom-live baseline": SimpleNamespace(url=baseline.check_url,
                                                     host=baseline.check_host)}
    lists = list200k.lists
    out["netfilter"] = SimpleNamespace(url=lists.check_url, host=lists.check_host)
    return out


@pytest.fixture(scope="module")
def workloads(list200k: LoadedList) -> dict[str, list[Query]]:
    spec = list200k.spec
    return {
        "mix": url_queries(spec, BATCH, seed=1),
        "clean": url_queries(spec, BATCH, hit_share=0, indexed_share=0, seed=2),
        "hosts": host_queries(spec, BATCH, seed=3),
    }


def test_workload_shape(workloads: dict[str, list[Query]]) -> None:
    kinds = [q.kind for q in workloads["mix"]]
    assert kinds.count("hit") == BATCH // 100
    assert kinds.count("indexed") == BATCH // 10
    assert all(q.kind == "clean" for q in workloads["clean"])


@pytest.mark.parametrize("workload", ["mix", "clean"])
def test_url_verdicts_agree(workload: str, workloads: dict[str, list[Query]],
                            checkers: dict[str, SimpleNamespace],
                            list200k: LoadedList) -> None:
    """Baseline, netfilter and the generator's ground truth agree on all 20,000 URLs."""
    lists = list200k.lists
    for q in workloads[workload]:
        base = checkers["pybloom-live baseline"].url(q.url)
        match = lists.check_url(q.url)
        assert (base is not None) == q.blocked, q
        assert (match is not None) == q.blocked, q
        if match is not None:
            assert match.blocks and match.ref == q.ref, (q, match)
            assert match.expression in expressions(q.url)


def test_near_misses_pass(checkers: dict[str, SimpleNamespace], list200k: LoadedList) -> None:
    """URLs shaped exactly like entries but not listed are never blocked."""
    for url in near_miss_urls(list200k.spec, 5_000):
        assert list200k.lists.check_url(url) is None, url
        assert checkers["pybloom-live baseline"].url(url) is None, url


def test_host_verdicts_agree(workloads: dict[str, list[Query]],
                             checkers: dict[str, SimpleNamespace],
                             list200k: LoadedList) -> None:
    lists = list200k.lists
    for q in workloads["hosts"]:
        match = lists.check_host(q.url)
        assert (checkers["pybloom-live baseline"].host(q.url) is not None) == q.blocked, q
        assert (match is not None) == q.blocked, q
        if match is not None:
            assert match.ref == q.ref
        assert lists.host_has_url_entries(q.url) == (q.kind == "indexed"), q


def _run(check: Callable[[str], Any], items: list[str]) -> int:
    blocked = 0
    for item in items:
        if check(item) is not None:
            blocked += 1
    return blocked


@pytest.mark.parametrize("workload", ["clean", "mix"])
@pytest.mark.parametrize("name", IMPLS)
def test_check_url(benchmark: Any, name: str, workload: str,
                   checkers: dict[str, SimpleNamespace],
                   workloads: dict[str, list[Query]], figures: Figures) -> None:
    """check_url over 20,000 URLs per round."""
    benchmark.group = f"check_url-{workload}"
    urls = [q.url for q in workloads[workload]]
    expected = sum(q.blocked for q in workloads[workload])
    rounds = 5 if name.startswith("pybloom") else 10
    blocked = benchmark.pedantic(_run, args=(checkers[name].url, urls), rounds=rounds,
                                 warmup_rounds=1)
    assert blocked == expected
    per = best_of(benchmark, len(urls))
    table = f"check_url, {workload} URLs, 200k entries"
    if per is not None:
        figures.time(table, name, per, baseline=name.startswith("pybloom"), unit="URL")
    if name == "netfilter" and workload == "clean":
        figures.target(">= 200,000 clean-URL check_url per second", table, name, "rate",
                       200_000)
        figures.target(">= 8x the pybloom-live baseline (clean URLs)", table, name, "ratio", 8)


@pytest.mark.parametrize("name", IMPLS)
def test_check_host(benchmark: Any, name: str, checkers: dict[str, SimpleNamespace],
                    workloads: dict[str, list[Query]], figures: Figures) -> None:
    """check_host over 20,000 DNS names per round (1% blocked, 10% indexed hosts)."""
    benchmark.group = "check_host"
    names = [q.url for q in workloads["hosts"]]
    expected = sum(q.blocked for q in workloads["hosts"])
    blocked = benchmark.pedantic(_run, args=(checkers[name].host, names), rounds=10,
                                 warmup_rounds=1)
    assert blocked == expected
    per = best_of(benchmark, len(names))
    table = "check_host, DNS names, 200k entries"
    if per is not None:
        figures.time(table, name.replace("pybloom-live baseline", "hashlib+set baseline"),
                     per, baseline=name.startswith("pybloom"), unit="name")
    if name == "netfilter":
        figures.target(">= 400,000 check_host per second", table, name, "rate", 400_000)


def _fastest(stages: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Fastest of `rounds` wall-clock runs of each stage, stages interleaved per round."""
    best = dict.fromkeys(stages, float("inf"))
    for _ in range(rounds):
        for name, fn in stages.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def test_where_the_time_goes(list200k: LoadedList, checkers: dict[str, SimpleNamespace],
                             workloads: dict[str, list[Query]], figures: Figures) -> None:
    """Cumulative parts of a clean-URL check_url and of check_host, against the hashing floor.

    The floor is the work no lookup structure can save: canonicalize, then one SHA-256
    of `host/` per host suffix. "+ probe" adds `BlockedBloom.contains` per suffix as a
    call (the matcher inlines the same arithmetic); "+ set" adds the baseline's `in set`.
    """
    lists = list200k.lists
    contains = lists.blocking[0].bloom.contains
    members = checkers["pybloom-live baseline"].host.__self__.members
    urls = [q.url for q in workloads["clean"]]
    names = [q.url for q in workloads["hosts"]]
    sha256 = hashlib.sha256
    check_url, check_host = lists.check_url, lists.check_host

    def canonical() -> None:
        for url in urls:
            canonical_parts(url)

    def suffixes() -> None:
        for url in urls:
            host_suffixes(canonical_parts(url)[0])

    def url_floor() -> None:
        for url in urls:
            for suffix in host_suffixes(canonical_parts(url)[0]):
                sha256((suffix + "/").encode()).digest()

    def url_probe() -> None:
        for url in urls:
            for suffix in host_suffixes(canonical_parts(url)[0]):
                contains(sha256((suffix + "/").encode()).digest())

    def netfilter_url() -> None:
        for url in urls:
            check_url(url)

    def names_only() -> None:
        for name in names:
            name_suffixes(name)

    def host_floor() -> None:
        for name in names:
            for suffix in name_suffixes(name):
                sha256((suffix + "/").encode()).digest()

    def host_set() -> None:
        for name in names:
            for suffix in name_suffixes(name):
                if sha256((suffix + "/").encode()).digest() in members:
                    break

    def host_probe() -> None:
        for name in names:
            for suffix in name_suffixes(name):
                contains(sha256((suffix + "/").encode()).digest())

    def netfilter_host() -> None:
        for name in names:
            check_host(name)

    url_stages = {
        "canonical_parts": canonical,
        "+ host_suffixes": suffixes,
        "+ SHA-256 of host/ per suffix (floor)": url_floor,
        "+ BlockedBloom.contains per suffix": url_probe,
        "netfilter check_url": netfilter_url,
    }
    host_stages = {
        "name_suffixes": names_only,
        "+ SHA-256 of host/ per suffix (floor)": host_floor,
        "+ `in set` per suffix (the baseline's way)": host_set,
        "+ BlockedBloom.contains per suffix": host_probe,
        "netfilter check_host": netfilter_host,
    }
    url_suffixes = sum(len(host_suffixes(canonical_parts(u)[0])) for u in urls) / len(urls)
    name_count = sum(len(name_suffixes(n)) for n in names) / len(names)
    for table, stages, items, unit, per_item in (
            ("where a clean check_url goes, 200k entries", url_stages, urls, "URL", url_suffixes),
            ("where check_host goes, 200k entries", host_stages, names, "name", name_count)):
        best = _fastest(stages, COMPONENT_ROUNDS)
        floor = best["+ SHA-256 of host/ per suffix (floor)"] / len(items)
        for name, seconds in best.items():
            per = seconds / len(items)
            note = (f"{per_item:.2f} suffixes per {unit}" if "floor" in name
                    else f"{(per - floor) * 1e6:+.2f} us vs the floor")
            figures.time(table, name, per, baseline="floor" in name, unit=unit, note=note)
