"""DNS throughput of `netfilter serve dns` with `dns.workers: 1` and `dns.workers: 2`.

    .venv/bin/python -m pytest benchmarks/test_dns_workers.py -q -m slow -s

The workload of test_dns_perf.py (dnsbench.make_workload: 20,000 lines, 1% under
blocked domains, the rest answered by an upstream unbound from local data). dnsperf
with 16 clients (16 source ports: the kernel spreads them over the workers' SO_REUSEPORT
sockets by address and port; with 4, all on one worker is a 1 in 8 chance), against
one node with one process and one with two, back to back in pairs; the figure is the
median of the pairwise ratios. Each run also reports the CPU the node (every process
of it), dnsperf and the upstream unbound took: on a 2-core machine they share the two
cores, so what a second worker can add is bounded by what the others leave.

Ratios are reported, never asserted. Asserted: both nodes answer blocked and clean
names correctly, the block events of the node's one audit log match the blocked
queries sent (both processes write to it), and no process logs an error.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import dnsbench
from dnsbench import Server, Workload
from support import Figures

pytestmark = pytest.mark.skipif(
    bool(dnsbench.missing_tools()),
    reason=f"{', '.join(dnsbench.missing_tools())} not installed (Debian: apt-get install "
           "dnsperf unbound python3-unbound); the DNS throughput benchmarks drive them")

SECONDS = 5  # per measured run
PAIRS = 5
CLIENTS = 16
OUTSTANDING = 100  # dnsperf's default -q: queries in flight at once
TABLE = "DNS: netfilter serve dns, dns.workers 1 vs 2 (dnsperf -c 16)"


@dataclass
class Run:
    qps: float
    lost: int
    node_cpu: float  # cores, every process of the node
    dnsperf_cpu: float
    upstream_cpu: float


def _node_pids(server: Server) -> list[int]:
    assert server.proc is not None
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def _cpu(pids: list[int]) -> float:
    return sum(dnsbench.process_cpu(pid) for pid in pids)


def _node(workload: Workload, directory: Path, upstream: Server, workers: int,
          cache_size: int | None = None) -> Server:
    server = dnsbench.netfilter_server(workload, directory, upstream.port)
    config = directory / "netfilter.yaml"
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["dns"]["workers"] = workers
    if cache_size is not None:
        data["dns"]["cache_size"] = cache_size
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    server.name = f"netfilter-workers-{workers}" + ("" if cache_size is None else "-nocache")
    server.command = [*server.command[:1], "-v", *server.command[1:]]  # its "serving" line
    return server


def _served(server: Server, workload: Workload) -> Iterator[Server]:
    with server:
        server.wait_until(lambda: "netfilter: serving" in server.log(), pause=0.1)
        problems = dnsbench.sanity_problems(server.port, workload, filtering=True)
        assert not problems, f"{server.name}: {problems}\n{server.log()}"
        yield server
    print(f"\n{server.name} exited {server.proc.returncode if server.proc else None}")


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dns-workers")


@pytest.fixture(scope="module")
def workload(bench_dir: Path) -> Workload:
    return dnsbench.make_workload(bench_dir / "workload")


@pytest.fixture(scope="module")
def upstream(workload: Workload, bench_dir: Path) -> Iterator[Server]:
    with dnsbench.unbound_upstream(workload, bench_dir / "upstream") as server:
        yield server


@pytest.fixture(scope="module")
def one(workload: Workload, bench_dir: Path, upstream: Server) -> Iterator[Server]:
    yield from _served(_node(workload, bench_dir / "one", upstream, 1), workload)


@pytest.fixture(scope="module")
def two(workload: Workload, bench_dir: Path, upstream: Server) -> Iterator[Server]:
    yield from _served(_node(workload, bench_dir / "two", upstream, 2), workload)


@pytest.fixture(scope="module")
def one_uncached(workload: Workload, bench_dir: Path, upstream: Server) -> Iterator[Server]:
    yield from _served(_node(workload, bench_dir / "one-nc", upstream, 1, 0), workload)


@pytest.fixture(scope="module")
def two_uncached(workload: Workload, bench_dir: Path, upstream: Server) -> Iterator[Server]:
    yield from _served(_node(workload, bench_dir / "two-nc", upstream, 2, 0), workload)


def _run(server: Server, upstream: Server, workload: Workload) -> Run:
    assert server.audit is not None and upstream.proc is not None
    pids = _node_pids(server)
    before_blocks = dnsbench.count_blocks(server.audit)
    node, up = _cpu(pids), dnsbench.process_cpu(upstream.proc.pid)
    result = dnsbench.run_dnsperf(server, workload.queries, seconds=SECONDS, clients=CLIENTS)
    wall = result.seconds or SECONDS
    run = Run(result.qps, result.lost, (_cpu(pids) - node) / wall, result.client_cpu,
              (dnsbench.process_cpu(upstream.proc.pid) - up) / wall)
    want = dnsbench.expected_blocks(workload, result.sent)
    blocks = dnsbench.settled_blocks(server.audit, before_blocks + want) - before_blocks
    print(f"  {server.name:20} {run.qps:>9,.0f} q/s  lost {run.lost}  cpu: node "
          f"{run.node_cpu:.2f}, dnsperf {run.dnsperf_cpu:.2f}, upstream {run.upstream_cpu:.2f}"
          f" cores; blocks {blocks:,} of {want:,}", flush=True)
    # exact but for the edges: the blocks of a run's last queries (up to dnsperf's 100
    # outstanding) may reach the log after its count settled, and so count in the next
    assert abs(blocks - want) <= OUTSTANDING + result.lost, (server.name, blocks, want)
    assert set(result.rcodes) == {"NOERROR"}, result.rcodes
    return run


@pytest.mark.slow
def test_two_workers_vs_one(one: Server, two: Server, upstream: Server, workload: Workload,
                            figures: Figures) -> None:
    """The relay's answer cache on (the default): after the warm-up pass, clean names
    are answered from it, so the node does little per query and the upstream nothing."""
    _compare(one, two, upstream, workload, figures, TABLE)


@pytest.mark.slow
def test_two_workers_vs_one_uncached(one_uncached: Server, two_uncached: Server,
                                     upstream: Server, workload: Workload,
                                     figures: Figures) -> None:
    """dns.cache_size: 0: every clean query goes to the upstream unbound (more work in
    the node per query, and the upstream takes its share of the two cores)."""
    _compare(one_uncached, two_uncached, upstream, workload, figures,
             TABLE + ", relay cache off")


def _compare(one: Server, two: Server, upstream: Server, workload: Workload,
             figures: Figures, table: str) -> None:
    print(f"\n{table}: dnsperf -c {CLIENTS} -l {SECONDS}, workers 1 then 2, {PAIRS} pairs "
          f"(load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)")
    for server in (one, two):  # warm: every name once through each
        dnsbench.run_dnsperf(server, workload.queries, seconds=20, runs=1, clients=CLIENTS)
    pairs = [(_run(one, upstream, workload), _run(two, upstream, workload))
             for _ in range(PAIRS)]
    ratios = [b.qps / a.qps for a, b in pairs]
    ratio = statistics.median(ratios)
    one_qps = statistics.median(a.qps for a, _ in pairs)
    two_qps = statistics.median(b.qps for _, b in pairs)
    cpu = {label: (statistics.median(r.node_cpu for r in runs),
                   statistics.median(r.dnsperf_cpu for r in runs),
                   statistics.median(r.upstream_cpu for r in runs))
           for label, runs in (("1", [a for a, _ in pairs]), ("2", [b for _, b in pairs]))}
    lines = [f"workers 1: median {one_qps:,.0f} q/s; workers 2: median {two_qps:,.0f} q/s",
             f"2 / 1, median of pairwise ratios: {ratio:.2f} "
             f"({', '.join(f'{x:.2f}' for x in ratios)})",
             *(f"cpu (cores) with workers {k}: node {v[0]:.2f}, dnsperf {v[1]:.2f}, "
               f"upstream unbound {v[2]:.2f}" for k, v in cpu.items()),
             f"load average after: {os.getloadavg()[0]:.2f}"]
    print("\n".join(["", *lines]))
    figures.time(table, "dns.workers: 1", 1 / one_qps, baseline=True, unit="query",
                 note=f"median of {PAIRS} x {SECONDS} s")
    figures.time(table, "dns.workers: 2", 1 / two_qps, unit="query",
                 note=f"median pairwise ratio {ratio:.2f}")
    for server in (one, two):
        problems = dnsbench.stderr_problems(server)
        assert not problems, f"{server.name} logged errors:\n" + "\n".join(problems[:20])
