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
(b) DNS throughput of `netfilter serve dns` with and without a `metrics:` section:
    three servers, "on" (scraped for /metrics every second during its runs, as
    Prometheus does), "off" and "off2" (a second metrics-off server: the control), in
    PAIRS rounds of one dnsperf run each, the rounds taking the 6 orders of the three in
    turn; 1% and 10% blocked query mixes (dnsbench.make_workload). Verdict on the median
    of the same-round on/off ratios, with a bootstrap 95% interval; the off2/off ratios
    beside it show how far two identical servers differ here (the machine's noise).
(c) Proxy throughput of `netfilter serve proxy` (the node's process runs the proxy as its
    mitmdump child, and its /metrics asks that child for its counters at each scrape),
    on, off and off2 as in (b): wrk through each to test_proxy_perf's origin, workload
    and Lua script (1% blocked URLs), PROXY_PAIRS rounds, the same orders, the same
    verdict; each node and its child on one CPU, wrk, the origin and the scraper on the
    other (as test_proxy_perf pins them). The routes of the reserved *.example names to
    the origin are the addon's `netfilter_resolve`, set in mitmproxy's config.yaml in
    the proxy's confdir.

Timings are reported (figures table, stdout), never asserted. Asserted: every variant
gets ready and answers as configured (blocked names and URLs blocked, /metrics served);
the DNS servers and the proxies answer correctly before and after the load (each proxy:
every URL of the cycle, 451 naming its entry for the blocked ones, the origin's page for
the rest, no blocked URL reaching the origin) without logging errors; every scrape
answers with the part's counters (the proxy's from its child); wrk's runs as
test_proxy_perf asserts them; the "on" node's proxy counters account for every answer
wrk and the checks counted.
"""

from __future__ import annotations

import contextlib
import itertools
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
from typing import TypeVar

import dns.exception
import dns.message
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests.dns_support import Unbound
from tests.support import DEMO_LIST, DEMO_PUB, HOST, free_port, listening

import dnsbench
import test_proxy_perf as proxybench
from dnsbench import PerfResult, Server, Workload
from support import BigBundles, Figures
from synth import domain_host

pytestmark = pytest.mark.slow
needs_dns_tools = pytest.mark.skipif(
    bool(dnsbench.missing_tools()),
    reason=f"{', '.join(dnsbench.missing_tools())} not installed (Debian: apt-get "
           "install dnsperf unbound python3-unbound)")

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

# Metrics on/off: each round runs every side once, the rounds taking the 6 orders of
# the 3 sides in turn (each side first, second and last equally often, and before each
# other side as often as after it); "off2" is a second metrics-off server, the control:
# off2/off is what two identical servers differ by on this machine.
SIDES = ("on", "off", "off2")
ORDERS = list(itertools.permutations(SIDES))
PAIRS = 24  # DNS rounds (per mix)
SECONDS = 3
PROXY_PAIRS = 24  # proxy rounds
PROXY_SECONDS = 3
SCRAPE_EVERY = 1.0
SCRAPE_BURST = 200  # back-to-back scrapes of the idle server: its CPU per scrape
METRICS_TARGET = 0.98  # metrics on >= 98% of metrics off
PROXY_TARGET = 0.98
METRICS_TABLE = "service: DNS q/s with metrics on (scraped every 1 s) vs off"
PROXY_TABLE = "service: proxy req/s with metrics on (scraped every 1 s) vs off"
SEED = 20261204

R = TypeVar("R")


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
        # one DNS process, as when the recorded figures were taken
        "dns": {"listen": [f"{HOST}:{ports['dns']}"], "upstreams": [upstream], "workers": 1},
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


@needs_dns_tools
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
    """GET /metrics every SCRAPE_EVERY seconds in a thread while `active`; a scrape
    fails unless it answers 200 with `marker` in its body."""

    def __init__(self, port: int, marker: bytes) -> None:
        self.url = f"http://{HOST}:{port}/metrics"
        self.marker = marker
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
                    if response.status != 200 or self.marker not in body:
                        self.failures.append(f"status {response.status}, {len(body)} bytes"
                                             f"{'' if self.marker in body else ', no marker'}")
                    self.scrapes += 1
                except OSError as e:
                    self.failures.append(repr(e))
                self.done.wait(SCRAPE_EVERY)

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)


def rotate(rounds: int, run: Callable[[str], R]) -> dict[str, list[R]]:
    """`rounds` rounds, each running every side of SIDES once (`run(side)`), the
    rounds taking ORDERS' orders in turn; each side's results in round order, so that
    the i-th results of two sides are a same-round pair."""
    runs: dict[str, list[R]] = {side: [] for side in SIDES}
    for i in range(rounds):
        for side in ORDERS[i % len(ORDERS)]:
            runs[side].append(run(side))
    return runs


def bootstrap_median(values: list[float], rounds: int = 10_000) -> tuple[float, float]:
    """A 95% interval of the median (percentile bootstrap, fixed seed)."""
    rng = random.Random(SEED)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(rounds))
    return medians[int(rounds * 0.025)], medians[int(rounds * 0.975) - 1]


@dataclass
class Ratio:
    """Same-round pairwise ratios a/b: their median and its bootstrap 95% interval."""

    ratios: list[float]
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, a: list[float], b: list[float]) -> Ratio:
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        return cls(ratios, statistics.median(ratios), *bootstrap_median(ratios))

    def text(self) -> str:
        return f"{self.median:.1%} (95% CI {self.low:.1%}-{self.high:.1%})"

    def runs(self) -> str:
        return ", ".join(f"{x:.1%}" for x in self.ratios)

    def verdict(self, target: float) -> str:
        """PASS/FAIL on the median; says so when the interval straddles the target."""
        verdict = "PASS" if self.median >= target else "FAIL"
        return verdict + (" (the CI straddles the target)" if self.low < target <= self.high
                          else "")


def _with_metrics(server: Server) -> int:
    """Add a `metrics:` section to the config of a not yet started netfilter Server."""
    path = Path(server.command[server.command.index("--config") + 1])
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    port = free_port()
    config["metrics"] = {"listen": f"{HOST}:{port}"}
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return port


def _scrape_cost(pids: list[int], port: int) -> tuple[list[float], int]:
    """CPU seconds each of `pids` spends per /metrics scrape (SCRAPE_BURST back to back,
    the server idle otherwise), and the size of the answer."""
    url = f"http://{HOST}:{port}/metrics"
    before = [dnsbench.process_cpu(pid) for pid in pids]
    size = 0
    for _ in range(SCRAPE_BURST):
        with urllib.request.urlopen(url, timeout=5) as response:
            size = len(response.read())
    return [(dnsbench.process_cpu(pid) - b) / SCRAPE_BURST
            for pid, b in zip(pids, before, strict=True)], size


def _check(server: Server, workload: Workload) -> None:
    problems = dnsbench.sanity_problems(server.port, workload, filtering=True)
    assert not problems, f"{server.name} answers wrongly: {problems}\n{server.log()}"
    errors = dnsbench.stderr_problems(server)
    assert not errors, f"{server.name} logged errors:\n" + "\n".join(errors[:20])


@needs_dns_tools
@pytest.mark.parametrize("share", [0.01, 0.10], ids=["1pct-blocked", "10pct-blocked"])
def test_dns_metrics_on_vs_off(share: float, tmp_path: Path, figures: Figures) -> None:
    workload = dnsbench.make_workload(tmp_path / "workload", blocked_share=share)
    with dnsbench.unbound_upstream(workload, tmp_path / "upstream") as upstream, \
            contextlib.ExitStack() as stack:
        servers = {side: dnsbench.netfilter_server(workload, tmp_path / side, upstream.port)
                   for side in SIDES}
        metrics_port = _with_metrics(servers["on"])
        for side, server in servers.items():
            server.name = f"netfilter-{side}"
            stack.enter_context(server)
        for server in servers.values():
            _check(server, workload)
            dnsbench.run_dnsperf(server, workload.queries, seconds=20, runs=1)  # warm-up
        scraper = Scraper(metrics_port, b"netfilter_dns_")
        print(f"\n(b) {share:.0%} blocked: {PAIRS} rounds of dnsperf -c 4 -l {SECONDS} "
              f"through metrics on, off and off2 (the control), the 6 orders in turn "
              f"(load average {os.getloadavg()[0]:.2f})")

        def run(side: str) -> PerfResult:
            server = servers[side]
            if side == "on":
                scraper.active.set()
            try:
                result = dnsbench.run_dnsperf(server, workload.queries, seconds=SECONDS)
            finally:
                scraper.active.clear()
            assert server.alive(), f"{server.name} died:\n{server.log()}"
            assert set(result.rcodes) <= {"NOERROR"}, result.rcodes
            return result

        try:
            runs = rotate(PAIRS, run)
        finally:
            scraper.close()
        for server in servers.values():
            _check(server, workload)
        on = servers["on"]
        assert on.proc is not None
        (per_scrape,), body = _scrape_cost([on.proc.pid], metrics_port)
    assert not scraper.failures, scraper.failures[:5]
    assert scraper.scrapes >= PAIRS * SECONDS // 2, scraper.scrapes
    qps = {side: [r.qps for r in runs[side]] for side in SIDES}
    cpu = {side: [r.server_cpu / r.qps for r in runs[side]] for side in SIDES}
    on_off, control, on_off2 = (Ratio.of(qps["on"], qps["off"]), Ratio.of(qps["off2"], qps["off"]),
                                Ratio.of(qps["on"], qps["off2"]))
    cpu_on_off, cpu_control = Ratio.of(cpu["on"], cpu["off"]), Ratio.of(cpu["off2"], cpu["off"])
    cpu_share = per_scrape / SCRAPE_EVERY / statistics.median(r.server_cpu for r in runs["on"])
    med = {side: statistics.median(qps[side]) for side in SIDES}
    verdict = on_off.verdict(METRICS_TARGET)
    for side in SIDES:
        rs = runs[side]
        print(f"  metrics {side:4}: median {med[side]:,.0f} q/s "
              f"(runs {', '.join(f'{r.qps:,.0f}' for r in rs)}); server cpu "
              f"{statistics.median(r.server_cpu for r in rs):.2f} cores; lost "
              f"{sum(r.lost for r in rs)}")
    print(f"  on/off pairwise: median {on_off.text()}; {on_off.runs()}; medians' ratio "
          f"{med['on'] / med['off']:.1%}; {scraper.scrapes} scrapes; target >= "
          f"{METRICS_TARGET:.0%}: {verdict}")
    print(f"  control, off2/off pairwise (two identical metrics-off servers): median "
          f"{control.text()}; {control.runs()}")
    print(f"  on/off2 pairwise: median {on_off2.text()}")
    print(f"  server CPU per query, pairwise: on/off {cpu_on_off.text()}, off2/off "
          f"{cpu_control.text()}")
    print(f"  one scrape of /metrics ({body:,} bytes) costs the idle server "
          f"{per_scrape * 1e3:.2f} ms CPU (mean of {SCRAPE_BURST}): at one a second, "
          f"{cpu_share:.2%} of the CPU it spends at full load")
    table = f"{METRICS_TABLE}, {share:.0%} blocked"
    note = f"median of {PAIRS} x {SECONDS} s"
    figures.row(table, "metrics off", f"{med['off']:,.0f} q/s ({note})")
    figures.row(table, "metrics off2 (control)", f"{med['off2']:,.0f} q/s ({note})")
    figures.row(table, "metrics on, scraped",
                f"{med['on']:,.0f} q/s ({scraper.scrapes} scrapes of /metrics)")
    figures.row(table, "on/off, median pairwise", on_off.text(), value=on_off.median)
    figures.row(table, "control off2/off, median pairwise", control.text())
    figures.row(table, "on/off2, median pairwise", on_off2.text())
    figures.row(table, "server CPU per query, on/off",
                f"{cpu_on_off.text()}; off2/off {cpu_control.text()}")
    figures.row(table, "CPU of one scrape (idle server)",
                f"{per_scrape * 1e3:.2f} ms ({body:,} bytes): {cpu_share:.2%} of its CPU at "
                "full load, at one scrape a second")
    figures.target(f"DNS q/s metrics on >= {METRICS_TARGET:.0%} of off ({share:.0%} blocked)",
                   table, "on/off, median pairwise", "min", METRICS_TARGET)


# ---------------------------------------------------------------- the proxy, metrics on/off


@dataclass
class ServedProxy(proxybench.Proxy):
    """`netfilter serve proxy --config`: the node's process, which starts the proxy as
    its mitmdump child; `metrics`: the node's metrics port (None: no metrics section).
    A Proxy of test_proxy_perf, so that its wrk run and checks take it; its `cpu()` is
    the node's and the child's together."""

    metrics: int | None = None

    stop_bound = 30.0  # serve waits up to 10 s for its child, then kills it

    def command(self) -> list[str]:
        assert self.config is not None
        return [NETFILTER, "serve", "proxy", "--config", str(self.config)]

    def start(self) -> ServedProxy:
        self.popen(self.command(), env=_clean_env(PYTHONUNBUFFERED="1"), cwd=self.directory,
                   new_session=True)
        assert self.proc is not None
        if proxybench.PIN:  # before serve starts its child (which inherits it)
            os.sched_setaffinity(self.proc.pid, {proxybench.PROXY_CPU})
        self.wait_until(self._ready, pause=0.1)
        return self

    def _ready(self) -> bool:
        if not listening(self.port):
            return False
        return self.metrics is None or http_status(
            f"http://{HOST}:{self.metrics}/readyz") == 200

    def child(self) -> int | None:
        """The mitmdump child's pid (None: not running)."""
        assert self.proc is not None
        try:
            pids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return None
        return int(pids.split()[0]) if pids.split() else None

    def pids(self) -> list[int]:
        assert self.proc is not None
        child = self.child()
        return [self.proc.pid] + ([child] if child is not None else [])

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += dnsbench.process_cpu(pid)
        return total

    def stop(self) -> int | None:
        child = self.child() if self.alive() else None
        status = super().stop()
        if child is not None:  # serve was killed before it stopped its child
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        return status


