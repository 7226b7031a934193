"""List updates under load: 20 swaps of the list while dnsperf and wrk run.

    .venv/bin/python -m pytest benchmarks/test_reload_under_load.py -q -m slow -s \
        -p no:cacheprovider

One real `netfilter serve --config` with dns, proxy, stoppage, metrics and audit (config
written here), a local unbound upstream answering every name of the query file from
local data (dnsbench), and test_proxy_perf's HTTP origin on 127.0.0.1, which the proxy
reaches through the addon's `netfilter_resolve` (mitmproxy's config.yaml in the
proxy's confdir, as test_service_perf does it).

The lists: VERSIONS bundles of one list ("swap"), built with the project's builder
(`build_bundle`, signed by a fresh authority key), versions 1..SWAPS+1. Version N blocks
  - what every version blocks: the domain `shared.example` (and its subdomains) and the
    URL prefix `http://urls.example/shared/`;
  - what only version N blocks: the domain `v{N}-only.example` and the URL prefix
    `http://urls.example/v{N}/`;
  - PADDING filler domains `pad{N}-{i}.invalid` (never asked), so that a reload loads
    a list of some size.
The node starts with version 1. Swap k (1..SWAPS) installs version k+1 the way an
operator's tooling does: the bundle is written beside the configured path and renamed
over it, then serve gets SIGHUP (it reloads its lists and signals its mitmdump child,
which reloads its own).

The load, for the whole time of the swaps:
  - dnsperf (-c 4, at most DNS_QPS q/s) over a query file of clean names (NOERROR from
    the upstream), `shared.example` names (always NXDOMAIN: `action: nxdomain`) and the
    `v{N}-only.example` names of every version (NXDOMAIN while version N is in force,
    NOERROR otherwise);
  - wrk (-t1 -c4) through the proxy with a Lua script cycling clean URLs (200),
    shared URLs (451) and the URLs of every version (451 while it is in force);
  - two probes in this process, each asking one name or URL at a time: every answer
    is checked against the versions that can have been in force between the time it
    was asked and the time it came back (see `Timeline`).

Asserted: dnsperf lost 0 queries and saw only NOERROR and NXDOMAIN, with NXDOMAIN
as many as the shared lines sent plus VERSION_LINES per pass of the file (one version
in force at a time), within the lines of the passes a swap falls into; wrk had no
socket errors or timeouts and saw only 200 and 451, the 451s 6 per cycle of its URLs
(4 shared, 2 of the version in force), within the same slack; the origin never saw
a shared (always blocked) URL; every probe answer is one the versions possibly in
force give, and every answer asked after a swap was confirmed (and before the next
SIGHUP) is exactly the new version's; after each swap (polled, bounded by
SETTLE_BOUND) `dig` of the new version's name is NXDOMAIN and of the old version's
name NOERROR, and through the proxy the new version's domain and URL answer 451 and
the old one's 200; `netfilter_reloads_total{result="ok"}` moved by SWAPS and
`refused` not at all, `netfilter_list_version` is the last version, the mitmdump
child logged SWAPS list reloads; the node exits 0 on SIGTERM, logs no error or
traceback, and `netfilter audit verify` accepts its audit log.

Figures (printed, recorded in the figures table; never asserted): q/s and req/s during
the swaps (dnsperf's and wrk's own, and the node's counters over exactly the swap
window), time from SIGHUP to the reload counted in /metrics (the DNS engine) and to
the child's "lists reloaded" line (the proxy), per swap.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests.support import ChildProcess, free_port, listening

import dnsbench
import test_proxy_perf as proxybench
from netfilter.keys import generate_keypair, load_private_key
from netfilter.listfile import build_bundle
from support import Figures
from swapload import (
    VERSION_LINES,
    Queries,
    only,
    shared_urls,
    upstream,
    url_cycle,
    version_urls,
    write_queries,
)

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
NETFILTER = str(VENV_BIN / "netfilter")

SWAPS = int(os.environ.get("BENCH_RELOAD_SWAPS", "20"))
VERSIONS = SWAPS + 1
PADDING = 2000  # filler entries per version
DNS_QPS = int(os.environ.get("BENCH_RELOAD_QPS", "20000"))  # dnsperf -Q
DNS_CLIENTS = 4
WRK_CONNECTIONS = 4
LEAD = 2.0  # seconds of load before the first swap
PAUSE = 0.5  # seconds of load between a swap settled and the next SIGHUP
TAIL = 1.0  # seconds of load after the last swap
RELOAD_BOUND = 20.0  # seconds a reload may take to show (metrics, the child's log)
SETTLE_BOUND = 10.0  # seconds the checks after a swap may poll
LOAD_BOUND = 600.0  # the tools' -l / -d: they are interrupted (SIGINT) long before
STOP_BOUND = 30.0
TABLE = f"List swaps under load: {SWAPS} swaps, dnsperf + wrk through one node"

WRK = shutil.which("wrk")
_MISSING = [*dnsbench.missing_tools(),
            *([] if WRK else ["wrk"]),
            *([] if shutil.which("dig") else ["dig (dnsutils)"]),
            *([] if (VENV_BIN / "mitmdump").exists() else ["mitmdump (the proxy extra)"])]
needs_tools = pytest.mark.skipif(bool(_MISSING), reason=f"{', '.join(_MISSING)} missing")


def write_versions(directory: Path) -> tuple[list[Path], Path]:
    """Bundles of versions 1..VERSIONS (the builder's way) and the authority's key."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = generate_keypair(directory / "authority")
    key = load_private_key(key_path)
    bundles = []
    for n in range(1, VERSIONS + 1):
        entries: list[dict[str, str]] = [
            {"domain": "shared.example", "ref": "SW-SHARED", "category": "benchmark"},
            {"url": "http://urls.example/shared/", "ref": "SW-SHARED-URL",
             "category": "benchmark"},
            {"domain": only(n), "ref": f"SW-V{n}", "category": "benchmark"},
            {"url": f"http://urls.example/v{n}/", "ref": f"SW-V{n}-URL",
             "category": "benchmark"},
        ]
        entries += [{"domain": f"pad{n}-{i}.invalid", "ref": f"SW-P{n}-{i}",
                     "category": "benchmark"} for i in range(PADDING)]
        source = directory / f"v{n}.yaml"
        source.write_text(yaml.safe_dump({
            "issuer": "Swap benchmark authority (synthetic)",
            "legal_basis": "Benchmark only: synthetic list of reserved names",
            "contact": "mailto:appeals@authority.example",
            "entries": entries}, sort_keys=False), encoding="utf-8")
        out = directory / f"v{n}.nfl"
        build_bundle(source, out, key=key, list_id="swap", version=n)
        bundles.append(out)
    return bundles, pub_path


def install(bundle: Path, target: Path) -> None:
    """Write `bundle` beside `target`, then rename it over `target` (atomic)."""
    temporary = target.with_name(f".{target.name}.new")
    shutil.copyfile(bundle, temporary)
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, target)


