"""DoT and DoH throughput against UDP and TCP, on one `netfilter serve dns`, in one run.

    .venv/bin/python -m pytest benchmarks/test_encrypted_dns.py -q -m slow -s

The workload of test_dns_perf.py (dnsbench.make_workload: a signed list of 1,000
domains, a 20,000-line query file, 1% under blocked domains, the rest answered by an
unbound upstream from local data). One netfilter serves it on UDP+TCP, DoT and DoH
(self-signed certificate); dnsperf (-c 4, -l 5) asks it over udp, tcp, dot, doh with
POST and doh with GET, in rotation (PAIRS rounds), medians. dnsperf opens one
connection per client and keeps it (the server's per-connection query and lifetime
caps are raised for the run, so that reconnecting is not what is measured).

Reported (figures table, stdout), never asserted: q/s and each transport's ratio to UDP
in the same run. Asserted: no query lost, every answer NOERROR (the list's action is
stoppage), and no error in the server's log.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import dnsbench
from dnsbench import PerfResult, Server, Workload
from netfilter.dns.tlsconfig import generate_self_signed
from support import Figures

pytestmark = pytest.mark.skipif(
    bool(dnsbench.missing_tools()),
    reason=f"{', '.join(dnsbench.missing_tools())} not installed (Debian: apt-get install "
           "dnsperf unbound python3-unbound); the DNS throughput benchmarks drive them")

SECONDS = 5
PAIRS = 3
CLIENTS = 4
TABLE = "DNS over TLS and HTTPS: dnsperf on one netfilter serve dns, each transport vs UDP"
MODES: dict[str, list[str]] = {  # transport -> dnsperf arguments
    "udp": ["-m", "udp"],
    "tcp": ["-m", "tcp"],
    "dot": ["-m", "dot"],
    "doh-post": ["-m", "doh", "-O", "doh-method=POST"],
    "doh-get": ["-m", "doh", "-O", "doh-method=GET"],
}


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encrypted-dns")


@pytest.fixture(scope="module")
def workload(bench_dir: Path) -> Workload:
    return dnsbench.make_workload(bench_dir / "workload")


@pytest.fixture(scope="module")
def upstream(workload: Workload, bench_dir: Path) -> Iterator[Server]:
    with dnsbench.unbound_upstream(workload, bench_dir / "upstream") as server:
        yield server


class Encrypted:
    """The netfilter under test and its DoT and DoH ports."""

    def __init__(self, server: Server, dot_port: int, doh_port: int) -> None:
        self.server = server
        self.ports = {"udp": server.port, "tcp": server.port, "dot": dot_port,
                      "doh-post": doh_port, "doh-get": doh_port}


@pytest.fixture(scope="module")
def netfilter(workload: Workload, bench_dir: Path, upstream: Server) -> Iterator[Encrypted]:
    server = dnsbench.netfilter_server(workload, bench_dir / "netfilter", upstream.port)
    config_path = Path(server.command[-1])
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    cert, key = bench_dir / "tls.crt", bench_dir / "tls.key"
    generate_self_signed(cert, key)
    dot_port, doh_port = dnsbench.free_port(), dnsbench.free_port()
    config["dns"].update({
        "dot_listen": [f"{dnsbench.HOST}:{dot_port}"],
        "doh_listen": [f"{dnsbench.HOST}:{doh_port}"],
        "tls_certificate": str(cert), "tls_key": str(key),
        "tcp_max_queries": 1 << 20, "tcp_max_lifetime": 3600.0,
    })
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    with server:
        problems = dnsbench.sanity_problems(server.port, workload, filtering=True)
        assert not problems, f"netfilter answers wrongly before any load: {problems}"
        yield Encrypted(server, dot_port, doh_port)
    print("\nnetfilter stderr, last lines:", *server.log().splitlines()[-8:], sep="\n  ")


def dnsperf(target: Encrypted, mode: str, queries: Path, seconds: float) -> PerfResult:
    """One dnsperf run over `mode`, parsed, with the server's CPU share."""
    server = target.server
    assert server.proc is not None and server.alive(), server.log()
    port = target.ports[mode]
    command = ["dnsperf", "-s", dnsbench.HOST, "-p", str(port), "-d", str(queries),
               "-c", str(CLIENTS), "-l", f"{seconds:g}", "-t", "5", *MODES[mode]]
    if mode.startswith("doh"):
        command += ["-O", f"doh-uri=https://{dnsbench.HOST}:{port}/dns-query"]
    before = dnsbench.process_cpu(server.proc.pid)
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          timeout=seconds + 5 + dnsbench.DNSPERF_MARGIN)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n"
                           f"{done.stdout}{done.stderr}")
    result = dnsbench.parse_dnsperf(mode, done.stdout)
    result.server_cpu = (dnsbench.process_cpu(server.proc.pid) - before) / wall
    return result


@pytest.mark.slow
def test_encrypted_transports_vs_udp(netfilter: Encrypted, workload: Workload,
                                     figures: Figures) -> None:
    print(f"\ndnsperf -c {CLIENTS} -l {SECONDS} over {', '.join(MODES)}, {PAIRS} rounds "
          f"(load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)")
    for mode in MODES:  # warm-up: the upstream's cache, the host cache, TLS sessions
        dnsperf(netfilter, mode, workload.queries, 2)
    runs: dict[str, list[PerfResult]] = {mode: [] for mode in MODES}
    for _ in range(PAIRS):
        for mode in MODES:
            result = dnsperf(netfilter, mode, workload.queries, SECONDS)
            runs[mode].append(result)
            print(f"  {mode:9} {result.qps:>9,.0f} q/s  sent {result.sent:,}  lost "
                  f"{result.lost}  server cpu {result.server_cpu:.2f} cores", flush=True)
    udp = statistics.median(r.qps for r in runs["udp"])
    for mode, results in runs.items():
        qps = statistics.median(r.qps for r in results)
        cpu = statistics.median(r.server_cpu for r in results)
        print(f"{mode:9} median {qps:>9,.0f} q/s = {qps / udp:6.1%} of udp; server cpu "
              f"{cpu:.2f} cores")
        figures.time(TABLE, f"{mode} ({'baseline' if mode == 'udp' else 'vs udp'})",
                     1 / qps, baseline=mode == "udp", unit="query",
                     note=f"median of {PAIRS} x {SECONDS} s, server cpu {cpu:.2f}")
    lost = {mode: sum(r.lost for r in results) for mode, results in runs.items()}
    assert not any(lost.values()), f"queries lost: {lost}"
    for mode, results in runs.items():
        assert all(set(r.rcodes) == {"NOERROR"} for r in results), (mode, results[0].rcodes)
    problems = dnsbench.stderr_problems(netfilter.server)
    assert not problems, "netfilter logged errors:\n" + "\n".join(problems[:20])
