"""The service: start-up to ready, and the cost of the metrics endpoint, on loopback.

    .venv/bin/python -m pytest benchmarks/test_service_perf.py -q -m slow -s -p no:cacheprovider

(a) Wall time from process start to ready: every part listening and answering (a DNS
    query answered, the stop page answering, /readyz 200 on the metrics port, and with
    the proxy a blocked URL answered 451 through it, so the mitmdump child has loaded
    the list too), polled every 10 ms. Variants, in rotation (one warm-up round, then
    STARTS rounds): `python -c pass` and `netfilter --version` (interpreter start-up,
    measured to exit), `netfilter serve` without a config (the embedded demo, its
    clean names to a local unbound), and `netfilter serve --config` with dns + stoppage
    + audit + metrics, with the tiny demo list (the baseline) and with a 1M-entry
    synthetic bundle, each without and with the proxy.
(b) DNS throughput of `netfilter serve dns` with and without a `metrics:` section,
    the "on" server scraped for /metrics every second during its runs (as Prometheus
    does), alternated in pairs (order swapped every pair), 1% and 10% blocked query mixes
    (dnsbench.make_workload); verdict on the median of the pairwise on/off ratios, with
    a bootstrap 95% interval.

The proxy's throughput is not measured against metrics: the proxy runs in a mitmdump
child that has no metrics of its own, and the parent's metrics server reads nothing
from it (`metrics.for_node` knows the DNS server and the stop page only).

Timings are reported (figures table, stdout), never asserted. Asserted: every variant
gets ready and answers as configured (blocked names and URLs blocked, /metrics served),
and the DNS servers answer correctly before and after the load without logging errors.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import pytest
import yaml
from tests.dns_support import Unbound
from tests.support import DEMO_LIST, DEMO_PUB, HOST, free_port

import dnsbench
from dnsbench import PerfResult, Server, Workload
from support import BigBundles, Figures
from synth import domain_host

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(dnsbench.missing_tools()),
        reason=f"{', '.join(dnsbench.missing_tools())} not installed (Debian: apt-get "
               "install dnsperf unbound python3-unbound)"),
]

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
NETFILTER = str(VENV_BIN / "netfilter")
PYTHON = str(VENV_BIN / "python")
HAS_MITMDUMP = (VENV_BIN / "mitmdump").exists() or shutil.which("mitmdump") is not None
DEMO_PORTS = {"dns": 5353, "proxy": 8080, "stoppage": 8081, "metrics": 9108}
DEMO_BLOCKED_NAME = "blocked.example"  # DEMO-0001
DEMO_BLOCKED_URL = "http://partly.example/dir/page.html"  # DEMO-0003
BIG = 1_000_000
STARTS = 6  # measured start-ups per variant (after one warm-up round)
READY_BOUND = 60.0
STOP_BOUND = 20.0
POLL = 0.01
DEMO_TARGET, BIG_TARGET = 2.0, 5.0  # seconds
START_TABLE = "service: start-up to ready (median of the rounds)"

PAIRS = 16
SECONDS = 3
SCRAPE_EVERY = 1.0
SCRAPE_BURST = 200  # back-to-back scrapes of the idle server: its CPU per scrape
METRICS_TARGET = 0.98  # metrics on >= 98% of metrics off
METRICS_TABLE = "service: DNS q/s with metrics on (scraped every 1 s) vs off"
SEED = 20261204


# ---------------------------------------------------------------- probes


def dns_answers(port: int, name: str) -> bool:
    """One UDP query on a connected socket: refused at once while nothing listens."""
    query = dns.message.make_query(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.connect((HOST, port))
            sock.send(query.to_wire())
            reply = dns.message.from_wire(sock.recv(65535))
        except (OSError, dns.exception.DNSException):
            return False
    return reply.id == query.id


def http_status(url: str, proxy: int | None = None) -> int | None:
    """The HTTP status of a GET (None: no answer); through the proxy on `proxy`."""
    handlers = [urllib.request.ProxyHandler(
        {"http": f"http://{HOST}:{proxy}"} if proxy else {})]
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=2.0) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as e:
        e.read()
        return int(e.code)
    except (OSError, urllib.error.URLError):
        return None


@dataclass
class Variant:
    name: str
    command: list[str]
    cwd: Path
    env: dict[str, str]
    checks: list[tuple[str, Callable[[], bool]]] = field(default_factory=list)  # [] = to exit
    times: list[float] = field(default_factory=list)


def _parts_checks(dns_port: int, name: str, stoppage: int, metrics: int,
                  proxy: tuple[int, str] | None) -> list[tuple[str, Callable[[], bool]]]:
    checks: list[tuple[str, Callable[[], bool]]] = [
        ("dns", lambda: dns_answers(dns_port, name)),
        ("stoppage", lambda: http_status(f"http://{HOST}:{stoppage}/") is not None),
        ("readyz", lambda: http_status(f"http://{HOST}:{metrics}/readyz") == 200),
    ]
    if proxy is not None:
        port, url = proxy
        checks.append(("proxy 451", lambda: http_status(url, proxy=port) == 451))
    return checks


def time_to_ready(variant: Variant) -> float:
    """Seconds from Popen to every check passing (or to exit, without checks); the
    process is stopped (SIGTERM) before returning."""
    log = open(variant.cwd / f"{variant.name.replace(' ', '_')}.log", "ab")  # noqa: SIM115
    start = time.perf_counter()
    proc = subprocess.Popen(variant.command, cwd=variant.cwd, env=variant.env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        if not variant.checks:
            assert proc.wait(READY_BOUND) == 0, f"{variant.name} failed"
            return time.perf_counter() - start
        pending = list(variant.checks)
        while pending:
            assert proc.poll() is None, (f"{variant.name} exited {proc.returncode}; see "
                                         f"{log.name}")
            assert time.perf_counter() - start < READY_BOUND, (
                f"{variant.name} not ready within {READY_BOUND} s: {[n for n, _ in pending]}")
            pending = [(n, check) for n, check in pending if not check()]
            if pending:
                time.sleep(POLL)
        return time.perf_counter() - start
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_BOUND)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_BOUND)
        log.close()


def _demo_ports_free() -> str | None:
    """None, or why the demo cannot run (one of its fixed ports is taken)."""
    for part, port in DEMO_PORTS.items():
        kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if part == "dns" else [])
        for kind in kinds:
            with socket.socket(socket.AF_INET, kind) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((HOST, port))
                except OSError:
                    return f"{HOST} port {port} ({part}) is in use by another program"
    return None


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and k not in ("XDG_STATE_HOME", "NETFILTER_DEMO_UPSTREAM")}
    return {**env, **extra}


def _config_variant(name: str, directory: Path, bundle: Path, trust: Path, blocked: str,
                    upstream: str, *, proxy: bool) -> Variant:
    """`netfilter serve --config`: dns + stoppage + audit + metrics (+ proxy)."""
    directory.mkdir(parents=True, exist_ok=True)
    ports = {p: free_port() for p in ("dns", "stoppage", "metrics", "proxy")}
    config: dict[str, object] = {
        "node": {"id": "startup-bench", "key": str(directory / "node.key")},
        "lists": [{"path": str(bundle), "trust": [str(trust)], "action": "stoppage"}],
        "dns": {"listen": [f"{HOST}:{ports['dns']}"], "upstreams": [upstream]},
        "stoppage": {"listen": f"{HOST}:{ports['stoppage']}"},
        "audit": {"path": str(directory / "audit.sqlite"), "client": "none"},
        "metrics": {"listen": f"{HOST}:{ports['metrics']}"},
    }
    if proxy:
        config["proxy"] = {"listen": f"{HOST}:{ports['proxy']}", "intercept": "none",
                           "confdir": str(directory / "mitmproxy")}
    path = directory / "netfilter.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return Variant(name, [NETFILTER, "serve", "--config", str(path)], directory, _clean_env(),
                   _parts_checks(ports["dns"], blocked, ports["stoppage"], ports["metrics"],
                                 (ports["proxy"], f"http://{blocked}/") if proxy else None))


@pytest.fixture(scope="module")
def local_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    directory = tmp_path_factory.mktemp("service-upstream")
    with Unbound(directory) as server:
        yield server  # type: ignore[misc]


def test_start_up_to_ready(tmp_path: Path, big_bundles: BigBundles, local_upstream: Unbound,
                           figures: Figures) -> None:
    spec, big = big_bundles.get(BIG)
    big_blocked = domain_host(0)  # entry 0 is a domain entry
    assert spec.n_domain > 0
    upstream = local_upstream.address
    variants = [
        Variant("python -c pass", [PYTHON, "-c", "pass"], tmp_path, _clean_env()),
        Variant("netfilter --version", [NETFILTER, "--version"], tmp_path, _clean_env()),
    ]
    demo_skip = _demo_ports_free()
    if demo_skip is None:
        (tmp_path / "demo").mkdir()
        variants.append(Variant(
            "demo (netfilter serve)" + (", with proxy" if HAS_MITMDUMP else ""),
            [NETFILTER, "serve"], tmp_path / "demo",
            _clean_env(NETFILTER_DEMO_UPSTREAM=upstream),
            _parts_checks(DEMO_PORTS["dns"], DEMO_BLOCKED_NAME, DEMO_PORTS["stoppage"],
                          DEMO_PORTS["metrics"],
                          (DEMO_PORTS["proxy"], DEMO_BLOCKED_URL) if HAS_MITMDUMP else None)))
    for proxy in (False, True) if HAS_MITMDUMP else (False,):
        tail = ", with proxy" if proxy else ""
        variants.append(_config_variant(f"--config, demo list{tail}",
                                        tmp_path / f"tiny{int(proxy)}", DEMO_LIST, DEMO_PUB,
                                        DEMO_BLOCKED_NAME, upstream, proxy=proxy))
        variants.append(_config_variant(f"--config, 1M entries{tail}",
                                        tmp_path / f"big{int(proxy)}", big,
                                        big_bundles.authority.public_path, big_blocked,
                                        upstream, proxy=proxy))
    print(f"\n(a) start-up to ready: 1 warm-up round + {STARTS} rounds of {len(variants)} "
          f"variants (load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)"
          + (f"; demo skipped: {demo_skip}" if demo_skip else ""))
    for round_ in range(STARTS + 1):
        for variant in variants:
            seconds = time_to_ready(variant)
            if round_:
                variant.times.append(seconds)
    for variant in variants:
        med = statistics.median(variant.times)
        print(f"  {variant.name:38} median {med:6.3f} s  range {min(variant.times):.3f}-"
              f"{max(variant.times):.3f} s  ({', '.join(f'{t:.3f}' for t in variant.times)})")
        figures.time(START_TABLE, variant.name, med, baseline=variant.name == "python -c pass",
                     unit="start", note=f"range {min(variant.times):.3f}-"
                                        f"{max(variant.times):.3f} s, {len(variant.times)} runs")
    for variant in variants:
        if variant.name.startswith("demo"):
            figures.target(f"demo ready <= {DEMO_TARGET:g} s", START_TABLE, variant.name,
                           "seconds", DEMO_TARGET)
        if "1M" in variant.name:
            figures.target(f"1M-entry list ready <= {BIG_TARGET:g} s ({variant.name})",
                           START_TABLE, variant.name, "seconds", BIG_TARGET)
    if demo_skip:
        figures.row(START_TABLE + ": skipped", "demo", demo_skip)


# ---------------------------------------------------------------- metrics on/off


class Scraper:
    """GET /metrics every SCRAPE_EVERY seconds in a thread while `active`."""

    def __init__(self, port: int) -> None:
        self.url = f"http://{HOST}:{port}/metrics"
        self.active = threading.Event()
        self.done = threading.Event()
        self.scrapes = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            if self.active.wait(0.1):
                try:
                    with urllib.request.urlopen(self.url, timeout=5) as response:
                        body = response.read()
                    if response.status != 200 or b"netfilter_dns_" not in body:
                        self.failures.append(f"status {response.status}, {len(body)} bytes")
                    self.scrapes += 1
                except OSError as e:
                    self.failures.append(repr(e))
                self.done.wait(SCRAPE_EVERY)

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)


def _with_metrics(server: Server) -> int:
    """Add a `metrics:` section to the config of a not yet started netfilter Server."""
    path = Path(server.command[server.command.index("--config") + 1])
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    port = free_port()
    config["metrics"] = {"listen": f"{HOST}:{port}"}
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    server.name = "netfilter-metrics"
    return port


def _scrape_cost(server: Server, port: int) -> tuple[float, int]:
    """CPU seconds the server spends per /metrics scrape (SCRAPE_BURST back to back,
    idle otherwise), and the size of the answer."""
    assert server.proc is not None
    url = f"http://{HOST}:{port}/metrics"
    before = dnsbench.process_cpu(server.proc.pid)
    size = 0
    for _ in range(SCRAPE_BURST):
        with urllib.request.urlopen(url, timeout=5) as response:
            size = len(response.read())
    return (dnsbench.process_cpu(server.proc.pid) - before) / SCRAPE_BURST, size


def bootstrap_median(values: list[float], rounds: int = 10_000) -> tuple[float, float]:
    """A 95% interval of the median (percentile bootstrap, fixed seed)."""
    rng = random.Random(SEED)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(rounds))
    return medians[int(rounds * 0.025)], medians[int(rounds * 0.975) - 1]


def _check(server: Server, workload: Workload) -> None:
    problems = dnsbench.sanity_problems(server.port, workload, filtering=True)
    assert not problems, f"{server.name} answers wrongly: {problems}\n{server.log()}"
    errors = dnsbench.stderr_problems(server)
    assert not errors, f"{server.name} logged errors:\n" + "\n".join(errors[:20])


@pytest.mark.parametrize("share", [0.01, 0.10], ids=["1pct-blocked", "10pct-blocked"])
def test_dns_metrics_on_vs_off(share: float, tmp_path: Path, figures: Figures) -> None:
    workload = dnsbench.make_workload(tmp_path / "workload", blocked_share=share)
    with dnsbench.unbound_upstream(workload, tmp_path / "upstream") as upstream:
        off = dnsbench.netfilter_server(workload, tmp_path / "off", upstream.port)
        on = dnsbench.netfilter_server(workload, tmp_path / "on", upstream.port)
        metrics_port = _with_metrics(on)
        with off, on:
            for server in (off, on):
                _check(server, workload)
                dnsbench.run_dnsperf(server, workload.queries, seconds=20, runs=1)  # warm-up
            scraper = Scraper(metrics_port)
            print(f"\n(b) {share:.0%} blocked: {PAIRS} pairs of dnsperf -c 4 -l {SECONDS}, "
                  f"on/off alternated, order swapped each pair (load average "
                  f"{os.getloadavg()[0]:.2f})")
            runs: dict[str, list[PerfResult]] = {"on": [], "off": []}
            try:
                for pair in range(PAIRS):
                    order = ("on", "off") if pair % 2 == 0 else ("off", "on")
                    for side in order:
                        server = on if side == "on" else off
                        if side == "on":
                            scraper.active.set()
                        try:
                            result = dnsbench.run_dnsperf(server, workload.queries,
                                                          seconds=SECONDS)
                        finally:
                            scraper.active.clear()
                        runs[side].append(result)
                        assert server.alive(), f"{server.name} died:\n{server.log()}"
                        assert set(result.rcodes) <= {"NOERROR"}, result.rcodes
            finally:
                scraper.close()
            for server in (off, on):
                _check(server, workload)
            per_scrape, body = _scrape_cost(on, metrics_port)
    assert not scraper.failures, scraper.failures[:5]
    assert scraper.scrapes >= PAIRS * SECONDS // 2, scraper.scrapes
    ratios = [a.qps / b.qps for a, b in zip(runs["on"], runs["off"], strict=True)]
    cpu_ratios = [(a.server_cpu / a.qps) / (b.server_cpu / b.qps)
                  for a, b in zip(runs["on"], runs["off"], strict=True)]
    cpu_ratio = statistics.median(cpu_ratios)
    cpu_share = per_scrape / SCRAPE_EVERY / statistics.median(r.server_cpu for r in runs["on"])
    ratio = statistics.median(ratios)
    low, high = bootstrap_median(ratios)
    med_on = statistics.median(r.qps for r in runs["on"])
    med_off = statistics.median(r.qps for r in runs["off"])
    verdict = "PASS" if ratio >= METRICS_TARGET else "FAIL"
    for side in ("off", "on"):
        rs = runs[side]
        print(f"  metrics {side:3}: median {statistics.median(r.qps for r in rs):,.0f} q/s "
              f"(runs {', '.join(f'{r.qps:,.0f}' for r in rs)}); server cpu "
              f"{statistics.median(r.server_cpu for r in rs):.2f} cores; lost "
              f"{sum(r.lost for r in rs)}")
    print(f"  on/off pairwise: median {ratio:.1%} (95% CI {low:.1%}-{high:.1%}; "
          f"{', '.join(f'{x:.1%}' for x in ratios)}); medians' ratio {med_on / med_off:.1%}; "
          f"{scraper.scrapes} scrapes; target >= {METRICS_TARGET:.0%}: {verdict}")
    print(f"  server CPU per query, on/off pairwise: median {cpu_ratio:.1%} "
          f"({', '.join(f'{x:.1%}' for x in cpu_ratios)})")
    print(f"  one scrape of /metrics ({body:,} bytes) costs the idle server "
          f"{per_scrape * 1e3:.2f} ms CPU (mean of {SCRAPE_BURST}): at one a second, "
          f"{cpu_share:.2%} of the CPU it spends at full load")
    table = f"{METRICS_TABLE}, {share:.0%} blocked"
    figures.row(table, "metrics off", f"{med_off:,.0f} q/s (median of {PAIRS} x {SECONDS} s)")
    figures.row(table, "metrics on, scraped",
                f"{med_on:,.0f} q/s ({scraper.scrapes} scrapes of /metrics)")
    figures.row(table, "on/off, median pairwise",
                f"{ratio:.1%} (95% CI {low:.1%}-{high:.1%})", value=ratio)
    figures.row(table, "server CPU per query, on/off", f"{cpu_ratio:.1%} (median pairwise)")
    figures.row(table, "CPU of one scrape (idle server)",
                f"{per_scrape * 1e3:.2f} ms ({body:,} bytes): {cpu_share:.2%} of its CPU at "
                "full load, at one scrape a second")
    figures.target(f"DNS q/s metrics on >= {METRICS_TARGET:.0%} of off ({share:.0%} blocked)",
                   table, "on/off, median pairwise", "min", METRICS_TARGET)
