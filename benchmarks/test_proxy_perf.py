"""Proxy throughput: wrk through bare mitmdump vs mitmdump with the netfilter addon.

    .venv/bin/python -m pytest benchmarks/test_proxy_perf.py -q -m slow -s

Plain HTTP only (absolute-form GET requests, as a browser sends them to a proxy); HTTPS
through the proxy is a different workload and not measured here.

Workload: a signed list (1,000 blocked domains, 1,000 URL entries on 100 hosts, which
form the host index) and a cycle of 1,000 URLs on reserved *.example names: 1% blocked
(5 under blocked domains, 5 URL entries), 10% on hosts of the host index (those 5 and 95
clean URLs), 89.5% on 50 clean hosts outside the list. wrk's Lua script sends them in
order, round-robin over its connections, each with the URL's own Host header.

One origin (asyncio, 127.0.0.1) answers every name. Both mitmdumps load the same tiny
router addon (ROUTER, written beside the config) that sends every *.example request to
the origin: it sets the address mitmproxy dials in the `request` hook (after the addon's
checks, before mitmproxy picks an upstream connection), so mitmproxy keeps its upstream
connections alive, one per client connection. So only the filtering differs between the
two proxies. The addon's own `netfilter_resolve` now routes in its `request` hook
too (test (e) checks that it keeps the upstream connection), but the main runs use
the router in both proxies so that the routing code is the same.

(a) wrk -t1 -c8 through bare mitmdumps and through mitmdumps + addon (INSTANCES
    processes of each: same-argument processes differ by up to ~8% for their whole
    life), alternated (PAIRS rounds; in each, every bare/addon pair runs SECONDS each,
    the order swapped every round; after a warm-up of each): requests/s medians over
    all runs of a kind and their ratio, wrk's latency percentiles, mitmdump's CPU per
    request. At -c8 mitmdump (one core) is saturated, so latency there is mostly
    queueing (connections / throughput). Where there are 2 CPUs, every mitmdump runs
    on one and wrk and the origin on the other (PIN).
(b) the same alternation with -c1 (one request at a time, no queue): the difference of
    the median latencies is the time the addon adds to a request. Target verdict here.
(c) where the time goes: the addon's requestheaders in a tight loop in this process,
    by kind of URL, and parts of it (check_url, allowed_destinations).
(d) the same hook timed inside a loaded mitmdump (a third mitmdump with a timing
    subclass of the addon, one -c8 run): its share of mitmdump's CPU per request.
(e) netfilter_resolve on a keep-alive client connection: all answered, one upstream
    connection.

Timing is reported (stdout, figures table), never asserted: the 2-core machine is
shared by wrk, mitmdump, the origin and whatever else runs. Asserted: before any load
every URL of the cycle gets the expected answer through each proxy (451 for the 1%,
200 with the origin's page otherwise); under load wrk has no socket errors or timeouts,
bare mitmdump answers only 200, the addon answers 451 for the blocked share (within the
requests in flight) and 200 for the rest, the origin never sees a blocked URL through
the addon, every 451 is one block event in the audit log, and no proxy logs an error.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support import ChildProcess, free_port, listening

from netfilter.keys import generate_keypair, load_private_key
from netfilter.listfile import build_bundle
from support import Figures, timed

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
ADDON = REPO / "addons" / "netfilter_proxy.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"
WRK = shutil.which("wrk")

SECONDS = 3  # per measured -c8 run
PAIRS = 8  # rounds: in each, every bare and every addon mitmdump runs once
IDLE_SECONDS = 3  # per measured -c1 run
IDLE_PAIRS = 4
# Processes of each kind. Two mitmdumps with the same arguments differ by up to ~8% in
# throughput for their whole lifetime (memory layout, hash seeds: why pyperf spawns many
# processes), so each side is several processes and the figures their pooled runs.
INSTANCES = 4
CONNECTIONS = 8
WARMUP_SECONDS = 2
THROUGHPUT_TARGET = 0.95  # addon >= 95% of bare mitmdump's requests/s
LATENCY_TARGET_MS = 0.2  # added median latency

URLS = 1000  # the cycle wrk sends
DOMAIN_BLOCKED = 5  # URLs under blocked domains
URL_BLOCKED = 5  # URLs matching URL entries (on host-index hosts)
INDEX_CLEAN = 95  # clean URLs on host-index hosts
LIST_DOMAINS = 1000
INDEX_HOSTS = 100
URL_ENTRIES_PER_HOST = 10
CLEAN_HOSTS = 50
SEED = 20261124

# mitmdump is one busy thread: it gets a core of its own, and wrk and the origin (this
# process and its children) share the other, so the two proxies compete with the load
# generator, not with each other or the scheduler's moods. Where there are fewer than
# 2 CPUs (or no affinity call) nothing is pinned.
PROXY_CPU, CLIENT_CPU = 1, 0
PIN = hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
START_BOUND = 30.0  # seconds mitmdump may take to listen
STOP_BOUND = 10.0
WRK_MARGIN = 30.0  # seconds wrk may overrun -d before it is killed

THROUGHPUT_TABLE = (f"Proxy: wrk -c{CONNECTIONS} through bare mitmdump vs mitmdump + "
                    "netfilter addon (plain HTTP)")
LATENCY_TABLE = "Proxy: median latency, wrk -c1 (no queueing)"
SATURATED_TABLE = f"Proxy: latency and mitmdump cpu under saturation, wrk -c{CONNECTIONS}"
RESOLVE_TABLE = "Proxy: upstream connections with the addon's netfilter_resolve"
HOOK_TABLE = "Proxy: the addon's requestheaders hook per request (where the time goes)"
RESOLVE_REQUESTS = 8
RESOLVE_TIMEOUT = 3.0

# The router both mitmdumps load: *.example requests go to the origin (the port stays
# the URL's), anything else is refused. `data.host` sets the address mitmproxy dials
# without touching the Host header; mitmproxy opens the upstream connection after
# this hook, so its keep-alive connections are found again by address.
ROUTER = '''\
"""Benchmark router: *.example -> {host} (written by benchmarks/test_proxy_perf.py)."""
import os

from mitmproxy import http

NAME = os.environ.get("BENCH_PROXY", "")  # which mitmdump forwarded it, for the origin


class Router:
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        if flow.request.host.endswith(".example"):
            flow.request.data.host = "{host}"
            flow.request.headers["x-bench-proxy"] = NAME
        else:
            flow.response = http.Response.make(403, b"benchmark router: not routed\\n")


addons = [Router()]
'''


# The addon with its requestheaders hook timed, for one diagnostic run: how long the
# hook takes inside a loaded mitmdump (caches cold), not in a tight loop.
TIMED_ADDON = '''\
"""netfilter's addon, requestheaders timed (written by benchmarks/test_proxy_perf.py)."""
import sys
import time

