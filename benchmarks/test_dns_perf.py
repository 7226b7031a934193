"""DNS throughput with dnsperf: netfilter's forwarder and its Unbound plugin, on loopback.

    .venv/bin/python -m pytest benchmarks/test_dns_perf.py -q -m slow -s

Workload (dnsbench.make_workload): a signed list of 1,000 domains `blocked<i>.example`
built with the real tools, and a 20,000-line query file, 1% under blocked domains, the
rest A/AAAA of clean names that the upstream unbound serves from local data.

(a) dnsperf straight to the upstream vs through `netfilter serve dns` (same file),
    alternated, medians; in the same rotation, for reference, netfilter with its
    Python listener (NETFILTER_DNS_PYTHON=1, what runs without the C extension) and a
    bare uvloop forwarder (bare_forwarder.py: forwarding alone, no filtering);
(b) 30 s through netfilter at 80% of its measured max: no query may be lost;
(c) unbound + the netfilter plugin vs unbound with the same names as `redirect` local
    zones, alternated, medians.

Timing ratios are reported (figures table, stdout), never asserted: the 2-core machine
is shared by dnsperf, the servers and whatever else runs. Asserted: the servers answer
blocked and clean names correctly, every blocked query under load produced exactly one
block event and no others did, nothing is lost at 80%, and no server logs an error.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

import dnsbench
from dnsbench import PerfResult, Server, Workload
from support import Figures

pytestmark = pytest.mark.skipif(
    bool(dnsbench.missing_tools()),
    reason=f"{', '.join(dnsbench.missing_tools())} not installed (Debian: apt-get install "
           "dnsperf unbound python3-unbound); the DNS throughput benchmarks drive them")

SECONDS = 5  # per measured run
PAIRS = 5  # alternations: A, B, A, B, ... (5 runs of each)
SUSTAINED_SECONDS = 30
SUSTAINED_SHARE = 0.80
FORWARDER_TARGET = 0.45  # netfilter >= 45% of the upstream's direct q/s
PLUGIN_TARGET = 0.60  # plugin >= 60% of the local-zone baseline
FORWARDER_TABLE = "DNS: dnsperf straight to the upstream unbound vs through netfilter"
PLUGIN_TABLE = "DNS: unbound + netfilter plugin vs unbound with local-zone blocks"
SUSTAINED_TABLE = f"DNS: netfilter at {SUSTAINED_SHARE:.0%} of its max for {SUSTAINED_SECONDS} s"


# ---------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dns-perf")


@pytest.fixture(scope="module")
def workload(bench_dir: Path) -> Workload:
    return dnsbench.make_workload(bench_dir / "workload")


def _serve(server: Server, workload: Workload, *, filtering: bool) -> Iterator[Server]:
    with server:
        problems = dnsbench.sanity_problems(server.port, workload, filtering=filtering)
        assert not problems, (f"{server.name} answers wrongly before any load: {problems}\n"
                              f"its stderr:\n{server.log()}")
        yield server
    log = server.log().splitlines()
    events = (f", {dnsbench.count_blocks(server.audit):,} block events"
              if server.audit else "")
    print(f"\n{server.name} exited {server.proc.returncode if server.proc else None}"
          f"{events}; stderr: {len(log)} lines", *log[-6:], sep="\n  ")


@pytest.fixture(scope="module")
def upstream(workload: Workload, bench_dir: Path) -> Iterator[Server]:
    yield from _serve(dnsbench.unbound_upstream(workload, bench_dir / "upstream"), workload,
                      filtering=False)


@pytest.fixture(scope="module")
def netfilter_dns(workload: Workload, bench_dir: Path, upstream: Server) -> Iterator[Server]:
    yield from _serve(dnsbench.netfilter_server(workload, bench_dir / "netfilter",
                                                upstream.port), workload, filtering=True)


@pytest.fixture(scope="module")
def netfilter_python(workload: Workload, bench_dir: Path, upstream: Server) -> Iterator[Server]:
    yield from _serve(dnsbench.netfilter_server(workload, bench_dir / "netfilter-python",
                                                upstream.port, python_listener=True),
                      workload, filtering=True)


@pytest.fixture(scope="module")
def bare(bench_dir: Path, upstream: Server, workload: Workload) -> Iterator[Server]:
    yield from _serve(dnsbench.bare_forwarder(bench_dir / "bare", upstream.port), workload,
                      filtering=False)


@pytest.fixture(scope="module")
def plugin(workload: Workload, bench_dir: Path, upstream: Server) -> Iterator[Server]:
    yield from _serve(dnsbench.unbound_plugin(workload, bench_dir / "plugin", upstream.port),
                      workload, filtering=True)


@pytest.fixture(scope="module")
def localzone(workload: Workload, bench_dir: Path, upstream: Server) -> Iterator[Server]:
    yield from _serve(dnsbench.unbound_localzone(workload, bench_dir / "localzone",
                                                 upstream.port), workload, filtering=True)


# ---------------------------------------------------------------- measuring


def _perf(server: Server, workload: Workload, *, seconds: float,
          max_qps: int = 300_000) -> PerfResult:
    """One dnsperf run; for a filtering server, also check its block events."""
    before = dnsbench.count_blocks(server.audit) if server.audit else 0
    result = dnsbench.run_dnsperf(server, workload.queries, seconds=seconds, max_qps=max_qps)
    print(f"  {_describe(result)}", flush=True)
    assert server.alive(), f"{server.name} died under load; its stderr:\n{server.log()}"
    if server.audit is not None:
        want = dnsbench.expected_blocks(workload, result.sent)
        blocks = dnsbench.settled_blocks(server.audit, before + want) - before
        print(f"  {'':18} block events {blocks:,}, blocked queries sent {want:,}")
        # dnsperf reads the file in order; its 4 clients may leave the last few in flight.
        assert abs(blocks - want) <= 4 + result.lost, (
            f"{server.name}: {blocks} block events for {result.sent} queries sent, "
            f"{want} of them under blocked domains")
    return result


def _describe(r: PerfResult) -> str:
    rcodes = " ".join(f"{k} {v}" for k, v in r.rcodes.items())
    return (f"{r.server:18} {r.qps:>9,.0f} q/s  sent {r.sent:,}  lost {r.lost}  "
            f"[{rcodes}]  cpu: server {r.server_cpu:.2f}, dnsperf {r.client_cpu:.2f} cores")


def _rotate(servers: list[Server], workload: Workload) -> list[list[PerfResult]]:
    """Warm each up with one pass of the file, then A, B, ..., A, B, ... (PAIRS rounds)."""
    for server in servers:
        dnsbench.run_dnsperf(server, workload.queries, seconds=20, runs=1)
    runs: list[list[PerfResult]] = [[] for _ in servers]
    for _ in range(PAIRS):
        for server, results in zip(servers, runs, strict=True):
            results.append(_perf(server, workload, seconds=SECONDS))
    return runs


def _alternate(a: Server, b: Server, workload: Workload) -> tuple[list[PerfResult],
                                                                 list[PerfResult]]:
    runs_a, runs_b = _rotate([a, b], workload)
    return runs_a, runs_b


def _median(runs: list[PerfResult]) -> float:
    return statistics.median(r.qps for r in runs)


def _summary(label: str, base: list[PerfResult], other: list[PerfResult],
             target: float | None) -> tuple[float, list[str]]:
    """Medians and ratios; `target` None for a reference figure (no verdict)."""
    ratio = _median(other) / _median(base)
    pair_ratios = [o.qps / b.qps for b, o in zip(base, other, strict=True)]
    verdict = ("(a reference, no target)" if target is None else
               f"target >= {target:.0%}: {'PASS' if ratio >= target else 'FAIL'}")
    lines = [
        f"{base[0].server}: median {_median(base):,.0f} q/s "
        f"(runs {', '.join(f'{r.qps:,.0f}' for r in base)}), "
        f"server cpu {statistics.median(r.server_cpu for r in base):.2f} cores",
        f"{other[0].server}: median {_median(other):,.0f} q/s "
        f"(runs {', '.join(f'{r.qps:,.0f}' for r in other)}), "
        f"server cpu {statistics.median(r.server_cpu for r in other):.2f} cores",
        f"{label}: {ratio:.1%} of {base[0].server} (pairwise "
        f"{', '.join(f'{x:.1%}' for x in pair_ratios)}); {verdict}",
        f"lost: {sum(r.lost for r in base)} / {sum(r.lost for r in other)}",
    ]
    return ratio, lines


def _no_errors(*servers: Server) -> None:
    for server in servers:
        problems = dnsbench.stderr_problems(server)
        assert not problems, f"{server.name} logged errors:\n" + "\n".join(problems[:20])


def _record(figures: Figures, table: str, base: list[PerfResult], other: list[PerfResult],
            base_name: str, other_name: str) -> None:
    figures.time(table, base_name, 1 / _median(base), baseline=True, unit="query",
                 note=f"median of {len(base)} x {SECONDS} s")
    figures.time(table, other_name, 1 / _median(other), unit="query",
                 note=f"median of {len(other)} x {SECONDS} s")


@pytest.fixture(scope="module")
def rotation(upstream: Server, netfilter_dns: Server, netfilter_python: Server, bare: Server,
             workload: Workload) -> list[list[PerfResult]]:
    print(f"\n(a) dnsperf -c 4 -l {SECONDS}: upstream direct, netfilter (C relay), netfilter "
          f"(Python listener), a bare uvloop forwarder, in rotation "
          f"(load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)")
    return _rotate([upstream, netfilter_dns, netfilter_python, bare], workload)


@pytest.fixture(scope="module")
def forwarder_runs(rotation: list[list[PerfResult]]) -> tuple[list[PerfResult],
                                                               list[PerfResult]]:
    return rotation[0], rotation[1]


# ---------------------------------------------------------------- the benchmarks


@pytest.mark.slow
def test_netfilter_vs_direct(forwarder_runs: tuple[list[PerfResult], list[PerfResult]],
                             upstream: Server, netfilter_dns: Server,
                             figures: Figures) -> None:
    direct, through = forwarder_runs
    _ratio, lines = _summary("netfilter", direct, through, FORWARDER_TARGET)
    print("\n".join(["", *lines]))
    _record(figures, FORWARDER_TABLE, direct, through, "unbound upstream, direct",
            "through netfilter serve dns")
    figures.target(f"netfilter >= {FORWARDER_TARGET:.0%} of the upstream's direct q/s",
                   FORWARDER_TABLE, "through netfilter serve dns", "ratio", FORWARDER_TARGET)
    assert all(r.lost == 0 for r in direct), "the upstream lost queries at full speed"
    assert all(set(r.rcodes) == {"NOERROR"} for r in [*direct, *through])
    _no_errors(upstream, netfilter_dns)


@pytest.mark.slow
def test_references_in_the_rotation(rotation: list[list[PerfResult]], netfilter_python: Server,
                                    bare: Server, figures: Figures) -> None:
    """Not targets: where netfilter's relay stands against its Python listener and
    against forwarding alone, measured in the same rotation."""
    direct, through, python, forwarder = rotation
    for label, runs, row in (("netfilter, Python listener", python,
                              "through netfilter serve dns, Python listener"),
                             ("bare uvloop forwarder", forwarder,
                              "a bare uvloop forwarder (no filtering)")):
        _ratio, lines = _summary(label, direct, runs, None)
        print("\n".join(["", *lines[1:3]]))
        figures.time(FORWARDER_TABLE, row, 1 / _median(runs), unit="query",
                     note=f"median of {len(runs)} x {SECONDS} s")
    relay_vs_bare = _median(through) / _median(forwarder)
    print(f"netfilter (C relay) / bare forwarder: {relay_vs_bare:.1%}")
    assert all(set(r.rcodes) == {"NOERROR"} for r in [*python, *forwarder])
    _no_errors(netfilter_python, bare)


@pytest.mark.slow
def test_netfilter_sustained_no_loss(forwarder_runs: tuple[list[PerfResult], list[PerfResult]],
                                     netfilter_dns: Server, workload: Workload,
                                     figures: Figures) -> None:
    rate = int(SUSTAINED_SHARE * _median(forwarder_runs[1]))
    print(f"\n(b) netfilter at {rate:,} q/s ({SUSTAINED_SHARE:.0%} of its median max) "
          f"for {SUSTAINED_SECONDS} s")
    result = _perf(netfilter_dns, workload, seconds=SUSTAINED_SECONDS, max_qps=rate)
    achieved = result.qps / rate
    figures.row(SUSTAINED_TABLE, "asked", f"{rate:,} q/s (-Q)")
    figures.row(SUSTAINED_TABLE, "achieved",
                f"{result.qps:,.0f} q/s ({achieved:.1%} of asked), {result.sent:,} sent, "
                f"server cpu {result.server_cpu:.2f} cores")
    figures.row(SUSTAINED_TABLE, "lost", f"{result.lost}", value=result.lost)
    figures.target(f"0 lost at {SUSTAINED_SHARE:.0%} of netfilter's max for "
                   f"{SUSTAINED_SECONDS} s", SUSTAINED_TABLE, "lost", "max", 0)
    verdict = "PASS" if result.lost == 0 else "FAIL"
    print(f"achieved {result.qps:,.0f} q/s ({achieved:.1%} of asked); lost {result.lost}: "
          f"{verdict}")
    assert result.lost == 0, f"netfilter lost {result.lost} of {result.sent} queries"
    assert set(result.rcodes) == {"NOERROR"}, result.rcodes
    _no_errors(netfilter_dns)


@pytest.mark.slow
def test_plugin_vs_localzone(localzone: Server, plugin: Server, workload: Workload,
                             figures: Figures) -> None:
    print(f"\n(c) dnsperf -c 4 -l {SECONDS}: unbound local-zone blocks vs unbound + plugin, "
          f"alternated (load average {os.getloadavg()[0]:.2f})")
    base, with_plugin = _alternate(localzone, plugin, workload)
    _ratio, lines = _summary("plugin", base, with_plugin, PLUGIN_TARGET)
    print("\n".join(["", *lines]))
    _record(figures, PLUGIN_TABLE, base, with_plugin, "unbound, local-zone redirect blocks",
            "unbound + netfilter plugin")
    figures.target(f"plugin >= {PLUGIN_TARGET:.0%} of unbound with local-zone blocks",
                   PLUGIN_TABLE, "unbound + netfilter plugin", "ratio", PLUGIN_TARGET)
    assert all(r.lost == 0 for r in [*base, *with_plugin])
    assert all(set(r.rcodes) == {"NOERROR"} for r in [*base, *with_plugin])
    _no_errors(localzone, plugin)