# ---------------------------------------------------------------- the DNS workload


# ---------------------------------------------------------------- the proxy workload


@dataclass
class Urls:
    urls: list[str]  # what proxybench.lua_script reads


def cycle(port: int) -> Urls:
    return Urls(url_cycle(port, VERSIONS))


# ---------------------------------------------------------------- the node


class Node(ChildProcess):
    """`netfilter serve --config` with every part; its output in serve.log."""

    name = "netfilter serve"
    start_bound = 60.0
    stop_bound = STOP_BOUND

    def __init__(self, directory: Path, bundle: Path, trust: Path, upstream_port: int,
                 origin_port: int) -> None:
        self.directory = directory
        self.bundle = bundle
        self.log_path = directory / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.dns_port, self.proxy_port = free_port(), free_port()
        self.stoppage_port, self.metrics_port = free_port(), free_port()
        confdir = directory / "mitmproxy"
        confdir.mkdir(parents=True, exist_ok=True)
        (confdir / "config.yaml").write_text(yaml.safe_dump(
            {"netfilter_resolve": [f"*.example={HOST}"]}), encoding="utf-8")
        self.audit = directory / "audit.sqlite"
        self.node_pub = directory / "node.pub"
        config = {
            "node": {"id": "swap-bench", "key": str(directory / "node.key")},
            "lists": [{"path": str(bundle), "trust": [str(trust)], "action": "nxdomain"}],
            "dns": {"listen": [f"{HOST}:{self.dns_port}"],  # one process, one engine
                    "upstreams": [f"{HOST}:{upstream_port}"], "timeout": 2.0, "workers": 1},
            "proxy": {"listen": f"{HOST}:{self.proxy_port}", "intercept": "none",
                      "confdir": str(confdir),
                      "allowed_destinations": ["127.0.0.0/8", "*.example"]},
            "stoppage": {"listen": f"{HOST}:{self.stoppage_port}"},
            "audit": {"path": str(self.audit), "client": "none", "checkpoint_interval": 5},
            "metrics": {"listen": f"{HOST}:{self.metrics_port}"},
        }
        self.conf = directory / "netfilter.yaml"
        self.conf.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.origin_port = origin_port

    def start(self) -> Node:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONUNBUFFERED"] = "1"
        self.popen([NETFILTER, "serve", "--config", str(self.conf)], env=env,
                   cwd=self.directory, new_session=True)
        self.wait_until(self._ready, pause=0.1)
        return self

    def _ready(self) -> bool:
        if "netfilter: serving" not in self.log() or not listening(self.proxy_port):
            return False
        return proxy_status(self.proxy_port, shared_urls(self.origin_port)[0]) == 451

    def hup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=5) as response:
            text = response.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def child_reloads(self) -> int:
        return self.log().count("netfilter: lists reloaded")


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# ---------------------------------------------------------------- clients