def served_proxy(name: str, workload: proxybench.Workload, directory: Path, *,
                 metrics: bool) -> ServedProxy:
    """A ServedProxy with test_proxy_perf's addon config (the list, stop page, audit
    log, allowed destinations) and, in the proxy's confdir, mitmproxy's config.yaml
    routing *.example to the origin (`netfilter_resolve`: mitmdump takes options it
    does not know yet from there, and applies them when the addon declares them)."""
    path = proxybench.write_config(workload, directory)
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    confdir = directory / "mitmproxy"
    confdir.mkdir(parents=True, exist_ok=True)
    (confdir / "config.yaml").write_text(yaml.safe_dump(
        {"netfilter_resolve": [f"*.example={HOST}"]}), encoding="utf-8")
    port = free_port()
    config["proxy"].update({"listen": f"{HOST}:{port}", "intercept": "none",
                            "confdir": str(confdir)})
    metrics_port = free_port() if metrics else None
    if metrics_port is not None:
        config["metrics"] = {"listen": f"{HOST}:{metrics_port}"}
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return ServedProxy(name, directory, Path(os.devnull), path, port=port,  # no router
                       metrics=metrics_port)


def _answers_as_listed(proxy: ServedProxy, workload: proxybench.Workload,
                       origin: proxybench.Origin) -> None:
    """Every URL of the cycle once: 451 naming its entry for the blocked 1%, the
    origin's page for the rest; no blocked URL reaches the origin; nothing logged."""
    before = origin.blocked_seen
    answers = proxybench.fetch_all(proxy, workload.urls)
    wrong = [(i, workload.urls[i], status) for i, (status, _) in enumerate(answers)
             if status != (451 if i in workload.refs else 200)]
    assert not wrong, f"{proxy.name}: {wrong[:10]}"
    for i, (_, body) in enumerate(answers):
        if i in workload.refs:
            assert workload.refs[i].encode() in body, (proxy.name, workload.urls[i])
        else:
            assert body == proxybench.Origin.BODY, (proxy.name, workload.urls[i])
    assert origin.blocked_seen == before, f"{proxy.name} forwarded blocked URLs"
    problems = proxybench.log_problems(proxy)
    assert not problems, f"{proxy.name} logged:\n" + "\n".join(problems[:20])


