"""DoT and DoH throughput against UDP and TCP, on one `netfilter serve dns`, in one run.

    .venv/bin/python -m pytest benchmarks/test_encrypted_dns.py -q -m slow -s

The workload of test_dns_perf.py (dnsbench.make_workload: a signed list of 1,000
domains, a 20,000-line query file, 1% under blocked domains, the rest answered by an
unbound upstream from local data). One netfilter serves it on UDP+TCP, DoT and DoH
(self-signed certificate); dnsperf (-c 4, -l 5) asks it over udp, tcp, dot, doh with
POST and doh with GET, in rotation (PAIRS rounds), medians. dnsperf opens one
connection per client and keeps it (the server's per-connection query and lifetime
caps are raised for the run, so that reconnecting is not what is measured).

For reference (where dnsdist is installed: Debian's 1.7 has DoT and DoH), a
TLS-terminating peer in front of the same upstream, without any filtering: dnsdist with
UDP and DoT listeners, the same dnsperf runs, its own ratios to its own UDP (its DoH is
not measured: dnsperf's DoH client stalls on it, see test_dnsdist_reference).

Reported (figures table, stdout), never asserted: q/s and each transport's ratio to UDP
in the same run. Asserted: no query lost, every answer NOERROR (the list's action is
stoppage), and no error in the server's log.
"""

from __future__ import annotations

import os
import shutil
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
DNSDIST_TABLE = "DNS over TLS, reference: dnsdist 1.7 (no filtering), vs its own UDP"
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
    """A server under test and its UDP/TCP, DoT and DoH ports."""

    def __init__(self, server: Server, dot_port: int, doh_port: int) -> None:
        self.server = server
        self.ports = {"udp": server.port, "tcp": server.port, "dot": dot_port,
                      "doh-post": doh_port, "doh-get": doh_port}


@pytest.fixture(scope="module")
def pair(bench_dir: Path) -> tuple[Path, Path]:
    cert, key = bench_dir / "tls.crt", bench_dir / "tls.key"
    generate_self_signed(cert, key)
    return cert, key


@pytest.fixture(scope="module")
def netfilter(workload: Workload, bench_dir: Path, upstream: Server,
              pair: tuple[Path, Path]) -> Iterator[Encrypted]:
    server = dnsbench.netfilter_server(workload, bench_dir / "netfilter", upstream.port)
    config_path = Path(server.command[-1])
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    cert, key = pair
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


@pytest.fixture(scope="module")
def dnsdist(bench_dir: Path, upstream: Server, pair: tuple[Path, Path]) -> Iterator[Encrypted]:
    """dnsdist forwarding UDP, DoT and DoH to the same upstream (RECIPES.md: checkName,
    no security poll)."""
    if shutil.which("dnsdist") is None:
        pytest.skip("dnsdist not installed (Debian: apt-get install dnsdist); the reference")
    directory = bench_dir / "dnsdist"
    directory.mkdir()
    port, dot_port, doh_port = (dnsbench.free_port() for _ in range(3))
    cert, key = pair
    host = dnsbench.HOST
    conf = directory / "dnsdist.conf"
    conf.write_text("\n".join([
        f"setLocal('{host}:{port}')",
        f"addTLSLocal('{host}:{dot_port}', '{cert}', '{key}')",
        f"addDOHLocal('{host}:{doh_port}', '{cert}', '{key}', '/dns-query')",
        f"newServer({{address='{host}:{upstream.port}', checkName='c0.clean.example.'}})",
        "setSecurityPollSuffix('')",
    ]) + "\n", encoding="utf-8")
    server = Server("dnsdist", ["dnsdist", "--supervised", "--disable-syslog", "-C", str(conf)],
                    port, directory)
    with server:
        yield Encrypted(server, dot_port, doh_port)


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


def _rotation(target: Encrypted, workload: Workload, figures: Figures, table: str,
              modes: tuple[str, ...] = tuple(MODES)) -> dict[str, list[PerfResult]]:
    """Warm-up, then PAIRS rounds over `modes`; medians and ratios to UDP recorded."""
    print(f"\n{target.server.name}: dnsperf -c {CLIENTS} -l {SECONDS} over {', '.join(modes)}, "
          f"{PAIRS} rounds (load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)")
    for mode in modes:  # warm-up: the upstream's cache, the host cache, TLS sessions
        dnsperf(target, mode, workload.queries, 2)
    runs: dict[str, list[PerfResult]] = {mode: [] for mode in modes}
    for _ in range(PAIRS):
        for mode in modes:
            result = dnsperf(target, mode, workload.queries, SECONDS)
            runs[mode].append(result)
            print(f"  {mode:9} {result.qps:>9,.0f} q/s  sent {result.sent:,}  lost "
                  f"{result.lost}  server cpu {result.server_cpu:.2f} cores", flush=True)
    udp = statistics.median(r.qps for r in runs["udp"])
    for mode, results in runs.items():
        qps = statistics.median(r.qps for r in results)
        cpu = statistics.median(r.server_cpu for r in results)
        print(f"{mode:9} median {qps:>9,.0f} q/s = {qps / udp:6.1%} of udp; server cpu "
              f"{cpu:.2f} cores")
        figures.time(table, f"{mode} ({'baseline' if mode == 'udp' else 'vs udp'})",
                     1 / qps, baseline=mode == "udp", unit="query",
                     note=f"median of {PAIRS} x {SECONDS} s, server cpu {cpu:.2f}")
    lost = {mode: sum(r.lost for r in results) for mode, results in runs.items()}
    assert not any(lost.values()), f"{target.server.name}: queries lost: {lost}"
    problems = dnsbench.stderr_problems(target.server)
    assert not problems, f"{target.server.name} logged errors:\n" + "\n".join(problems[:20])
    return runs


@pytest.mark.slow
def test_encrypted_transports_vs_udp(netfilter: Encrypted, workload: Workload,
                                     figures: Figures) -> None:
    runs = _rotation(netfilter, workload, figures, TABLE)
    for mode, results in runs.items():
        assert all(set(r.rcodes) == {"NOERROR"} for r in results), (mode, results[0].rcodes)


@pytest.mark.slow
def test_dnsdist_reference(dnsdist: Encrypted, workload: Workload, figures: Figures) -> None:
    """Not a target: how much a C++ TLS terminator loses to TLS, same runs. Not DoH:
    dnsperf 2.10's DoH client stalls on dnsdist's answers (kdig gets them): with -q 1 it
    completes ~13 queries a second, one per poll timeout, and loses what is in flight;
    it does the same with any server that writes an answer's HTTP/2 frames together
    with others in one TLS record."""
    _rotation(dnsdist, workload, figures, DNSDIST_TABLE, ("udp", "tcp", "dot"))