def dig(port: int, name: str) -> str:
    """The status dig reports for `name` A (NOERROR, NXDOMAIN, ...; "" for none)."""
    done = subprocess.run(["dig", f"@{HOST}", "-p", str(port), name, "A", "+tries=1",
                           "+time=2", "+noall", "+comments"], capture_output=True, text=True,
                          timeout=10, check=False)
    found = re.search(r"status: ([A-Z]+)", done.stdout)
    return found.group(1) if found else ""


def proxy_status(port: int, url: str, timeout: float = 5.0) -> int | None:
    """GET `url` through the proxy on its own connection: the status (None: none)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", url, headers={"Host": url.split("/", 3)[2]})
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


@dataclass
class Timeline:
    """When each version was asked for (SIGHUP) and seen in force, per front-end.

    Version 1 is in force from the start. Version n (n >= 2) may answer from its
    SIGHUP on, and version n-1 until the reload to n is seen done (the metrics
    counter for DNS, the child's log line for the proxy): those times bound the swap
    from outside. An answer is checked against every version that may have been in
    force at some moment between its question and its answer."""

    hup: dict[int, float] = field(default_factory=lambda: {1: float("-inf")})
    done: dict[str, dict[int, float]] = field(
        default_factory=lambda: {"dns": {1: float("-inf")}, "proxy": {1: float("-inf")}})

    def possible(self, frontend: str, asked: float, answered: float) -> set[int]:
        done = self.done[frontend]
        out = set()
        for n, start in self.hup.items():
            end = done.get(n + 1, float("inf")) if (n + 1) in self.hup else float("inf")
            if start <= answered and asked <= end:
                out.add(n)
        return out

    def exact(self, frontend: str, asked: float, answered: float) -> int | None:
        """The one version in force over [asked, answered], if only one can be."""
        found = self.possible(frontend, asked, answered)
        return next(iter(found)) if len(found) == 1 else None


def blocks(n: int, what: str) -> bool | None:
    """Does version `n` block `what` (a name or URL)? None: every version does."""
    if "shared" in what:
        return None
    found = re.search(r"v(\d+)-only\.example|urls\.example:\d+/v(\d+)/", what)
    assert found, what
    return int(found.group(1) or found.group(2)) == n


@dataclass
class Probe:
    """Answers of one front-end, one question at a time, in a thread."""

    frontend: str
    ask: Any  # (what) -> answer, None on no answer
    questions: list[str]
    answers: list[tuple[float, float, str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> Probe:
        def run() -> None:
            i = 0
            while not self.stop.is_set():
                what = self.questions[i % len(self.questions)]
                i += 1
                asked = time.monotonic()
                try:
                    answer = self.ask(what)
                except Exception as e:  # recorded, failed below
                    self.errors.append(f"{what}: {e!r}")
                    answer = None
                self.answers.append((asked, time.monotonic(), what, answer))
                time.sleep(0.005)

        self.thread = threading.Thread(target=run, name=f"probe-{self.frontend}", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(15)


def dns_answer(port: int, name: str) -> str | None:
    try:
        reply = dns.query.udp(dns.message.make_query(name, "A"), HOST, port=port, timeout=3)
    except (dns.exception.DNSException, OSError):
        return None
    return dns.rcode.to_text(reply.rcode())


def check_answers(probe: Probe, timeline: Timeline, yes: object, no: object
                  ) -> tuple[int, int, list[str]]:
    """(answers checked, of them exact, what was wrong)."""
    wrong: list[str] = []
    exact = 0
    for asked, answered, what, answer in probe.answers:
        versions = timeline.possible(probe.frontend, asked, answered)
        every = blocks(1, what) is None
        allowed = {yes} if every else {yes if blocks(n, what) else no for n in versions}
        if timeline.exact(probe.frontend, asked, answered) is not None:
            exact += 1
        if answer not in allowed:
            wrong.append(f"{what}: {answer} at {asked:.3f}-{answered:.3f} (versions "
                         f"{sorted(versions)} allow {sorted(map(str, allowed))})")
    return len(probe.answers), exact, wrong


# ---------------------------------------------------------------- the load


@dataclass
class Load:
    """dnsperf and wrk, started now, interrupted (SIGINT) by `finish`."""

    dnsperf: subprocess.Popen[str]
    wrk: subprocess.Popen[str]

    @staticmethod
    def start(node: Node, queries: Queries, script: Path) -> Load:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        dnsperf = subprocess.Popen(
            ["dnsperf", "-s", HOST, "-p", str(node.dns_port), "-d", str(queries.path),
             "-c", str(DNS_CLIENTS), "-Q", str(DNS_QPS), "-t", "5", "-l", f"{LOAD_BOUND:g}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wrk = subprocess.Popen(
            [str(WRK), "-t1", f"-c{WRK_CONNECTIONS}", f"-d{LOAD_BOUND:g}s", "--timeout", "5s",
             "-s", str(script), f"http://{HOST}:{node.proxy_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        return Load(dnsperf, wrk)

    def alive(self) -> bool:
        return self.dnsperf.poll() is None and self.wrk.poll() is None

    def finish(self) -> tuple[str, str]:
        outputs = []
        for proc in (self.dnsperf, self.wrk):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate(timeout=10)
            outputs.append(out)
        return outputs[0], outputs[1]


def wait(predicate: Any, bound: float, pause: float = 0.01) -> float | None:
    """Poll `predicate` until true: the monotonic time it was (None: not within bound)."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(pause)
    return None


# ---------------------------------------------------------------- the test


@pytest.fixture
def origin() -> Iterator[proxybench.Origin]:
    server = proxybench.Origin().start()
    try:
        yield server
    finally:
        server.close()


@needs_tools
def test_swaps_under_load(tmp_path: Path, origin: proxybench.Origin,
                          figures: Figures) -> None:
    bundles, trust = write_versions(tmp_path / "lists")
    queries = write_queries(tmp_path, VERSIONS)
    urls = cycle(origin.port)
    origin.blocked = frozenset(u.split("/", 2)[2].replace(f":{origin.port}", "").encode()
                               for u in shared_urls(origin.port))
    script = proxybench.lua_script(Urls(urls.urls), tmp_path / "cycle.lua")  # type: ignore[arg-type]
    target = tmp_path / "installed" / "swap.nfl"
    target.parent.mkdir()
    install(bundles[0], target)

    with contextlib.ExitStack() as stack:
        up = upstream(tmp_path / "upstream", queries).start()
        stack.callback(up.stop)
        node = Node(tmp_path / "node", target, trust, up.port, origin.port)
        stack.callback(node.stop)
        node.start()
        assert dig(node.dns_port, only(1)) == "NXDOMAIN"
        assert dig(node.dns_port, only(2)) == "NOERROR"
        assert dig(node.dns_port, "c0.clean.example") == "NOERROR"
        before = node.scrape()
        reloads_before = metric(before, "netfilter_reloads_total", result="ok")
        refused_before = metric(before, "netfilter_reloads_total", result="refused")
        child_before = node.child_reloads()

        timeline = Timeline()
        dns_probe = Probe("dns", lambda name: dns_answer(node.dns_port, name),
                          ["shared.example"] + [only(n) for n in range(1, VERSIONS + 1)])
        proxy_questions = [shared_urls(origin.port)[1]]
        for n in range(1, VERSIONS + 1):
            proxy_questions += version_urls(origin.port, n)
        proxy_probe = Probe("proxy", lambda url: proxy_status(node.proxy_port, url),
                            proxy_questions)
        load = Load.start(node, queries, script)
        stack.callback(lambda: load.finish() if load.alive() else None)
        dns_probe.start()
        stack.callback(dns_probe.close)
        proxy_probe.start()
        stack.callback(proxy_probe.close)
        time.sleep(LEAD)
        assert load.alive(), "dnsperf or wrk ended before the swaps"

        swaps: list[tuple[int, float, float, float]] = []  # version, dns, proxy, settled
        window_start = time.monotonic()
        counters_start = node.scrape()
        for k in range(1, SWAPS + 1):
            version = k + 1
            install(bundles[version - 1], target)
            hup = time.monotonic()
            timeline.hup[version] = hup
            node.hup()
            dns_done = wait(lambda k=k: metric(node.scrape(), "netfilter_reloads_total",
                                               result="ok") >= reloads_before + k,
                            RELOAD_BOUND)
            assert dns_done is not None, f"swap {k}: no reload counted\n{node.log()[-3000:]}"
            timeline.done["dns"][version] = dns_done
            proxy_done = wait(lambda k=k: node.child_reloads() >= child_before + k,
                              RELOAD_BOUND)
            assert proxy_done is not None, f"swap {k}: the proxy child did not reload\n" \
                f"{node.log()[-3000:]}"
            timeline.done["proxy"][version] = proxy_done
            old_url, new_url = version_urls(origin.port, k), version_urls(origin.port, version)

            def settled(old_url: list[str] = old_url, new_url: list[str] = new_url,
                        k: int = k, version: int = version) -> bool:
                return (dig(node.dns_port, only(version)) == "NXDOMAIN"
                        and dig(node.dns_port, only(k)) == "NOERROR"
                        and all(proxy_status(node.proxy_port, u) == 451 for u in new_url)
                        and all(proxy_status(node.proxy_port, u) == 200 for u in old_url))

            settled_at = wait(settled, SETTLE_BOUND, pause=0.1)
            assert settled_at is not None, (
                f"swap {k} -> version {version} not in force within {SETTLE_BOUND} s: "
                f"dig {only(version)} {dig(node.dns_port, only(version))}, "
                f"dig {only(k)} {dig(node.dns_port, only(k))}, proxy new "
                f"{[proxy_status(node.proxy_port, u) for u in new_url]}, old "
                f"{[proxy_status(node.proxy_port, u) for u in old_url]}")
            swaps.append((version, dns_done - hup, proxy_done - hup, settled_at - hup))
            assert load.alive(), f"dnsperf or wrk ended during swap {k}"
            time.sleep(PAUSE)
        time.sleep(TAIL)
        counters_end = node.scrape()
        window = time.monotonic() - window_start
        assert load.alive(), "dnsperf or wrk ended before the swaps were done"
        dns_probe.close()
        proxy_probe.close()
        dnsperf_out, wrk_out = load.finish()
        after = node.scrape()
        status = node.stop()
        up.stop()
    log = node.log()

    # ------------------------------------------------------------ dnsperf
    perf = dnsbench.parse_dnsperf("netfilter", dnsperf_out)
    shared_sent, version_sent = queries.sent(perf.sent)
    assert perf.lost == 0, dnsperf_out
    assert set(perf.rcodes) <= {"NOERROR", "NXDOMAIN"}, perf.rcodes
    interrupted = perf.sent - perf.completed - perf.lost  # in flight at the SIGINT
    nx = perf.rcodes.get("NXDOMAIN", 0)
    assert shared_sent - interrupted <= nx <= shared_sent + version_sent, (
        nx, shared_sent, version_sent, perf.rcodes)
    # Tighter: at any moment exactly one version is in force, so each pass of the file
    # gets VERSION_LINES blocked version lines, but for the passes a swap falls into.
    expected_nx = shared_sent + VERSION_LINES * perf.sent / len(queries.lines)
    nx_slack = VERSION_LINES * (SWAPS + 2) + interrupted
    assert abs(nx - expected_nx) <= nx_slack, (nx, expected_nx, nx_slack, perf.rcodes)

    # ------------------------------------------------------------ wrk
    line = next((x for x in wrk_out.splitlines() if x.startswith("NFBENCH ")), None)
    assert line is not None, wrk_out
    raw = json.loads(line.removeprefix("NFBENCH "))
    codes = {int(c): v for c, v in raw["codes"].items()}
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    assert errors == 0, raw
    assert set(codes) <= {200, 451}, codes
    # Each pass of the cycle has 4 shared URLs and 2 of the version in force: 451s
    # for exactly those, but for the passes a swap falls into and the requests in
    # flight when wrk stopped.
    blocked_share = 6 / len(urls.urls)
    expected_451 = raw["requests"] * blocked_share
    slack_451 = 2 * (SWAPS + 2) + WRK_CONNECTIONS
    assert abs(codes.get(451, 0) - expected_451) <= slack_451, (
        codes, raw["requests"], expected_451, slack_451)
    assert origin.blocked_seen == 0, f"the origin saw {origin.blocked_seen} shared URLs"
    assert origin.bad == 0
    wrk_rps = raw["requests"] / (raw["duration_us"] / 1e6)

    # ------------------------------------------------------------ the probes
    dns_n, dns_exact, dns_wrong = check_answers(dns_probe, timeline, "NXDOMAIN", "NOERROR")
    px_n, px_exact, px_wrong = check_answers(proxy_probe, timeline, 451, 200)
    assert not dns_probe.errors and not proxy_probe.errors, (
        dns_probe.errors[:5], proxy_probe.errors[:5])
    assert not dns_wrong, f"{len(dns_wrong)} wrong DNS answers of {dns_n}: {dns_wrong[:10]}"
    assert not px_wrong, f"{len(px_wrong)} wrong proxy answers of {px_n}: {px_wrong[:10]}"
    assert dns_exact >= SWAPS and px_exact >= SWAPS, (dns_exact, px_exact)

    # ------------------------------------------------------------ the node
    assert metric(after, "netfilter_reloads_total", result="ok") == reloads_before + SWAPS
    assert metric(after, "netfilter_reloads_total", result="refused") == refused_before
    assert metric(after, "netfilter_list_version", list="swap", source="authority") == VERSIONS
    assert node.child_reloads() == child_before + SWAPS, log[-3000:]
    assert status == 0, log[-5000:]
    problems = [x for x in log.splitlines()
                if re.search(r"Traceback|ERROR|error:|CRITICAL|refused", x)]
    assert not problems, problems[:20]
    verified = subprocess.run([NETFILTER, "audit", "verify", "--log", str(node.audit),
                               "--trust", str(node.node_pub)], capture_output=True, text=True,
                              timeout=120, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # ------------------------------------------------------------ figures
    def served(samples: Any, frontend: str) -> float:
        return sum(v for (name, labels), v in samples.items()
                   if name == "netfilter_requests_total" and ("frontend", frontend) in labels)

    node_qps = (served(counters_end, "dns") - served(counters_start, "dns")) / window
    node_rps = (served(counters_end, "proxy") - served(counters_start, "proxy")) / window
    dns_times = [s[1] for s in swaps]
    proxy_times = [s[2] for s in swaps]
    settle_times = [s[3] for s in swaps]

    def spread(xs: list[float]) -> str:
        return (f"median {statistics.median(xs) * 1e3:.0f} ms, min {min(xs) * 1e3:.0f}, "
                f"max {max(xs) * 1e3:.0f}")

    print(f"\n{TABLE} (load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)")
    print(f"  dnsperf -c{DNS_CLIENTS} -Q{DNS_QPS}: {perf.qps:,.0f} q/s over {perf.seconds:.1f} s, "
          f"{perf.sent:,} sent, {perf.completed:,} completed, {perf.lost} lost, "
          f"{interrupted} in flight at the end; {perf.rcodes} (NXDOMAIN expected "
          f"{expected_nx:,.0f} +- {nx_slack})")
    print(f"  wrk -t1 -c{WRK_CONNECTIONS}: {wrk_rps:,.0f} req/s, {raw['requests']:,} requests "
          f"{codes}, socket errors {errors}, latency p50 {raw['p50'] / 1000:.1f} ms p99 "
          f"{raw['p99'] / 1000:.1f} ms max {raw['max'] / 1000:.1f} ms (451 expected "
          f"{expected_451:,.0f} +- {slack_451})")
    print(f"  node counters over the {window:.1f} s of swaps: dns {node_qps:,.0f} q/s, "
          f"proxy {node_rps:,.0f} req/s")
    print(f"  SIGHUP -> reload counted (dns engine): {spread(dns_times)}")
    print(f"  SIGHUP -> the child's 'lists reloaded' (proxy): {spread(proxy_times)}")
    print(f"  SIGHUP -> dig and proxy checks all as the new version: {spread(settle_times)}")
    print(f"  probes: dns {dns_n} answers ({dns_exact} with one version possible), proxy "
          f"{px_n} ({px_exact}); all right")
    for version, d, p, s in swaps:
        print(f"    v{version}: dns {d * 1e3:.0f} ms, proxy {p * 1e3:.0f} ms, settled "
              f"{s * 1e3:.0f} ms")
    figures.row(TABLE, "dnsperf during the swaps",
                f"{perf.qps:,.0f} q/s ({perf.lost} lost, {perf.rcodes})", value=perf.qps)
    figures.row(TABLE, "wrk during the swaps",
                f"{wrk_rps:,.0f} req/s ({codes}, {errors} socket errors)", value=wrk_rps)
    figures.row(TABLE, "node counters, swap window",
                f"dns {node_qps:,.0f} q/s, proxy {node_rps:,.0f} req/s over {window:.1f} s")
    figures.row(TABLE, "SIGHUP -> reload counted (dns)", spread(dns_times))
    figures.row(TABLE, "SIGHUP -> child reloaded (proxy)", spread(proxy_times))
    figures.row(TABLE, "SIGHUP -> checks settled", spread(settle_times))
    print(f"----- serve.log (tail) -----\n{log[-3000:]}", file=sys.stderr)
