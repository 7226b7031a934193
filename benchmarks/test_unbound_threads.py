"""Unbound with the netfilter plugin at num-threads 1 and 2, against Unbound with the
same names blocked as local zones at 1 and 2 threads; and the stall of a list swap
under load at 2 threads.

    .venv/bin/python -m pytest benchmarks/test_unbound_threads.py -q -s -p no:cacheprovider

Workload (dnsbench.make_workload): 1,000 blocked domains, 20,000 lines, 1% blocked, the
rest clean A/AAAA names that an upstream unbound (1 thread) serves from local data.
Two query files: that one ("mixed": after the warm-up pass 99% are cache hits, which
Unbound answers without asking any module), and its blocked lines alone ("blocked":
blocks are never cached, so every query runs the module in Python, under one GIL).

Servers: unbound + plugin and unbound with `redirect` local zones, each at num-threads
1 and 2 with `so-reuseport: yes` (one socket per thread; the kernel spreads client
sockets over them), so dnsperf runs with -c CLIENTS sockets. Each round runs the four
back to back (local zones then plugin, 1 thread then 2); ratios are pairwise within a
round, the figure is their median. Per-thread `num.queries` deltas (unbound-control
stats_noreset) show both threads worked. Reported: q/s, ratios, thread shares, the
server's and dnsperf's CPU (the machine has 2 cores for all of it).

Swap stall: plugin at 2 threads under dnsperf load (-Q SWAP_QPS), two probes in this
process asking one query at a time (a blocked name: the module; a cached clean name:
Unbound's cache, no Python), each answer's time kept. Bundles built beforehand are
renamed in place, SWAP_ROUNDS times: +1 entry (1,001), then a 1M-entry synthetic list
(each adds entries, so the plugin also flushes Unbound's cache); the figure is each
probe's longest gap between two answers in the SWAP_WINDOW seconds after the rename,
against the same in the SWAP_WINDOW seconds before it. A third probe asks the added
name, to show when each list came into force.

Timings are printed, never asserted; asserted: answers right before load, nothing lost,
only NOERROR, both threads served queries, no error in the servers' logs.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import dns.exception
import dns.rcode
import pytest
import yaml
from tests.test_unbound_threads import checkout_site

import dnsbench
from dnsbench import HOST, PerfResult, Server, Workload
from netfilter.keys import load_private_key
from netfilter.listfile import build_bundle
from synth import Spec, write_fast_bundle

pytestmark = pytest.mark.skipif(
    bool(dnsbench.missing_tools()),
    reason=f"{', '.join(dnsbench.missing_tools())} not installed")

SECONDS = 4  # per dnsperf run
PAIRS = int(os.environ.get("BENCH_THREADS_PAIRS", "5"))  # rounds of the four servers
CLIENTS = 16  # dnsperf -c: sockets, spread over the threads' sockets by the kernel
SWAP_QPS = 20_000  # dnsperf -Q during the swaps
SWAP_WINDOW = 4.0  # seconds before and after a rename that are compared
BIG_LIST = 1_000_000  # entries of the second swap's synthetic list
SWAP_ROUNDS = 2  # of the two swaps
NEW_ENTRY = "new-entry.example"  # the first swap's added entry (the upstream: NXDOMAIN)


@dataclass
class Bench:
    """A server under test and its remote control (per-thread stats)."""

    server: Server
    conf: Path
    threads: int
    runs: list[tuple[PerfResult, list[int]]] = field(default_factory=list)

    def stats(self) -> dict[str, int]:
        done = subprocess.run(["unbound-control", "-c", str(self.conf), "stats_noreset"],
                              capture_output=True, text=True, timeout=30, check=True)
        return {k: int(float(v)) for k, v in re.findall(r"^(\S+)=(\S+)$", done.stdout, re.M)}

    def per_thread(self) -> list[int]:
        stats = self.stats()
        return [stats[f"thread{t}.num.queries"] for t in range(self.threads)]


def _threaded(conf: str, threads: int, control_port: int) -> str:
    conf = conf.replace("  num-threads: 1\n", f"  num-threads: {threads}\n  so-reuseport: yes\n")
    return conf.replace("remote-control:\n  control-enable: no\n",
                        f"remote-control:\n  control-enable: yes\n  control-interface: {HOST}\n"
                        f"  control-port: {control_port}\n  control-use-cert: no\n")


def _bench(name: str, directory: Path, conf: str, port: int, threads: int,
           env: dict[str, str] | None = None) -> Bench:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.conf"
    path.write_text(_threaded(conf, threads, dnsbench.free_port()), encoding="utf-8")
    checked = subprocess.run(["unbound-checkconf", str(path)], capture_output=True, text=True,
                             timeout=60, check=False, env={**os.environ, **(env or {})})
    assert checked.returncode == 0, checked.stdout + checked.stderr
    server = Server(name, ["unbound", "-d", "-c", str(path)], port, directory, env or {})
    return Bench(server, path, threads)


def plugin_bench(workload: Workload, directory: Path, upstream_port: int, threads: int,
                 control: bool = False) -> Bench:
    """unbound + the plugin of this checkout; `control`: the plugin flushes through it."""
    directory.mkdir(parents=True, exist_ok=True)
    port = dnsbench.free_port()
    config = dnsbench.netfilter_config(workload, directory / "plugin-netfilter.yaml",
                                       listen_port=None, upstream_port=upstream_port)
    env = {"NETFILTER_CONFIG": str(config), "PYTHONPATH": dnsbench.SYSTEM_PYTHON_PACKAGES,
           "NETFILTER_SITE_PACKAGES": str(checkout_site(directory))}
    name = f"plugin-{threads}t"
    if control:
        env["NETFILTER_UNBOUND_CONTROL"] = shlex.join(
            ["unbound-control", "-c", str(directory / f"{name}.conf")])
    return _bench(name, directory, dnsbench.plugin_conf(directory, port, upstream_port),
                  port, threads, env)


def localzone_bench(workload: Workload, directory: Path, upstream_port: int,
                    threads: int) -> Bench:
    port = dnsbench.free_port()
    return _bench(f"localzone-{threads}t", directory,
                  dnsbench.localzone_conf(workload, directory, port, upstream_port), port,
                  threads)


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Workload:
    return dnsbench.make_workload(tmp_path_factory.mktemp("threads") / "workload")


@pytest.fixture(scope="module")
def blocked_queries(workload: Workload) -> Path:
    lines = [line for line in workload.queries.read_text().splitlines() if "blocked" in line]
    path = workload.directory / "blocked-queries.txt"
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


@pytest.fixture(scope="module")
def upstream(workload: Workload) -> Iterator[Server]:
    with dnsbench.unbound_upstream(workload, workload.directory.parent / "upstream") as up:
        yield up


@pytest.fixture(scope="module")
def servers(workload: Workload, upstream: Server) -> Iterator[dict[tuple[str, int], Bench]]:
    base = workload.directory.parent
    benches = {}
    for threads in (1, 2):
        benches["localzone", threads] = localzone_bench(workload, base / f"lz{threads}",
                                                        upstream.port, threads)
        benches["plugin", threads] = plugin_bench(workload, base / f"pl{threads}",
                                                  upstream.port, threads)
    started: list[Bench] = []
    try:
        for bench in benches.values():
            bench.server.start()
            started.append(bench)
            problems = dnsbench.sanity_problems(bench.server.port, workload, filtering=True)
            assert not problems, f"{bench.server.name}: {problems}\n{bench.server.log()}"
            dnsbench.run_dnsperf(bench.server, workload.queries, seconds=20, runs=1,
                                 clients=CLIENTS)  # warm: one pass of the file
        yield benches
    finally:
        for bench in started:
            bench.server.stop()
    for bench in started:
        problems = dnsbench.stderr_problems(bench.server)
        assert not problems, f"{bench.server.name}: " + "\n".join(problems[:20])


def _run(bench: Bench, queries: Path) -> tuple[PerfResult, list[int]]:
    before = bench.per_thread()
    result = dnsbench.run_dnsperf(bench.server, queries, seconds=SECONDS, clients=CLIENTS)
    shares = [b - a for a, b in zip(before, bench.per_thread(), strict=True)]
    assert bench.server.alive(), bench.server.log()
    return result, shares


def _line(name: str, runs: list[tuple[PerfResult, list[int]]]) -> str:
    qps = [r.qps for r, _ in runs]
    split = [statistics.median(s[t] / max(1, sum(s)) for _, s in runs)
             for t in range(len(runs[0][1]))]
    return (f"{name:13} median {statistics.median(qps):>9,.0f} q/s (runs "
            f"{', '.join(f'{q:,.0f}' for q in qps)}); threads {'/'.join(f'{x:.0%}' for x in split)}"
            f"; cpu server {statistics.median(r.server_cpu for r, _ in runs):.2f}, dnsperf "
            f"{statistics.median(r.client_cpu for r, _ in runs):.2f} cores; lost "
            f"{sum(r.lost for r, _ in runs)}")


def _ratios(label: str, a: list[tuple[PerfResult, list[int]]],
            b: list[tuple[PerfResult, list[int]]]) -> str:
    pairs = [y.qps / x.qps for (x, _), (y, _) in zip(a, b, strict=True)]
    return (f"{label}: median of pairwise ratios {statistics.median(pairs):.1%} "
            f"({', '.join(f'{p:.0%}' for p in pairs)})")


@pytest.mark.parametrize("file", ["mixed", "blocked"])
def test_threads(file: str, workload: Workload, blocked_queries: Path,
                 servers: dict[tuple[str, int], Bench]) -> None:
    queries = workload.queries if file == "mixed" else blocked_queries
    print(f"\n{file} queries ({queries.name}), dnsperf -c {CLIENTS} -l {SECONDS}, {PAIRS} "
          f"rounds of localzone-1t, plugin-1t, localzone-2t, plugin-2t "
          f"(load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)")
    runs: dict[tuple[str, int], list[tuple[PerfResult, list[int]]]] = {k: [] for k in servers}
    for _ in range(PAIRS):
        for threads in (1, 2):
            for kind in ("localzone", "plugin"):
                runs[kind, threads].append(_run(servers[kind, threads], queries))
    for (kind, threads), got in runs.items():
        print(_line(f"{kind}-{threads}t", got))
    for threads in (1, 2):
        print(_ratios(f"plugin / localzone at {threads} thread(s)", runs["localzone", threads],
                      runs["plugin", threads]))
    for kind in ("localzone", "plugin"):
        print(_ratios(f"{kind}: 2 threads / 1 thread", runs[kind, 1], runs[kind, 2]))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for (_kind, threads), got in runs.items():
        assert all(r.lost == 0 and set(r.rcodes) == {"NOERROR"} for r, _ in got), got
        if threads == 2:  # both threads answered in every run
            assert all(min(shares) > 0 for _, shares in got), [s for _, s in got]


# ---------------------------------------------------------------- the swap stall


class Probe(threading.Thread):
    """One query at a time for one name; the time of every answer (and of losses)."""

    def __init__(self, port: int, name: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.name, self.stop = port, name, stop
        self.answered: list[float] = []
        self.said: list[str] = []  # per answer: its first address, else its rcode
        self.lost = 0

    def run(self) -> None:
        deadline = time.monotonic() + 120  # bounded, whatever happens to `stop`
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                answer = dnsbench.ask(self.port, self.name, timeout=2.0)
            except (dns.exception.DNSException, OSError):
                self.lost += 1
                continue
            self.answered.append(time.monotonic())
            self.said.append(answer.answer[0][0].to_text() if answer.answer
                             else dns.rcode.to_text(answer.rcode()))

    def gap(self, start: float, end: float) -> float:
        """The longest time without an answer within [start, end]."""
        times = [start, *(t for t in self.answered if start < t < end), end]
        return max(b - a for a, b in itertools.pairwise(times))

    def changed(self, at: float, until: float) -> str:
        """When, in (at, until), the answer first differed from the last one before."""
        before = [s for t, s in zip(self.answered, self.said, strict=True) if t < at]
        for t, said in zip(self.answered, self.said, strict=True):
            if at < t < until and before and said != before[-1]:
                return f"{before[-1]} -> {said} at +{(t - at) * 1000:,.0f} ms"
        return "unchanged"


def _build_plus(workload: Workload, bundle: Path, version: int, domain: str) -> Path:
    """Version `version` of the bench list with one more entry, beside `bundle`: built
    before the load, so that the swap is a rename (a build here would hold this
    process's GIL and stall the probes, not the server)."""
    source = yaml.safe_load((workload.directory / "bench-source.yaml").read_text())
    source["entries"].append({"domain": domain, "ref": "BENCH-NEW", "category": "benchmark"})
    src = bundle.with_name(f"v{version}.yaml")
    src.write_text(yaml.safe_dump(source, sort_keys=False), encoding="utf-8")
    staged = bundle.with_name(f"v{version}.nfl")
    build_bundle(src, staged, key=load_private_key(workload.directory / "authority.key"),
                 list_id="dns-bench", version=version)
    return staged


def test_swap_stall_at_two_threads(workload: Workload, upstream: Server) -> None:
    own = replace(workload, bundle=workload.directory.parent / "swap" / "bench.nfl")
    own.bundle.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(workload.bundle, own.bundle)
    key = load_private_key(workload.directory / "authority.key")
    staged: list[tuple[str, Path]] = []
    for version in range(2, 2 + 2 * SWAP_ROUNDS, 2):  # versions only grow (the floor)
        staged.append(("+1 entry (1,001)", _build_plus(own, own.bundle, version, NEW_ENTRY)))
        big = own.bundle.with_name(f"big{version + 1}.nfl")
        write_fast_bundle(Spec(BIG_LIST, url_share=0.0, list_id="dns-bench",
                               version=version + 1), big, key)
        staged.append((f"synthetic {BIG_LIST:,} entries", big))
    bench = plugin_bench(own, own.bundle.parent / "plugin", upstream.port, 2, control=True)
    blocked, (clean, _) = workload.blocked_sample, workload.clean_sample
    with bench.server:
        dnsbench.run_dnsperf(bench.server, workload.queries, seconds=20, runs=1,
                             clients=CLIENTS)
        seconds = len(staged) * 2 * SWAP_WINDOW + SWAP_WINDOW + 6
        load = subprocess.Popen(
            ["dnsperf", "-s", HOST, "-p", str(bench.server.port), "-d", str(workload.queries),
             "-c", str(CLIENTS), "-Q", str(SWAP_QPS), "-t", "5", "-l", f"{seconds:g}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        stop = threading.Event()
        probes = [Probe(bench.server.port, blocked, stop), Probe(bench.server.port, clean, stop),
                  Probe(bench.server.port, NEW_ENTRY, stop)]
        for probe in probes:
            probe.start()
        swaps: list[tuple[str, float]] = []
        try:
            time.sleep(SWAP_WINDOW + 1)
            for label, path in staged:
                swaps.append((label, time.monotonic()))
                os.replace(path, own.bundle)
                time.sleep(2 * SWAP_WINDOW)
        finally:
            stop.set()
            for probe in probes:
                probe.join(timeout=10)
            output, _ = load.communicate(timeout=seconds + 40)
        perf = dnsbench.parse_dnsperf(bench.server.name, output)
        reloads = bench.server.log()
    print(f"\nswap stall, plugin at 2 threads, dnsperf -c {CLIENTS} -Q {SWAP_QPS:,} "
          f"(load average {os.getloadavg()[0]:.2f}): dnsperf {perf.qps:,.0f} q/s, lost "
          f"{perf.lost}, rcodes {perf.rcodes}")
    for label, at in swaps:
        cells = []
        for probe, what in zip(probes[:2], ("blocked name (module)", "cached clean name"),
                               strict=True):
            before = probe.gap(at - SWAP_WINDOW, at)
            after = probe.gap(at, at + SWAP_WINDOW)
            cells.append(f"{what}: longest gap {after * 1000:,.0f} ms after the rename vs "
                         f"{before * 1000:,.0f} ms before")
        print(f"  swap to {label}: " + "; ".join(cells))
        changes = [f"{p.name} {p.changed(at, at + 2 * SWAP_WINDOW)}" for p in probes]
        print(f"    answers changed: {'; '.join(changes)}")
    print(f"  probe answers {[len(p.answered) for p in probes]}, lost "
          f"{[p.lost for p in probes]}")
    assert perf.lost == 0 and all(p.lost == 0 for p in probes)
    assert not dnsbench.stderr_problems(bench.server), reloads