try:
    from netfilter.proxy import NetfilterAddon
except ImportError:
    sys.path.insert(0, {src!r})
    from netfilter.proxy import NetfilterAddon


class TimedNetfilterAddon(NetfilterAddon):
    calls = 0
    seconds = 0.0

    def requestheaders(self, flow):
        start = time.perf_counter()
        try:
            super().requestheaders(flow)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def done(self):
        with open({out!r}, "w") as f:
            f.write(f"{{self.calls}} {{self.seconds}}\\n")
        super().done()


addons = [TimedNetfilterAddon()]
'''


def _missing() -> list[str]:
    missing = [] if WRK else ["wrk (Debian: apt-get install wrk)"]
    if not MITMDUMP.exists():
        missing.append(f"{MITMDUMP} (pip install -e .[proxy])")
    return missing


pytestmark = pytest.mark.skipif(
    bool(_missing()),
    reason=f"{', '.join(_missing())} missing; the proxy throughput benchmark drives them")


# ---------------------------------------------------------------- the origin


class _OriginProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, GET/HEAD without a body: one fixed 200 page per request."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.origin.connections += 1

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self.transport.close()
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            if not self.origin.answer(head, self.transport):
                self.transport.close()
                return


@dataclass
class Origin:
    """The benchmark's origin on 127.0.0.1, in a thread with its own event loop.

    It counts connections, requests, and requests for URLs the list blocks (which must
    never arrive through the addon): `blocked` holds their `host/path` keys. The
    router's `x-bench-proxy` header says which mitmdump forwarded a request, so a
    request a bare mitmdump forwarded late (its wrk run over) is not counted against
    the addon run that follows: `blocked_via_addon` must stay 0.
    """

    blocked: frozenset[bytes] = frozenset()
    connections: int = 0
    requests: int = 0
    blocked_seen: int = 0
    blocked_via_addon: int = 0
    bad: int = 0
    port: int = 0
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _server: asyncio.Server | None = None
    _thread: threading.Thread | None = None

    BODY = (b"<!doctype html><html><head><title>public page</title></head><body>"
            + b"<p>an ordinary page from the benchmark origin</p>" * 8 + b"</body></html>\n")
    RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
    HOST_HEADER = re.compile(rb"\r\nhost:[ \t]*([^:\r\n]+)", re.IGNORECASE)
    PROXY_HEADER = re.compile(rb"\r\nx-bench-proxy:[ \t]*([^\r\n]*)", re.IGNORECASE)

    def answer(self, head: bytes, transport: asyncio.Transport) -> bool:
        self.requests += 1
        line, _, _ = head.partition(b"\r\n")
        parts = line.split(b" ")
        found = self.HOST_HEADER.search(head)
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD") or found is None \
                or b"content-length" in head.lower():
            self.bad += 1
            transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                            b"Connection: close\r\n\r\n")
            return False
        if found.group(1).lower() + parts[1] in self.blocked:
            self.blocked_seen += 1
            via = self.PROXY_HEADER.search(head)
            if via is not None and via.group(1).startswith(b"addon"):
                self.blocked_via_addon += 1
        transport.write(self.RESPONSE if parts[0] == b"GET" else
                        self.RESPONSE[: len(self.RESPONSE) - len(self.BODY)])
        return True

    def start(self) -> Origin:
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(self._loop.create_server(
                lambda: _OriginProtocol(self), HOST, 0, backlog=512))
            self.port = int(self._server.sockets[0].getsockname()[1])
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="bench-origin", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the origin did not start in 10 s")
        return self

    def snapshot(self) -> tuple[int, int, int]:
        return self.connections, self.requests, self.blocked_seen

    def close(self) -> None:
        if self._thread is None:
            return

        async def shut() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()


# ---------------------------------------------------------------- the workload


@dataclass
class Workload:
    directory: Path
    bundle: Path
    public_key: Path
    urls: list[str]  # the cycle, in wrk's order
    refs: dict[int, str]  # index in the cycle of each blocked URL -> its entry's ref
    index_urls: int  # URLs on hosts of the host index (blocked URL entries included)
    entries: int  # in the list
    blocked_keys: frozenset[bytes]  # host/path of the blocked URLs, for the origin

    @property
    def blocked_share(self) -> float:
        return len(self.refs) / len(self.urls)


def make_workload(directory: Path, origin_port: int) -> Workload:
    """The list (YAML source -> signed bundle, the authority's way) and the URL cycle."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    key_path, pub_path = generate_keypair(directory / "authority")
    domains = [(f"blocked{i}.example", f"PX-D{i:04d}") for i in range(LIST_DOMAINS)]
    entries: list[dict[str, str]] = [{"domain": d, "ref": ref, "category": "benchmark"}
                                     for d, ref in domains]
    index_hosts = [f"idx{i}.example" for i in range(INDEX_HOSTS)]
    url_entries: list[tuple[str, str, str]] = []  # (host, path, ref) of the URL entries
    for h, host in enumerate(index_hosts):
        for k in range(URL_ENTRIES_PER_HOST):
            # half prefixes (a directory), half exact URLs with a query
            path = f"/dir{k}/" if k % 2 == 0 else f"/gallery/p{k}.html?id={h}"
            ref = f"PX-U{h:03d}{k}"
            url_entries.append((host, path, ref))
            entries.append({"url": f"http://{host}{path}", "ref": ref, "category": "benchmark"})
    source = {
        "issuer": "Proxy benchmark authority (synthetic)",
        "legal_basis": "Benchmark only: synthetic list of reserved names",
        "contact": "mailto:appeals@authority.example",
        "entries": entries,
    }
    source_path = directory / "proxy-bench-source.yaml"
    source_path.write_text(yaml.safe_dump(source, sort_keys=False), encoding="utf-8")
    bundle = directory / "proxy-bench.nfl"
    build_bundle(source_path, bundle, key=load_private_key(key_path), list_id="proxy-bench",
                 version=1)

    blocked: list[tuple[str, str, str]] = []  # (host, path, ref)
    for d, ref in rng.sample(domains, DOMAIN_BLOCKED):  # a subdomain of a blocked domain
        blocked.append((f"www.{d}", f"/page{rng.randrange(100)}.html", ref))
    for host, path, ref in rng.sample(url_entries, URL_BLOCKED):
        blocked.append((host, path + "x.html" if path.endswith("/") else path, ref))
    rng.shuffle(blocked)
    clean: list[tuple[str, str]] = []
    for j in range(INDEX_CLEAN):  # clean paths on hosts that carry URL entries
        clean.append((rng.choice(index_hosts), f"/public/page{j}.html?x={j}"))
    clean_hosts = [f"www.site{i}.example" for i in range(CLEAN_HOSTS)]
    for j in range(URLS - len(blocked) - INDEX_CLEAN):
        clean.append((clean_hosts[j % CLEAN_HOSTS], f"/articles/{j}/index.html?ref={j}"))
    rng.shuffle(clean)
    # the blocked URLs evenly spaced, so that any stretch of the cycle has its 1%
    stride = URLS // len(blocked)
    cycle: list[tuple[str, str]] = []
    refs: dict[int, str] = {}
    pending, rest = iter(blocked), iter(clean)
    for i in range(URLS):
        if i % stride == stride // 2 and len(refs) < len(blocked):
            host, path, ref = next(pending)
            refs[i] = ref
            cycle.append((host, path))
        else:
            cycle.append(next(rest))
    index_set = set(index_hosts)
    return Workload(
        directory, bundle, pub_path, [f"http://{h}:{origin_port}{p}" for h, p in cycle], refs,
        sum(1 for h, _ in cycle if h in index_set), len(entries),
        frozenset(f"{h}{p}".encode() for h, p, _ in blocked))


def lua_script(workload: Workload, path: Path) -> Path:
    """wrk's script: absolute-form GETs of the cycle with their own Host header, and the
    answers' status codes counted and printed as one JSON line at the end."""
    lines = ["local urls = {"]
    for u in workload.urls:
        authority = u.split("/", 3)[2]
        lines.append(f'  {{"{u}", "{authority}"}},')
    lines.append("}")
    lines.append('''
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  reqs = {}
  for i, pair in ipairs(urls) do
    reqs[i] = wrk.format("GET", pair[1], {["Host"] = pair[2]})
  end
  n = 0
  statuses = {}
