"""Soak: `netfilter serve` under steady DNS + proxy load for 10 minutes, a list update
every minute through the node's own update machinery.

    NETFILTER_SOAK=1 .venv/bin/python -m pytest benchmarks/test_soak.py -q -s \
        -p no:cacheprovider                                        # 600 s of load
    NETFILTER_SOAK_SECONDS=120 .venv/bin/python -m pytest benchmarks/test_soak.py -q -s \
        -p no:cacheprovider                                        # a quick run

NETFILTER_SOAK_PERIOD=5 makes many more, closer updates (memory over many list swaps).

Skipped unless NETFILTER_SOAK=1 or NETFILTER_SOAK_SECONDS is set: `make test` never
collects benchmarks/ (pyproject's testpaths), and `make bench` should not take 10
minutes more. The update period is min(60 s, duration / 10), so a quick run makes the
same nine updates, closer together.

One real node from a config (dns, proxy, stoppage, metrics, audit, updates), on loopback
only: a local unbound upstream answering every name asked from local data (dnsbench),
test_proxy_perf's HTTP origin, reached through the addon's `netfilter_resolve`. The list
has a `source`, a local directory this test publishes to, and `updates.interval` is
UPDATE_INTERVAL seconds: every update goes through serve's periodic check (fetch, delta,
verify, sanity checks, install, reload of the engine and of the mitmdump child).

The versions (built before the load with `netfilter list build`, each N >= 2 with
`--diff-from` version N-1, so every version has a full bundle and a delta): every version
blocks `shared.example` and `http://urls.example/shared/`; version N alone blocks
`v{N}-only.example` and `http://urls.example/v{N}/`; PADDING `.invalid` filler domains
keep the list at ~2,000 entries. Update k publishes version k+1 at k periods after the
load started: the full bundle alone (the node finds no delta from its version and fetches
it whole), or the delta first and then the full bundle (the node applies the delta), and
once, version HELD_AT+1, HELD_EXTRA more filler entries (+35 %, past
`updates.max_entry_change` 0.2): the node holds it, the old version stays in force, and
this test confirms it with `netfilter list confirm soak N --config FILE`; serve's next
periodic check then puts it in force (since commit 9521782; no SIGHUP is sent).

Load: first CAPACITY_SECONDS of dnsperf and wrk together, each as fast as it can (the
node's capacity under both loads at once, on this machine now); then, for the soak,
dnsperf -Q at LOAD_SHARE of the measured q/s and wrk paced by its Lua script at
LOAD_SHARE of the measured req/s (wrk has no rate option and Debian has no wrk2: the
script's `delay()` keeps each request on a fixed schedule, read from CLOCK_MONOTONIC
through LuaJIT's ffi). Both run for exactly the soak's duration and end by themselves,
so dnsperf's counts are whole (no query in flight is cut off).

Asserted: dnsperf lost 0 queries and saw only NOERROR and NXDOMAIN; wrk had no socket
errors or timeouts and saw only 200 and 451 (451: a blocked URL); the origin never saw
a shared URL; after each update the node's list version is the new one and, polled
within SETTLE_BOUND, DNS and the proxy block the new version's name and URL and pass the
old one's; a held version is not in force until confirmed; the NXDOMAIN and 451 counts
fit one version in force at a time (as in test_reload_under_load); the resident memory
(VmRSS) of serve plus its mitmdump child, sampled every period/12 (5 s), grows less
than MEMORY_GROWTH from the 2nd period (minute 2: median of its samples) to the last
(minute 10); `netfilter audit verify` accepts the audit log; its block events, summed
with their aggregated `count`, equal the blocked answers every client got: per front-end,
dnsperf's NXDOMAIN (capacity run + soak) plus this test's own probes for DNS, and wrk's
451s plus the probes' for the proxy (up to the requests wrk had in flight when each of
its runs ended, which the proxy answered and wrk did not count).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
import yaml
from tests.support import ChildProcess, free_port, listening, read_events

import dnsbench
import test_proxy_perf as proxybench
from netfilter.keys import generate_keypair
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
from test_reload_under_load import metric, proxy_status

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
NETFILTER = str(VENV_BIN / "netfilter")

ENABLED = os.environ.get("NETFILTER_SOAK") == "1" or "NETFILTER_SOAK_SECONDS" in os.environ
SOAK_SECONDS = float(os.environ.get("NETFILTER_SOAK_SECONDS") or 600)
# One update per period; NETFILTER_SOAK_PERIOD sets it (more, closer updates: does
# memory level off over many list swaps?).
PERIOD = float(os.environ.get("NETFILTER_SOAK_PERIOD") or min(60.0, SOAK_SECONDS / 10))
UPDATES = int((SOAK_SECONDS - 1) // PERIOD)  # at 1, 2, ... periods, before the end
VERSIONS = UPDATES + 1
HELD_AT = (UPDATES + 1) // 2  # the update whose version is held, then confirmed
SAMPLE_EVERY = PERIOD / 12  # memory samples
LOAD_SHARE = 0.7  # of the capacity measured first
CAPACITY_SECONDS = 8
CAPACITY_QPS = 1_000_000  # dnsperf -Q of the capacity run: no limit in practice
UPDATE_INTERVAL = 2  # updates.interval, seconds
MAX_ENTRY_CHANGE = 0.2  # updates.max_entry_change
PADDING = 2000  # filler entries of every version
HELD_EXTRA = 700  # filler entries added by the held version (and kept after it): +35 %
MEMORY_GROWTH = 0.05  # bound of the RSS growth from the 2nd period to the last
DNS_CLIENTS = 4
WRK_CONNECTIONS = 16  # enough that the paced rate is never bound by latency
SETTLE_BOUND = 30.0  # seconds an update may take to be in force (after publication)
PICKUP_BOUND = 4 * UPDATE_INTERVAL + 5.0  # for serve to enforce a confirmed version
STOP_BOUND = 30.0
TABLE = f"Soak: {SOAK_SECONDS:.0f} s of dnsperf + wrk at {LOAD_SHARE:.0%}, {UPDATES} updates"

WRK = shutil.which("wrk")
_MISSING = [*dnsbench.missing_tools(),
            *([] if WRK else ["wrk"]),
            *([] if (VENV_BIN / "mitmdump").exists() else ["mitmdump (the proxy extra)"])]
needs_tools = pytest.mark.skipif(bool(_MISSING), reason=f"{', '.join(_MISSING)} missing")
opted_in = pytest.mark.skipif(not ENABLED, reason="a 10-minute soak: set NETFILTER_SOAK=1 "
                                                  "(or NETFILTER_SOAK_SECONDS) to run it")


def kind_of(update: int) -> str:
    """How update `update` (1-based) is published: full, delta, or held (full, then
    held by the sanity checks and confirmed)."""
    if update == HELD_AT:
        return "held"
    return "delta" if update % 2 == 0 else "full"


# ---------------------------------------------------------------- the lists


@dataclass
class Version:
    number: int
    full: Path
    delta: Path | None  # from number - 1
    entries: int


def write_versions(directory: Path) -> tuple[list[Version], Path]:
    """Versions 1..VERSIONS built with `netfilter list build` (N >= 2 with --diff-from
    N-1), and the authority's public key."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = generate_keypair(directory / "authority")
    versions: list[Version] = []
    for n in range(1, VERSIONS + 1):
        entries: list[dict[str, str]] = [
            {"domain": "shared.example", "ref": "SK-SHARED", "category": "benchmark"},
            {"url": "http://urls.example/shared/", "ref": "SK-SHARED-URL",
             "category": "benchmark"},
            {"domain": only(n), "ref": f"SK-V{n}", "category": "benchmark"},
            {"url": f"http://urls.example/v{n}/", "ref": f"SK-V{n}-URL",
             "category": "benchmark"},
        ]
        entries += [{"domain": f"pad-{i}.invalid", "ref": f"SK-P{i}", "category": "benchmark"}
                    for i in range(PADDING)]
        if n >= HELD_AT + 1:
            entries += [{"domain": f"padx-{i}.invalid", "ref": f"SK-X{i}",
                         "category": "benchmark"} for i in range(HELD_EXTRA)]
        source = directory / f"v{n}.yaml"
        source.write_text(yaml.safe_dump({
            "issuer": "Soak benchmark authority (synthetic)",
            "legal_basis": "Benchmark only: synthetic list of reserved names",
            "contact": "mailto:appeals@authority.example",
            "entries": entries}, sort_keys=False), encoding="utf-8")
        out = directory / f"v{n}" / "soak.nfl"
        out.parent.mkdir()
        command = [NETFILTER, "list", "build", str(source), "--key", str(key_path),
                   "--list-id", "soak", "--version", str(n), "--out", str(out)]
        if n > 1:
            command += ["--diff-from", str(versions[-1].full)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        delta = out.with_name(f"soak.from-v{n - 1}.delta.nfl") if n > 1 else None
        assert delta is None or delta.exists(), done.stdout
        versions.append(Version(n, out, delta, len(entries)))
    return versions, pub_path


def publish(path: Path, directory: Path) -> None:
    """As a mirror does: the file appears whole under its name (a new inode)."""
    temporary = directory / f".{path.name}.incoming"
    shutil.copyfile(path, temporary)
    os.replace(temporary, directory / path.name)


# ---------------------------------------------------------------- the workloads


_PACING = '''
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } nf_soak_timespec;
int clock_gettime(int clock, nf_soak_timespec *tp);
]]
local ts = ffi.new("nf_soak_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local start, sent = nil, 0

-- Each request of this thread has its slot: start + k * (1000 / RATE) ms. wrk asks
-- before every request how long to wait; late slots (a stall) go at once.
function delay()
  if start == nil then start = now_ms() end
  sent = sent + 1
  local wait = start + sent * 1000 / RATE - now_ms()
  if wait <= 0 then return 0 end
  return math.floor(wait)
end
'''


@dataclass
class _Cycle:
    urls: list[str]  # what proxybench.lua_script reads of its Workload


def lua_script(urls: list[str], path: Path, rate: float) -> Path:
    """test_proxy_perf's script (absolute-form GETs, status codes as one JSON line at
    the end); with `rate` > 0, paced at `rate` requests/s per wrk thread."""
    proxybench.lua_script(_Cycle(urls), path)  # type: ignore[arg-type]
    if rate > 0:
        text = path.read_text(encoding="utf-8")
        path.write_text(f"RATE = {rate:.3f}\n{_PACING}\n{text}", encoding="utf-8")
    return path


# ---------------------------------------------------------------- the node


class Node(ChildProcess):
    """`netfilter serve --config` with every part and a list source; output in serve.log."""

    name = "netfilter serve"
    start_bound = 60.0
    stop_bound = STOP_BOUND

    def __init__(self, directory: Path, trust: Path, source: Path, upstream_port: int,
                 origin_port: int, probes: Probes) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.probes = probes
        self.dns_port, self.proxy_port = free_port(), free_port()
        self.stoppage_port, self.metrics_port = free_port(), free_port()
        confdir = directory / "mitmproxy"
        confdir.mkdir(parents=True, exist_ok=True)
        (confdir / "config.yaml").write_text(yaml.safe_dump(
            {"netfilter_resolve": [f"*.example={HOST}"]}), encoding="utf-8")
        self.bundle = directory / "lists" / "soak.nfl"
        self.bundle.parent.mkdir(parents=True, exist_ok=True)
        self.audit = directory / "audit.sqlite"
        self.node_pub = directory / "node.pub"
        config = {
            "node": {"id": "soak-bench", "key": str(directory / "node.key")},
            "lists": [{"path": str(self.bundle), "trust": [str(trust)], "action": "nxdomain",
                       "source": str(source)}],
            "updates": {"interval": UPDATE_INTERVAL, "jitter": 0, "retry_min": 1,
                        "retry_max": 2, "max_entry_change": MAX_ENTRY_CHANGE},
            "dns": {"listen": [f"{HOST}:{self.dns_port}"],  # one process, one engine
                    "upstreams": [f"{HOST}:{upstream_port}"], "timeout": 2.0, "workers": 1},
            "proxy": {"listen": f"{HOST}:{self.proxy_port}", "intercept": "none",
                      "confdir": str(confdir),
                      "allowed_destinations": ["127.0.0.0/8", "*.example"]},
            "stoppage": {"listen": f"{HOST}:{self.stoppage_port}"},
            "audit": {"path": str(self.audit), "client": "none", "checkpoint_interval": 10},
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
        self.wait_until(self._ready, pause=0.2)
        return self

    def _ready(self) -> bool:
        if "netfilter: serving" not in self.log() or not listening(self.proxy_port):
            return False
        return self.probes.proxy(self.proxy_port, shared_urls(self.origin_port)[0]) == 451

    def hup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return scrape(self.metrics_port)

    def version(self) -> float:
        """The list version the DNS engine enforces (its metric)."""
        return metric(self.scrape(), "netfilter_list_version", list="soak", source="authority")

    def child_reloads(self) -> int:
        return self.log().count("netfilter: lists reloaded")


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---------------------------------------------------------------- this test's own clients


@dataclass
class Probes:
    """The test's own questions, one at a time; the blocked answers they got are
    counted, since the audit log counts them too."""

    blocked: Counter[str] = field(default_factory=Counter)

    def dns(self, port: int, name: str) -> str:
        """The rcode of `name` A ("" for no answer)."""
        try:
            reply = dns.query.udp(dns.message.make_query(name, "A"), HOST, port=port,
                                  timeout=3)
        except (dns.exception.DNSException, OSError):
            return ""
        rcode = dns.rcode.to_text(reply.rcode())
        self.blocked["dns"] += rcode == "NXDOMAIN"
        return rcode

    def proxy(self, port: int, url: str) -> int | None:
        status = proxy_status(port, url)
        self.blocked["proxy"] += status == 451
        return status


def at(node: Node, version: int) -> bool:
    """Does the node's DNS engine enforce `version` of the list?"""
    return node.version() == version


def wait(predicate: Callable[[], bool], bound: float, pause: float = 0.05) -> float | None:
    """Poll `predicate` until true: the monotonic time it was (None: not within bound)."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(pause)
    return None


# ---------------------------------------------------------------- memory


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_files(pid: int) -> int:
    """File descriptors `pid` holds (0 once it is gone): a leak of list copies shows here."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command) of the direct children of `pid` (mitmdump, under serve)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append((int(entry.name), cmd.strip()))
        except (OSError, ValueError, IndexError):
            continue
    return found


@dataclass
class Sampler:
    """RSS of serve and its children every SAMPLE_EVERY s, in a thread (bounded by
    `stop`): (seconds since `t0`, serve KiB, children KiB)."""

    pid: int
    t0: float
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    fds: list[tuple[int, int]] = field(default_factory=list)  # open files: serve, children
    child_commands: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Sampler:
        def run() -> None:
            while not self.stop.is_set():
                kids = children(self.pid)
                self.child_commands.update(" ".join(Path(x).name for x in cmd.split()[:2])
                                          for _, cmd in kids)
                self.samples.append((time.monotonic() - self.t0, rss_kib(self.pid),
                                     sum(rss_kib(p) for p, _ in kids)))
                self.fds.append((open_files(self.pid), sum(open_files(p) for p, _ in kids)))
                self.stop.wait(SAMPLE_EVERY)

        self.thread = threading.Thread(target=run, name="rss-sampler", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)

    def window(self, start: float, end: float) -> list[int]:
        """Total KiB (serve + children) of the samples in [start, end)."""
        return [s + c for t, s, c in self.samples if start <= t < end]

    def parts(self, start: float, end: float) -> str:
        """Median MiB of serve and of its children in [start, end), as "serve+children"."""
        inside = [(s, c) for t, s, c in self.samples if start <= t < end]
        if not inside:
            return "-"
        return (f"{statistics.median(s for s, _ in inside) / 1024:.1f}+"
                f"{statistics.median(c for _, c in inside) / 1024:.1f}")


# ---------------------------------------------------------------- the load tools


def start_dnsperf(port: int, queries: Queries, seconds: float, qps: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["dnsperf", "-s", HOST, "-p", str(port), "-d", str(queries.path),
         "-c", str(DNS_CLIENTS), "-Q", str(qps), "-t", "5", "-l", f"{seconds:g}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_wrk(port: int, script: Path, seconds: float) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.Popen(
        [str(WRK), "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds:g}s", "--timeout", "5s",
         "-s", str(script), f"http://{HOST}:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen[str], bound: float) -> str:
    """The output of a tool that ends by itself, within `bound` s (else killed)."""
    try:
        out, _ = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        raise AssertionError(f"{proc.args!r} overran by {bound} s:\n{out}") from None
    return out


@dataclass
class WrkResult:
    requests: int
    seconds: float
    codes: dict[int, int]
    errors: int
    raw: dict[str, Any]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def parse_wrk(output: str) -> WrkResult:
    line = next((x for x in output.splitlines() if x.startswith("NFBENCH ")), None)
    assert line is not None, output
    raw = json.loads(line.removeprefix("NFBENCH "))
    return WrkResult(raw["requests"], raw["duration_us"] / 1e6,
                     {int(c): v for c, v in raw["codes"].items()},
                     raw["connect"] + raw["read"] + raw["write"] + raw["timeout"], raw)


def audit_blocks(path: Path) -> Counter[str]:
    """Blocks per front-end in the audit log: block events, each counting `count` (an
    aggregated window) or 1."""
    counts: Counter[str] = Counter()
    for event in read_events(path):
        if event.get("type") == "block":
            counts[str(event.get("frontend"))] += int(event.get("count") or 1)
    return counts


# ---------------------------------------------------------------- the test


@dataclass
class UpdateRecord:
    update: int
    version: int
    kind: str
    at: float  # seconds since the load started
    in_force: float  # seconds from publication to the DNS engine's version
    settled: float  # to DNS and proxy answering as the new version
    held_after: float | None = None  # held: publication -> the held gauge
    confirm_took: float | None = None  # held: `list confirm` ran this long
    pickup: float | None = None  # held: `list confirm` done -> serve enforces it


@pytest.fixture
def origin() -> Iterator[proxybench.Origin]:
    server = proxybench.Origin().start()
    try:
        yield server
    finally:
        server.close()


@opted_in
@needs_tools
def test_soak(tmp_path: Path, origin: proxybench.Origin, figures: Figures) -> None:
    versions, trust = write_versions(tmp_path / "lists")
    queries = write_queries(tmp_path, VERSIONS)
    urls = url_cycle(origin.port, VERSIONS)
    origin.blocked = frozenset(u.split("/", 2)[2].replace(f":{origin.port}", "").encode()
                               for u in shared_urls(origin.port))
    source = tmp_path / "published"
    source.mkdir()
    probes = Probes()
    records: list[UpdateRecord] = []

    with contextlib.ExitStack() as stack:
        up = upstream(tmp_path / "upstream", queries).start()
        stack.callback(up.stop)
        node = Node(tmp_path / "node", trust, source, up.port, origin.port, probes)
        shutil.copyfile(versions[0].full, node.bundle)
        publish(versions[0].full, source)
        stack.callback(node.stop)
        node.start()
        assert node.proc is not None
        assert probes.dns(node.dns_port, only(1)) == "NXDOMAIN"
        assert probes.dns(node.dns_port, only(2)) == "NOERROR"
        assert probes.dns(node.dns_port, "c0.clean.example") == "NOERROR"

        # ---------------------------------------------------- capacity, both at once
        unpaced = lua_script(urls, tmp_path / "cycle.lua", 0)
        cap_dns = start_dnsperf(node.dns_port, queries, CAPACITY_SECONDS, CAPACITY_QPS)
        cap_wrk = start_wrk(node.proxy_port, unpaced, CAPACITY_SECONDS)
        cap_perf = dnsbench.parse_dnsperf("capacity", finish(cap_dns, CAPACITY_SECONDS + 30))
        cap_http = parse_wrk(finish(cap_wrk, CAPACITY_SECONDS + 30))
        dns_rate = max(100, int(cap_perf.qps * LOAD_SHARE))
        http_rate = max(10.0, cap_http.rps * LOAD_SHARE)
        print(f"\ncapacity ({CAPACITY_SECONDS} s, both at once): dnsperf {cap_perf.qps:,.0f} "
              f"q/s ({cap_perf.lost} lost), wrk {cap_http.rps:,.0f} req/s; soak at "
              f"{dns_rate:,} q/s and {http_rate:,.0f} req/s", flush=True)
        paced = lua_script(urls, tmp_path / "paced.lua", http_rate)

        # ---------------------------------------------------- the soak
        counters_start = node.scrape()
        t0 = time.monotonic()
        dnsperf = start_dnsperf(node.dns_port, queries, SOAK_SECONDS, dns_rate)
        wrk = start_wrk(node.proxy_port, paced, SOAK_SECONDS)
        for tool in (dnsperf, wrk):
            stack.callback(tool.kill)  # no-op once it has ended
        sampler = Sampler(node.proc.pid, t0).start()
        stack.callback(sampler.close)

        for k in range(1, UPDATES + 1):
            due = t0 + k * PERIOD
            time.sleep(max(0.0, due - time.monotonic()))
            assert dnsperf.poll() is None and wrk.poll() is None, "a load tool ended early"
            assert node.alive(), node.log()[-3000:]
            new, old = versions[k], versions[k - 1]
            kind = kind_of(k)
            applied_before = metric(node.scrape(), "netfilter_updates_delta_applied_total")
            published = time.monotonic()
            if kind == "delta":
                assert new.delta is not None
                publish(new.delta, source)
            publish(new.full, source)
            record = UpdateRecord(k, new.number, kind, published - t0, 0.0, 0.0)
            if kind == "held":
                held = wait(lambda: metric(node.scrape(),
                                           "netfilter_updates_held_versions") >= 1,
                            SETTLE_BOUND, pause=0.2)
                assert held is not None, f"version {new.number} was not held\n" \
                    f"{node.log()[-3000:]}"
                record.held_after = held - published
                # held: the old version stays in force on both front-ends
                assert node.version() == old.number
                assert probes.dns(node.dns_port, only(new.number)) == "NOERROR"
                assert probes.dns(node.dns_port, only(old.number)) == "NXDOMAIN"
                assert probes.proxy(node.proxy_port,
                                    version_urls(origin.port, new.number)[0]) == 200
                started = time.monotonic()
                confirm = confirm_held(node.conf, new.number)
                record.confirm_took = time.monotonic() - started
                assert "confirmed by soak" in confirm, confirm
                # serve's periodic check puts a version `list confirm` installed in
                # force (commit 9521782): no SIGHUP.
                picked = wait(partial(at, node, new.number), PICKUP_BOUND, pause=0.2)
                assert picked is not None, (
                    f"confirmed version {new.number} not in force within {PICKUP_BOUND} s "
                    f"(in force: {node.version()})\n{node.log()[-3000:]}")
                record.pickup = picked - started - record.confirm_took
            in_force = wait(partial(at, node, new.number), SETTLE_BOUND, pause=0.1)
            assert in_force is not None, (
                f"update {k}: version {new.number} not in force within {SETTLE_BOUND} s "
                f"(in force: {node.version()})\n{node.log()[-3000:]}")
            record.in_force = in_force - published
            new_urls = version_urls(origin.port, new.number)
            old_urls = version_urls(origin.port, old.number)

            def settled(new_urls: list[str] = new_urls, old_urls: list[str] = old_urls,
                        new: Version = new, old: Version = old) -> bool:
                return (probes.dns(node.dns_port, only(new.number)) == "NXDOMAIN"
                        and probes.dns(node.dns_port, only(old.number)) == "NOERROR"
                        and all(probes.proxy(node.proxy_port, u) == 451 for u in new_urls)
                        and all(probes.proxy(node.proxy_port, u) == 200 for u in old_urls))

            done = wait(settled, SETTLE_BOUND, pause=0.2)
            assert done is not None, (
                f"update {k}: answers not as version {new.number} within {SETTLE_BOUND} s")
            record.settled = done - published
            applied = metric(node.scrape(), "netfilter_updates_delta_applied_total")
            assert applied == applied_before + (kind == "delta"), (kind, applied)
            records.append(record)
            print(f"  update {k} at {record.at:.0f} s: v{new.number} ({kind}) in force after "
                  f"{record.in_force:.2f} s, settled {record.settled:.2f} s"
                  + (f"; held after {record.held_after:.2f} s, confirm "
                     f"{record.confirm_took:.2f} s, in force {record.pickup:.2f} s after it"
                     if kind == "held" else ""), flush=True)

        dnsperf_out = finish(dnsperf, max(0.0, t0 + SOAK_SECONDS - time.monotonic()) + 30)
        wrk_out = finish(wrk, max(0.0, t0 + SOAK_SECONDS - time.monotonic()) + 30)
        elapsed = time.monotonic() - t0
        sampler.close()
        counters_end = node.scrape()
        status = node.stop()
        up.stop()
    log = node.log()

    # ------------------------------------------------------------ dnsperf
    perf = dnsbench.parse_dnsperf("soak", dnsperf_out)
    assert perf.lost == 0, dnsperf_out
    assert perf.sent == perf.completed, dnsperf_out
    assert set(perf.rcodes) <= {"NOERROR", "NXDOMAIN"}, perf.rcodes
    nx = perf.rcodes.get("NXDOMAIN", 0)
    # One version in force at a time: VERSION_LINES blocked version lines per pass of
    # the file, but for the passes an update falls into.
    expected_nx = queries.sent(perf.sent)[0] + VERSION_LINES * perf.sent / len(queries.lines)
    nx_slack = VERSION_LINES * (UPDATES + 2)
    assert abs(nx - expected_nx) <= nx_slack, (nx, expected_nx, nx_slack, perf.rcodes)

    # ------------------------------------------------------------ wrk
    http = parse_wrk(wrk_out)
    assert http.errors == 0, http.raw
    assert set(http.codes) <= {200, 451}, http.codes
    assert set(cap_http.codes) <= {200, 451} and cap_http.errors == 0, cap_http.raw
    expected_451 = http.requests * 6 / len(urls)
    slack_451 = 2 * (UPDATES + 2) + WRK_CONNECTIONS
    assert abs(http.codes.get(451, 0) - expected_451) <= slack_451, (
        http.codes, http.requests, expected_451, slack_451)
    assert origin.blocked_seen == 0, f"the origin saw {origin.blocked_seen} shared URLs"
    assert origin.bad == 0

    # ------------------------------------------------------------ memory
    first = sampler.window(PERIOD, 2 * PERIOD)
    last = sampler.window(SOAK_SECONDS - PERIOD, SOAK_SECONDS)
    assert len(first) >= 6 and len(last) >= 6, (len(first), len(last), sampler.samples[-3:])
    rss_first, rss_last = statistics.median(first), statistics.median(last)
    growth = rss_last / rss_first - 1
    per_period = [sampler.parts(p * PERIOD, (p + 1) * PERIOD)
                  for p in range(int(SOAK_SECONDS // PERIOD))]
    memory = (f"RSS of serve + mitmdump, period 2 {rss_first / 1024:.1f} MiB -> last "
              f"{rss_last / 1024:.1f} MiB ({growth:+.2%}); median per period, MiB "
              f"serve+children: {' '.join(per_period)}; open files serve+children "
              f"{sampler.fds[0][0]}+{sampler.fds[0][1]} -> {sampler.fds[-1][0]}+"
              f"{sampler.fds[-1][1]}")
    print(f"\n  {memory}", flush=True)
    assert growth < MEMORY_GROWTH, memory

    # ------------------------------------------------------------ the node and its log
    assert status == 0, log[-5000:]
    problems = [x for x in log.splitlines() if re.search(r"Traceback|CRITICAL", x)
                or (re.search(r"ERROR|error:", x) and "HELD" not in x)]
    assert not problems, problems[:20]
    verified = subprocess.run([NETFILTER, "audit", "verify", "--log", str(node.audit),
                               "--trust", str(node.node_pub)], capture_output=True, text=True,
                              timeout=300, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    events = read_events(node.audit)
    kinds = Counter((e["type"], e.get("action")) for e in events if e["type"].startswith("list"))
    assert kinds[("list-held", "entry-change")] == 1, kinds
    assert kinds[("list-confirmed", "confirm")] == 1, kinds
    assert kinds[("list-loaded", "install")] == UPDATES - 1, kinds

    # ------------------------------------------------------------ blocks: log vs clients
    logged = audit_blocks(node.audit)
    dns_answered = cap_perf.rcodes.get("NXDOMAIN", 0) + nx + probes.blocked["dns"]
    assert dns_answered <= logged["dns"] <= dns_answered + cap_perf.lost, (
        logged, dns_answered, cap_perf.lost)
    proxy_answered = cap_http.codes.get(451, 0) + http.codes.get(451, 0) \
        + probes.blocked["proxy"]
    assert proxy_answered <= logged["proxy"] <= proxy_answered + 2 * WRK_CONNECTIONS, (
        logged, proxy_answered)

    # ------------------------------------------------------------ figures
    def served(samples: Any, frontend: str) -> float:
        return float(sum(v for (name, labels), v in samples.items()
                         if name == "netfilter_requests_total"
                         and ("frontend", frontend) in labels))

    node_qps = (served(counters_end, "dns") - served(counters_start, "dns")) / elapsed
    node_rps = (served(counters_end, "proxy") - served(counters_start, "proxy")) / elapsed
    load = os.getloadavg()
    print(f"\n{TABLE} (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{os.cpu_count()} CPUs)")
    print(f"  capacity, both at once for {CAPACITY_SECONDS} s: dnsperf {cap_perf.qps:,.0f} q/s "
          f"({cap_perf.lost} lost, {cap_perf.rcodes}), wrk {cap_http.rps:,.0f} req/s "
          f"({cap_http.codes}, {cap_http.errors} errors)")
    print(f"  dnsperf -c{DNS_CLIENTS} -Q{dns_rate}: {perf.qps:,.0f} q/s over {perf.seconds:.1f} s, "
          f"{perf.sent:,} sent, {perf.lost} lost; {perf.rcodes} (NXDOMAIN expected "
          f"{expected_nx:,.0f} +- {nx_slack})")
    print(f"  wrk -t1 -c{WRK_CONNECTIONS} paced at {http_rate:,.0f}/s: {http.rps:,.0f} req/s, "
          f"{http.requests:,} requests {http.codes}, socket errors {http.errors}, latency p50 "
          f"{http.raw['p50'] / 1000:.1f} ms p99 {http.raw['p99'] / 1000:.1f} ms max "
          f"{http.raw['max'] / 1000:.1f} ms (451 expected {expected_451:,.0f} +- {slack_451})")
    print(f"  node counters over {elapsed:.0f} s: dns {node_qps:,.0f} q/s, proxy "
          f"{node_rps:,.0f} req/s")
    print(f"  RSS serve + children ({', '.join(sorted(sampler.child_commands))}), median "
          f"per period, MiB serve+children: {' '.join(per_period)}; total period 2 "
          f"{rss_first / 1024:.1f} -> last {rss_last / 1024:.1f} ({growth:+.2%}); samples "
          f"{len(sampler.samples)}, max {max(s + c for _, s, c in sampler.samples) / 1024:.1f}")
    print(f"  audit blocks: dns {logged['dns']:,} (clients got {dns_answered:,} NXDOMAIN: "
          f"capacity {cap_perf.rcodes.get('NXDOMAIN', 0):,}, soak {nx:,}, probes "
          f"{probes.blocked['dns']}), proxy {logged['proxy']:,} (clients got "
          f"{proxy_answered:,} x 451: capacity {cap_http.codes.get(451, 0):,}, soak "
          f"{http.codes.get(451, 0):,}, probes {probes.blocked['proxy']}); "
          f"{len(events):,} events; audit verify OK")
    for r in records:
        print(f"    update {r.update} at {r.at:.0f} s, v{r.version} {r.kind}: in force "
              f"{r.in_force:.2f} s, settled {r.settled:.2f} s"
              + (f", held after {r.held_after:.2f} s, in force {r.pickup:.2f} s after the confirm"
                 if r.kind == "held" else ""))
    figures.row(TABLE, "capacity (both at once)",
                f"dns {cap_perf.qps:,.0f} q/s, proxy {cap_http.rps:,.0f} req/s")
    figures.row(TABLE, "dnsperf over the soak",
                f"{perf.qps:,.0f} q/s ({perf.lost} lost, {perf.rcodes})", value=perf.qps)
    figures.row(TABLE, "wrk over the soak",
                f"{http.rps:,.0f} req/s ({http.codes}, {http.errors} socket errors)",
                value=http.rps)
    figures.row(TABLE, "RSS period 2 -> last", f"{rss_first / 1024:.1f} -> "
                f"{rss_last / 1024:.1f} MiB ({growth:+.2%})", value=growth)
    figures.row(TABLE, "audit blocks (dns, proxy)",
                f"{logged['dns']:,} / {dns_answered:,} answered, {logged['proxy']:,} / "
                f"{proxy_answered:,} answered")


def confirm_held(config: Path, version: int) -> str:
    """`netfilter list confirm soak VERSION`, retried (bounded) while serve's own check
    holds the update lock ("another update is running")."""
    out = ""
    for _ in range(20):
        done = subprocess.run([NETFILTER, "list", "confirm", "soak", str(version), "--config",
                               str(config), "--operator", "soak"], capture_output=True,
                              text=True, timeout=120, check=False)
        out = done.stdout + done.stderr
        if done.returncode == 0:
            return out
        if "another update is running" not in out:
            break
        time.sleep(0.3)
    raise AssertionError(f"netfilter list confirm failed: {out}")