def _proxy_counts(port: int) -> dict[str, float]:
    """The node's netfilter_requests_total{frontend="proxy"} by verdict."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.labels["verdict"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "netfilter_requests_total" and s.labels.get("frontend") == "proxy"}


@contextlib.contextmanager
def _pinned(cpu: int | None) -> Iterator[None]:
    """This process (wrk, the origin, the scraper) on `cpu` (None: as it is)."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.skipif(bool(proxybench._missing()),
                    reason=f"{', '.join(proxybench._missing())} missing")
def test_proxy_metrics_on_vs_off(tmp_path: Path, figures: Figures) -> None:
    with _pinned(proxybench.CLIENT_CPU if proxybench.PIN else None), \
            contextlib.closing(proxybench.Origin().start()) as origin, \
            contextlib.ExitStack() as stack:
        workload = proxybench.make_workload(tmp_path / "workload", origin.port)
        origin.blocked = workload.blocked_keys
        script = proxybench.lua_script(workload, tmp_path / "cycle.lua")
        proxies = {side: served_proxy(side, workload, tmp_path / side, metrics=side == "on")
                   for side in SIDES}
        for proxy in proxies.values():
            stack.callback(proxy.stop)
            proxy.start()
        on = proxies["on"]
        assert on.metrics is not None
        for proxy in proxies.values():
            _answers_as_listed(proxy, workload, origin)
        counted_before = _proxy_counts(on.metrics)
        answered: dict[str, int] = {}  # by the "on" proxy under wrk: status -> count

        def run(side: str, seconds: float = PROXY_SECONDS) -> proxybench.WrkResult:
            proxy = proxies[side]
            if side == "on":
                scraper.active.set()
            try:
                result = proxybench.measured(proxy, script, origin, workload, seconds=seconds,
                                             connections=proxybench.CONNECTIONS)
            finally:
                scraper.active.clear()
            if side == "on":
                for code, count in result.codes.items():
                    answered[str(code)] = answered.get(str(code), 0) + count
            return result

        scraper = Scraper(on.metrics, b"netfilter_proxy_requests_total")
        print(f"\n(c) proxy: {PROXY_PAIRS} rounds of wrk -t1 -c{proxybench.CONNECTIONS} "
              f"-d{PROXY_SECONDS}s through `netfilter serve proxy` with metrics on, off and "
              f"off2 (the control), the 6 orders in turn (load average "
              f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; "
              + (f"each node and its mitmdump on CPU {proxybench.PROXY_CPU}, wrk, the origin "
                 f"and the scraper on CPU {proxybench.CLIENT_CPU})" if proxybench.PIN
                 else "not pinned)"))
        try:
            for side in SIDES:  # warm-up
                run(side, proxybench.WARMUP_SECONDS)
            runs = rotate(PROXY_PAIRS, run)
        finally:
            scraper.close()
        for proxy in proxies.values():
            _answers_as_listed(proxy, workload, origin)
        counted = _proxy_counts(on.metrics)
        per_scrape, body = _scrape_cost(on.pids(), on.metrics)
    assert not scraper.failures, scraper.failures[:5]
    assert scraper.scrapes >= PROXY_PAIRS * PROXY_SECONDS // 2, scraper.scrapes
    # the node's counters saw what wrk saw (and the second check's 1,000 URLs); requests
    # still in flight when wrk stopped may add up to `connections` a run
    slack = (PROXY_PAIRS + 1) * proxybench.CONNECTIONS
    blocks = counted.get("block", 0) - counted_before.get("block", 0)
    allows = counted.get("allow", 0) - counted_before.get("allow", 0)
    assert answered.get("451", 0) + len(workload.refs) <= blocks <= (
        answered.get("451", 0) + len(workload.refs) + slack), (blocks, answered)
    assert answered.get("200", 0) + len(workload.urls) - len(workload.refs) <= allows <= (
        answered.get("200", 0) + len(workload.urls) - len(workload.refs) + slack), (
        allows, answered)

    rps = {side: [r.rps for r in runs[side]] for side in SIDES}
    cpu = {side: [proxybench.cpu_per_request_us(r) for r in runs[side]] for side in SIDES}
    on_off, control, on_off2 = (Ratio.of(rps["on"], rps["off"]), Ratio.of(rps["off2"], rps["off"]),
                                Ratio.of(rps["on"], rps["off2"]))
    cpu_on_off, cpu_control = Ratio.of(cpu["on"], cpu["off"]), Ratio.of(cpu["off2"], cpu["off"])
    med = {side: statistics.median(rps[side]) for side in SIDES}
    node_scrape, child_scrape = per_scrape[0], sum(per_scrape[1:])
    cpu_share = ((node_scrape + child_scrape) / SCRAPE_EVERY
                 / statistics.median(r.proxy_cpu for r in runs["on"]))
    verdict = on_off.verdict(PROXY_TARGET)
    print("\n".join([
        *(proxybench._runs(f"metrics {side}", runs[side]) for side in SIDES),
        f"on/off pairwise: median {on_off.text()}; {on_off.runs()}; medians' ratio "
        f"{med['on'] / med['off']:.1%}; {scraper.scrapes} scrapes; target >= "
        f"{PROXY_TARGET:.0%}: {verdict}",
        f"control, off2/off pairwise (two identical metrics-off nodes): median "
        f"{control.text()}; {control.runs()}",
        f"on/off2 pairwise: median {on_off2.text()}",
        f"CPU per request (node + mitmdump), pairwise: on/off {cpu_on_off.text()}, off2/off "
        f"{cpu_control.text()}",
        f"one scrape of /metrics ({body:,} bytes) costs the idle node "
        f"{node_scrape * 1e3:.2f} ms CPU and its mitmdump child {child_scrape * 1e3:.2f} ms "
        f"(mean of {SCRAPE_BURST}): at one a second, {cpu_share:.2%} of the CPU they spend "
        "at full load",
    ]))
    note = f"median of {PROXY_PAIRS} x {PROXY_SECONDS} s"
    figures.row(PROXY_TABLE, "metrics off", f"{med['off']:,.0f} req/s ({note})")
    figures.row(PROXY_TABLE, "metrics off2 (control)", f"{med['off2']:,.0f} req/s ({note})")
    figures.row(PROXY_TABLE, "metrics on, scraped",
                f"{med['on']:,.0f} req/s ({scraper.scrapes} scrapes of /metrics)")
    figures.row(PROXY_TABLE, "on/off, median pairwise", on_off.text(), value=on_off.median)
    figures.row(PROXY_TABLE, "control off2/off, median pairwise", control.text())
    figures.row(PROXY_TABLE, "on/off2, median pairwise", on_off2.text())
    figures.row(PROXY_TABLE, "CPU per request, on/off",
                f"{cpu_on_off.text()}; off2/off {cpu_control.text()}")
    figures.row(PROXY_TABLE, "CPU of one scrape (idle node)",
                f"node {node_scrape * 1e3:.2f} ms + mitmdump {child_scrape * 1e3:.2f} ms "
                f"({body:,} bytes): {cpu_share:.2%} of their CPU at full load, at one "
                "scrape a second")
    figures.target(f"proxy req/s metrics on >= {PROXY_TARGET:.0%} of off", PROXY_TABLE,
                   "on/off, median pairwise", "min", PROXY_TARGET)