end

function request()
  n = n + 1
  if n > #reqs then n = 1 end
  return reqs[n]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local codes = {}
  for _, t in ipairs(threads) do
    for code, count in pairs(t:get("statuses")) do
      codes[#codes + 1] = string.format('"%d": %d', code, count)
    end
  end
  local e = summary.errors
  io.write(string.format('NFBENCH {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, ' ..
    '"p50": %d, "p90": %d, "p99": %d, "mean": %.1f, "max": %d, "codes": {%s}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, table.concat(codes, ", ")))
end
''')
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the proxies


@dataclass
class Proxy(ChildProcess):
    """One mitmdump on a free loopback port; `addon` adds the netfilter addon."""

    name: str
    directory: Path
    router: Path
    config: Path | None = None  # the netfilter config: with the addon
    routes: tuple[str, ...] = ()  # netfilter_resolve (the resolve measurement only)
    script: Path = ADDON  # the addon file (a timed wrapper of it for one measurement)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    def command(self) -> list[str]:
        # Both: flow_detail=0 and warnings only, the same confdir kind, lazy connections
        # (the addon sets it; bare gets it too so only the filtering differs).
        args = [str(MITMDUMP), "--listen-host", HOST, "-p", str(self.port),
                "--set", "flow_detail=0", "--set", "termlog_verbosity=warn",
                "--set", f"confdir={self.directory / (self.name + '-confdir')}",
                "--set", "connection_strategy=lazy"]
        if self.config is not None:
            args += ["-s", str(self.script), "--set", f"netfilter_config={self.config}"]
            for route in self.routes:
                args += ["--set", f"netfilter_resolve={route}"]
        if not self.routes:
            args += ["-s", str(self.router)]
        return args

    start_bound = START_BOUND
    stop_bound = STOP_BOUND

    def start(self) -> Proxy:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONUNBUFFERED"] = "1"
        env["BENCH_PROXY"] = self.name  # the router tags what it forwards with it
        self.popen(self.command(), env=env, new_session=True)
        if PIN:  # before mitmdump starts its threads (they inherit it)
            assert self.proc is not None
            os.sched_setaffinity(self.proc.pid, {PROXY_CPU})
        self.wait_until(lambda: listening(self.port))
        return self

    def cpu(self) -> float:
        """CPU seconds used so far (user + system), from /proc."""
        assert self.proc is not None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


AGGREGATE_WINDOW = 10.0  # audit.aggregate_window, as the addons' config sets it


def write_config(workload: Workload, directory: Path) -> Path:
    """The addon's config: the benchmark list (stop page) and an audit log (audit_path)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "node": {"id": "proxy-bench", "key": str(directory / "node.key")},
        "lists": [{"path": str(workload.bundle), "trust": [str(workload.public_key)],
                   "action": "stoppage"}],
        "proxy": {"listen": f"{HOST}:0", "allowed_destinations": ["127.0.0.0/8", "*.example"]},
        "stoppage": {"operator": "Benchmark IT", "operator_url": "https://operator.example/"},
        "audit": {"path": str(audit_path(directory)), "client": "truncated",
                  "checkpoint_interval": 3600, "aggregate_window": AGGREGATE_WINDOW},
    }
    path = directory / "netfilter.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def audit_path(directory: Path) -> Path:
    return directory / "audit.sqlite"


def count_blocks(audit: Path) -> int:
    """Blocks committed so far to the addon's audit log (read-only): the sum of the
    block events' `count` (1 where absent), as aggregation folds repeats into one."""
    if not audit.exists():
        return 0
    db = sqlite3.connect(f"file:{audit}?mode=ro", uri=True, timeout=5.0)
    try:
        rows = db.execute("SELECT event FROM leaves WHERE event IS NOT NULL")
        blocks = (json.loads(event) for (event,) in rows)
        return sum(int(e.get("count") or 1) for e in blocks if e.get("type") == "block")
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def settled_blocks(audit: Path, want: int, bound: float = AGGREGATE_WINDOW + 3.0) -> int:
    """The block count once it reaches `want`, or after `bound`: repeats of a key are
    passed on when their aggregation window closes, up to a window after the last."""
    deadline = time.monotonic() + bound
    while True:
        now = count_blocks(audit)
        if now >= want or time.monotonic() >= deadline:
            return now
        time.sleep(0.1)


# ---------------------------------------------------------------- clients


def fetch_all(proxy: Proxy, urls: list[str]) -> list[tuple[int, bytes]]:
    """Every URL once through `proxy`, absolute-form, one keep-alive connection."""
    answers: list[tuple[int, bytes]] = []
    conn = http.client.HTTPConnection(HOST, proxy.port, timeout=10)
    try:
        for u in urls:
            conn.request("GET", u, headers={"Host": u.split("/", 3)[2]})
            response = conn.getresponse()
            answers.append((response.status, response.read()))
            if response.will_close:
                conn.close()
                conn = http.client.HTTPConnection(HOST, proxy.port, timeout=10)
    finally:
        conn.close()
    return answers


@dataclass
class WrkResult:
    proxy: str
    connections: int
    rps: float
    requests: int
    socket_errors: int  # connect + read + write + timeout
    status_errors: int  # answers >= 400 as wrk counts them
    codes: dict[int, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    proxy_cpu: float  # cores used by mitmdump during the run
    raw: dict[str, Any]


def run_wrk(proxy: Proxy, script: Path, *, seconds: float,
            connections: int = CONNECTIONS) -> WrkResult:
    assert WRK is not None
    cmd = [WRK, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s",
           str(script), f"http://{HOST}:{proxy.port}"]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    cpu = proxy.cpu()
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env,
                          timeout=seconds + WRK_MARGIN)
    wall = time.monotonic() - start
    cpu = (proxy.cpu() - cpu) / wall
    line = next((x for x in done.stdout.splitlines() if x.startswith("NFBENCH ")), None)
    assert done.returncode == 0 and line is not None, (
        f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("NFBENCH "))
    return WrkResult(
        proxy.name, connections, raw["requests"] / (raw["duration_us"] / 1e6),
        raw["requests"], raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        raw["status"], {int(k): v for k, v in raw["codes"].items()}, raw["p50"] / 1000,
        raw["p90"] / 1000, raw["p99"] / 1000, cpu, raw)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("proxy-perf")


@pytest.fixture(scope="module", autouse=True)
def pinned() -> Iterator[None]:
    """This process (the origin) and wrk on CLIENT_CPU; each mitmdump on PROXY_CPU."""
    if not PIN:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {CLIENT_CPU})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    server = Origin().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def workload(bench_dir: Path, origin: Origin) -> Workload:
    work = make_workload(bench_dir / "workload", origin.port)
    origin.blocked = work.blocked_keys
    return work


@pytest.fixture(scope="module")
def script(workload: Workload, bench_dir: Path) -> Path:
    return lua_script(workload, bench_dir / "cycle.lua")


@pytest.fixture(scope="module")
def router(bench_dir: Path) -> Path:
    path = bench_dir / "bench_router.py"
    path.write_text(ROUTER.format(host=HOST), encoding="utf-8")
    return path


Fleet = tuple[list[Proxy], list[Proxy]]


@pytest.fixture(scope="module")
def proxies(bench_dir: Path, workload: Workload, router: Path) -> Iterator[Fleet]:
    """(bare mitmdumps, mitmdumps + netfilter addon): INSTANCES of each, all with the
    router, each addon with its own config and audit log, all running for the whole
    module so that runs can alternate."""
    bares = [Proxy(f"bare{k}", bench_dir, router) for k in range(INSTANCES)]
    addons = [Proxy(f"addon{k}", bench_dir, router,
                    write_config(workload, bench_dir / f"addon{k}")) for k in range(INSTANCES)]
    started: list[Proxy] = []
    try:
        for proxy in (*bares, *addons):
            started.append(proxy.start())
        yield bares, addons
    finally:
        for proxy in started:
            proxy.stop()


# ---------------------------------------------------------------- measuring


_PROBLEM = re.compile(r"error|traceback|exception|warn", re.IGNORECASE)


def log_problems(proxy: Proxy) -> list[str]:
    """Anything mitmdump logged at warning level or above (it logs nothing else)."""
    return [line for line in proxy.log().splitlines() if _PROBLEM.search(line)]


def _describe(r: WrkResult) -> str:
    codes = " ".join(f"{k}:{v}" for k, v in sorted(r.codes.items()))
    return (f"{r.proxy:6} -c{r.connections} {r.rps:7,.0f} req/s  {r.requests:6,} requests "
            f"[{codes}]  latency p50 {r.p50_ms:.3f} p90 {r.p90_ms:.3f} p99 {r.p99_ms:.3f} ms  "
            f"mitmdump cpu {r.proxy_cpu:.2f} cores, {cpu_per_request_us(r):.0f} us/request")


def cpu_per_request_us(r: WrkResult) -> float:
    return r.proxy_cpu / r.rps * 1e6


def measured(proxy: Proxy, script: Path, origin: Origin, workload: Workload, *,
             seconds: float, connections: int) -> WrkResult:
    """One wrk run, its answers checked against the workload."""
    before = origin.snapshot()
    result = run_wrk(proxy, script, seconds=seconds, connections=connections)
    opened = origin.snapshot()[0] - before[0]
    print(f"  {_describe(result)}", flush=True)
    assert proxy.alive(), f"{proxy.name} died under load:\n{proxy.log()[-3000:]}"
    assert result.socket_errors == 0, f"wrk socket errors: {result.raw}"
    assert sum(result.codes.values()) == result.requests, result.raw
    assert result.status_errors == result.codes.get(451, 0), result.raw
    # keep-alive on both sides: one upstream connection per wrk connection at most
    assert opened <= connections, f"{opened} upstream connections for {connections} clients"
    assert origin.bad == 0
    if proxy.config is None:
        assert result.codes == {200: result.requests}, result.codes
    else:
        assert set(result.codes) <= {200, 451}, result.codes
        # the cycle is sent in order; the requests in flight at the end are not counted
        expected = result.requests * workload.blocked_share
        assert abs(result.codes.get(451, 0) - expected) <= 2 + connections, (
            f"{result.codes.get(451, 0)} answers 451 of {result.requests}, expected ~{expected}")
        assert origin.blocked_via_addon == 0, (
            f"the origin saw {origin.blocked_via_addon} blocked URLs through an addon")
    return result


def alternate(fleet: Fleet, script: Path, origin: Origin, workload: Workload, *,
              seconds: float, pairs: int, connections: int
              ) -> tuple[list[WrkResult], list[WrkResult], dict[str, int]]:
    """A warm-up run of each process, then `pairs` rounds: in each, every (bare k,
    addon k) pair runs, the order within pairs swapped every round (bare first, addon
    first, ...) so that neither kind always runs second. Returns the measured runs of
    each kind, pair by pair, and the 451 answers of each addon's warm-up."""
    bares, addons = fleet
    warm = {proxy.name: measured(proxy, script, origin, workload, seconds=WARMUP_SECONDS,
                                 connections=connections).codes.get(451, 0)
            for proxy in (*bares, *addons)}
    base: list[WrkResult] = []
    filtered: list[WrkResult] = []
    for i in range(pairs):
        for bare, addon in zip(bares, addons, strict=True):
            for proxy in (bare, addon) if i % 2 == 0 else (addon, bare):
                result = measured(proxy, script, origin, workload, seconds=seconds,
                                  connections=connections)
                (base if proxy is bare else filtered).append(result)
    return base, filtered, warm


def addon_audit(addon: Proxy) -> Path:
    assert addon.config is not None
    return audit_path(addon.config.parent)


def check_fleet_events(addons: list[Proxy], before: dict[str, int], warm: dict[str, int],
                       filtered: list[WrkResult], runs: int, connections: int) -> None:
    """check_block_events for each addon mitmdump of the fleet."""
    for addon in addons:
        answered = warm[addon.name] + sum(r.codes.get(451, 0) for r in filtered
                                          if r.proxy == addon.name)
        check_block_events(addon, before[addon.name], answered, runs, connections)


def check_block_events(addon: Proxy, before: int, answered_451: int, runs: int,
                       connections: int) -> int:
    """Every 451 wrk counted is one block in the log; requests still in flight when wrk
    stopped (at most `connections` per run) may add theirs."""
    events = settled_blocks(addon_audit(addon), before + answered_451) - before
    assert answered_451 <= events <= answered_451 + runs * connections, (
        f"{events} block events for {answered_451} answers 451")
    return events


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def bootstrap_median(values: list[float], rounds: int = 10_000) -> tuple[float, float]:
    """A 95% confidence interval of the median of `values` (percentile bootstrap,
    fixed seed): how far the figure could move on another day with the same spread."""
    rng = random.Random(SEED)
    medians = sorted(median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return medians[int(rounds * 0.025)], medians[int(rounds * 0.975) - 1]


def _runs(label: str, runs: list[WrkResult]) -> str:
    return (f"{label}: median {median([r.rps for r in runs]):,.0f} req/s (runs "
            f"{', '.join(f'{r.rps:,.0f}' for r in runs)}); latency medians p50 "
            f"{median([r.p50_ms for r in runs]):.3f} ms, p90 "
            f"{median([r.p90_ms for r in runs]):.3f} ms, p99 "
            f"{median([r.p99_ms for r in runs]):.3f} ms; mitmdump "
            f"{median([cpu_per_request_us(r) for r in runs]):.0f} us cpu/request")


# ---------------------------------------------------------------- the benchmarks


@pytest.mark.slow
def test_every_url_answers_as_listed(proxies: Fleet, workload: Workload,
                                     origin: Origin) -> None:
    """Before any load: each URL of the cycle once through a bare and an addon proxy."""
    bare, addon = proxies[0][0], proxies[1][0]
    print(f"\nworkload: {workload.entries:,} list entries; a cycle of {len(workload.urls):,} "
          f"URLs, {len(workload.refs)} blocked ({workload.blocked_share:.1%}), "
          f"{workload.index_urls} on host-index hosts "
          f"({workload.index_urls / len(workload.urls):.1%})")
    before = origin.snapshot()
    answers = fetch_all(bare, workload.urls)
    assert [status for status, _ in answers] == [200] * len(workload.urls)
    assert all(body == Origin.BODY for _, body in answers)
    assert origin.blocked_seen - before[2] == len(workload.refs)  # bare forwards them all

    before = origin.snapshot()
    answers = fetch_all(addon, workload.urls)
    wrong = [(i, workload.urls[i], status) for i, (status, _) in enumerate(answers)
             if status != (451 if i in workload.refs else 200)]
    assert not wrong, wrong
    for i, (_, body) in enumerate(answers):
        if i in workload.refs:
            assert workload.refs[i].encode() in body, (workload.urls[i], body[:500])
        else:
            assert body == Origin.BODY
    assert origin.blocked_seen == before[2]
    assert origin.requests - before[1] == len(workload.urls) - len(workload.refs)
    assert not log_problems(bare) and not log_problems(addon)


@pytest.mark.slow
def test_throughput_bare_vs_addon(proxies: Fleet, script: Path, origin: Origin,
                                  workload: Workload, figures: Figures) -> None:
    bares, addons = proxies
    print(f"\n(a) wrk -t1 -c{CONNECTIONS} -d{SECONDS}s, {INSTANCES} bare and {INSTANCES} addon "
          f"mitmdumps, {PAIRS} rounds of pairs alternated "
          f"(load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; "
          + (f"mitmdump on CPU {PROXY_CPU}, wrk and the origin on CPU {CLIENT_CPU})" if PIN
             else "not pinned)"))
    events = {addon.name: count_blocks(addon_audit(addon)) for addon in addons}
    base, filtered, warm = alternate(proxies, script, origin, workload,
                                     seconds=SECONDS, pairs=PAIRS, connections=CONNECTIONS)
    check_fleet_events(addons, events, warm, filtered, PAIRS + 1, CONNECTIONS)

    # Each pair ran back to back, so its ratio cancels the machine's drift (other jobs,
    # the VM's neighbours) that moves both kinds alike: the verdict takes the median of
    # the pairwise ratios, and says how sure it is.
    pairwise = [f.rps / b.rps for b, f in zip(base, filtered, strict=True)]
    ratio = median(pairwise)
    low, high = bootstrap_median(pairwise)
    of_medians = median([r.rps for r in filtered]) / median([r.rps for r in base])
    added_p50 = median([r.p50_ms for r in filtered]) - median([r.p50_ms for r in base])
    verdict = "PASS" if ratio >= THROUGHPUT_TARGET else "FAIL"
    print("\n".join([
        "", _runs("bare mitmdump", base), _runs("mitmdump + addon", filtered),
        f"throughput with the addon: median of {len(pairwise)} pairwise ratios {ratio:.1%} "
        f"(95% CI {low:.1%}-{high:.1%}; ratio of the medians {of_medians:.1%}); pairwise "
        f"{', '.join(f'{x:.1%}' for x in pairwise)}; target >= {THROUGHPUT_TARGET:.0%}: "
        f"{verdict}",
        f"median latency at -c{CONNECTIONS} (queueing included): {added_p50:+.3f} ms",
    ]))
    note = f"median of {INSTANCES} processes x {PAIRS} x {SECONDS} s"
    figures.time(THROUGHPUT_TABLE, "bare mitmdump", 1 / median([r.rps for r in base]),
                 baseline=True, unit="request", note=note)
    figures.time(THROUGHPUT_TABLE, "mitmdump + netfilter addon",
                 1 / median([r.rps for r in filtered]), unit="request", note=note)
    figures.row(THROUGHPUT_TABLE, "addon / bare, median of the pairwise ratios",
                f"{ratio:.1%} (95% CI {low:.1%}-{high:.1%}, {len(pairwise)} pairs; ratio of "
                f"the medians {of_medians:.1%})", value=ratio)
    figures.target(f"addon >= {THROUGHPUT_TARGET:.0%} of bare mitmdump's requests/s "
                   "(median pairwise ratio)", THROUGHPUT_TABLE,
                   "addon / bare, median of the pairwise ratios", "min", THROUGHPUT_TARGET)
    for label, runs in (("bare", base), ("addon", filtered)):
        figures.row(SATURATED_TABLE, f"{label} p50 / p90 / p99",
                    f"{median([r.p50_ms for r in runs]):.3f} / "
                    f"{median([r.p90_ms for r in runs]):.3f} / "
                    f"{median([r.p99_ms for r in runs]):.3f} ms")
    figures.row(SATURATED_TABLE, "added median latency", f"{added_p50:+.3f} ms (queueing: "
                f"{CONNECTIONS} connections / throughput)")
    for label, runs in (("bare", base), ("addon", filtered)):
        figures.row(SATURATED_TABLE, f"{label} mitmdump cpu per request",
                    f"{median([cpu_per_request_us(r) for r in runs]):.0f} us "
                    f"({median([r.proxy_cpu for r in runs]):.2f} cores)")
    problems = [line for proxy in (*bares, *addons) for line in log_problems(proxy)]
    assert not problems, problems


@pytest.mark.slow
def test_added_latency_one_connection(proxies: Fleet, script: Path,
                                      origin: Origin, workload: Workload,
                                      figures: Figures) -> None:
    """-c1: one request at a time, so the latency is the path through the proxy without
    any queue; the difference of the medians is what the addon adds to a request."""
    bares, addons = proxies
    print(f"\n(b) wrk -t1 -c1 -d{IDLE_SECONDS}s, {INSTANCES} + {INSTANCES} mitmdumps, "
          f"{IDLE_PAIRS} rounds of pairs alternated (load average {os.getloadavg()[0]:.2f})")
    events = {addon.name: count_blocks(addon_audit(addon)) for addon in addons}
    base, filtered, warm = alternate(proxies, script, origin, workload,
                                     seconds=IDLE_SECONDS, pairs=IDLE_PAIRS, connections=1)
    check_fleet_events(addons, events, warm, filtered, IDLE_PAIRS + 1, 1)

    added = median([r.p50_ms for r in filtered]) - median([r.p50_ms for r in base])
    pairwise = [f.p50_ms - b.p50_ms for b, f in zip(base, filtered, strict=True)]
    cpu_added = (median([cpu_per_request_us(r) for r in filtered])
                 - median([cpu_per_request_us(r) for r in base]))
    verdict = "PASS" if added <= LATENCY_TARGET_MS else "FAIL"
    print("\n".join([
        "", _runs("bare mitmdump", base), _runs("mitmdump + addon", filtered),
        f"added median latency: {added:+.3f} ms (pairwise "
        f"{', '.join(f'{x:+.3f}' for x in pairwise)}); target <= {LATENCY_TARGET_MS} ms: "
        f"{verdict}",
        f"mitmdump cpu per request: {cpu_added:+.0f} us with the addon",
    ]))
    for label, runs in (("bare mitmdump", base), ("mitmdump + addon", filtered)):
        figures.row(LATENCY_TABLE, f"{label} p50 / p90 / p99",
                    f"{median([r.p50_ms for r in runs]):.3f} / "
                    f"{median([r.p90_ms for r in runs]):.3f} / "
                    f"{median([r.p99_ms for r in runs]):.3f} ms, "
                    f"{median([r.rps for r in runs]):,.0f} req/s")
    figures.row(LATENCY_TABLE, "added median latency (ms)",
                f"{added:+.3f} ms (pairwise {', '.join(f'{x:+.3f}' for x in pairwise)})",
                value=added)
    figures.row(LATENCY_TABLE, "added mitmdump cpu per request", f"{cpu_added:+.0f} us")
    figures.target(f"added median latency <= {LATENCY_TARGET_MS} ms (wrk -c1)", LATENCY_TABLE,
                   "added median latency (ms)", "max", LATENCY_TARGET_MS)
    problems = [line for proxy in (*bares, *addons) for line in log_problems(proxy)]
    assert not problems, problems


@pytest.mark.slow
def test_addon_hook_cost_in_process(workload: Workload, bench_dir: Path,
                                    figures: Figures) -> None:
    """Where the added time goes: the addon's `requestheaders` on the cycle's requests,
    in this process (no proxy, no sockets), by kind of URL. Fastest of 5 rounds."""
    from mitmproxy import http as mhttp
    from mitmproxy.test import taddons, tflow

    from netfilter.proxy import NetfilterAddon

    config = write_config(workload, bench_dir / "in-process")
    addon = NetfilterAddon()
    index_hosts = {f"idx{i}.example" for i in range(INDEX_HOSTS)}
    flows: dict[str, list[mhttp.HTTPFlow]] = {"outside the host index": [],
                                              "on host-index hosts, clean": [],
                                              "blocked (stop page)": []}
    with taddons.context(addon) as tctx:
        tctx.configure(addon, netfilter_config=str(config))
        try:
            for i, u in enumerate(workload.urls):
                authority = u.split("/", 3)[2]
                flow = tflow.tflow(req=mhttp.Request.make("GET", u, headers={"Host": authority}))
                kind = ("blocked (stop page)" if i in workload.refs else
                        "on host-index hosts, clean"
                        if authority.partition(":")[0] in index_hosts else
                        "outside the host index")
                flows[kind].append(flow)

            def run(group: list[mhttp.HTTPFlow]) -> None:
                for flow in group:
                    flow.response = None
                    addon.requestheaders(flow)

            print("\n(c) the addon's requestheaders in a tight loop in this process, per request:")
            costs: dict[str, float] = {}
            for kind, group in flows.items():
                run(group)
                assert all((f.response is not None) == (kind == "blocked (stop page)")
                           for f in group)
                costs[kind] = timed(functools.partial(run, group), 5) / len(group)
                print(f"  {kind:28} {costs[kind] * 1e6:8.1f} us  ({len(group)} URLs)")
                figures.time(HOOK_TABLE, f"tight loop: {kind}", costs[kind], unit="request",
                             note=f"{len(group)} URLs")
            mean = sum(costs[k] * len(g) for k, g in flows.items()) / len(workload.urls)
            print(f"  {'the cycle (weighted mean)':28} {mean * 1e6:8.1f} us")
            figures.time(HOOK_TABLE, "tight loop: the cycle (weighted mean)", mean,
                         unit="request")

            # parts of the clean path (clean URLs only)
            runtime = addon.runtime
            assert runtime is not None
            engine, policy = runtime.engine, runtime.policy
            clean = [u for i, u in enumerate(workload.urls) if i not in workload.refs]
            no_port = [re.sub(r":\d+/", "/", u, count=1) for u in clean]
            hosts = [u.split("/", 3)[2].partition(":")[0] for u in clean]

            def check(urls: list[str]) -> None:
                for u in urls:
                    engine.check_url(u, frontend="proxy", client=HOST, detail="GET")

            def allows() -> None:
                for host in hosts:
                    policy.allows(host)

            parts = {
                "tight loop: check_url as the addon asks (http://host:port/...)":
                    functools.partial(check, clean),
                "tight loop: check_url, the same URLs without the port":
                    functools.partial(check, no_port),
                "tight loop: allowed_destinations check of the host": allows,
            }
            for label, fn in parts.items():
                fn()
                cost = timed(fn, 5) / len(clean)
                print(f"  {label:66} {cost * 1e6:6.1f} us")
                figures.time(HOOK_TABLE, label, cost, unit="request")
        finally:
            addon.done()


@pytest.mark.slow
def test_addon_hook_time_inside_mitmdump(workload: Workload, bench_dir: Path, origin: Origin,
                                         router: Path, script: Path,
                                         figures: Figures) -> None:
    """One wrk -c8 run through a third mitmdump whose addon times its own
    requestheaders: the hook's share of mitmdump's CPU per request."""
    directory = bench_dir / "timed"
    config = write_config(workload, directory)
    out = directory / "hook-time.txt"
    wrapper = directory / "timed_netfilter_proxy.py"
    wrapper.write_text(TIMED_ADDON.format(src=str(REPO / "src"), out=str(out)),
                       encoding="utf-8")
    proxy = Proxy("timed", directory, router, config, script=wrapper)
    print(f"\n(d) requestheaders timed inside mitmdump, wrk -c{CONNECTIONS} -d{SECONDS}s")
    try:
        proxy.start()
        result = measured(proxy, script, origin, workload, seconds=SECONDS,
                          connections=CONNECTIONS)
        assert not log_problems(proxy), log_problems(proxy)
    finally:
        proxy.stop()
    calls, seconds = out.read_text().split()
    per_call = float(seconds) / int(calls)
    cpu = cpu_per_request_us(result)
    print(f"  requestheaders: {int(calls):,} calls, {per_call * 1e6:.1f} us each "
          f"({per_call * 1e6 / cpu:.1%} of mitmdump's {cpu:.0f} us cpu per request)")
    figures.time(HOOK_TABLE, "inside mitmdump under wrk -c8, the cycle (mean)", per_call,
                 unit="request", note=f"{per_call * 1e6 / cpu:.1%} of mitmdump's cpu/request")
    assert int(calls) >= result.requests


@pytest.mark.slow
def test_netfilter_resolve_keeps_upstream_connections(workload: Workload, bench_dir: Path,
                                                      origin: Origin, router: Path,
                                                      figures: Figures) -> None:
    """8 requests for one clean URL on one keep-alive connection, through the addon
    routing with netfilter_resolve only: all answered, over one upstream connection.
    (Applied in server_connect, as it once was, the route made mitmproxy open one
    connection per request, and the 6th waited forever for one of its 5.)"""
    directory = bench_dir / "resolve"
    config = write_config(workload, directory)
    proxy = Proxy("resolve", directory, router, config, routes=(f"*.example={HOST}",))
    url = next(u for i, u in enumerate(workload.urls) if i not in workload.refs)
    print(f"\n(e) netfilter_resolve: {RESOLVE_REQUESTS} requests for one URL on one "
          "keep-alive connection")
    answered, before = 0, origin.connections
    conn = http.client.HTTPConnection(HOST, proxy.port, timeout=RESOLVE_TIMEOUT)
    try:
        proxy.start()
        for _ in range(RESOLVE_REQUESTS):
            conn.request("GET", url, headers={"Host": url.split("/", 3)[2]})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                break
            answered += 1
    except OSError as e:  # the time-out
        print(f"  request {answered + 1} not answered in {RESOLVE_TIMEOUT} s: {e!r}")
    finally:
        conn.close()
        proxy.stop()
    opened = origin.connections - before
    print(f"  {answered} answered, {opened} upstream connections opened")
    figures.row(RESOLVE_TABLE, f"answered of {RESOLVE_REQUESTS} (one client connection)",
                f"{answered}")
    figures.row(RESOLVE_TABLE, "upstream connections opened", f"{opened}")
    assert answered == RESOLVE_REQUESTS
    assert opened == 1
