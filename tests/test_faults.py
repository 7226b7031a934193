"""Faults survived by one running service with every part at once (`netfilter serve` with
dns, stoppage, proxy, metrics and audit), against upstreams this test controls on
loopback: a DNS stub upstream switched between answering, silent (past the timeout),
garbage, the wrong query id and down (ICMP unreachable); an HTTP origin switched between
up, down and resetting every connection.

For each fault: the client gets a definite answer in time (SERVFAIL within dns.timeout;
502 from the proxy), blocked names and URLs are answered as before (they never need the
upstream or the origin), the service survives, its log has a specific line (rate-limited,
no client address) and a metric moved; once the fault is gone, answers and /readyz are
back. On reload, a corrupt, truncated or wrongly signed bundle is refused (the old list
stays in force, `netfilter_reloads_total{result="refused"}`, a `list-refused` event, one
log line); a config edited wrong, then SIGHUP: refused in one line, the old config stays.
The audit store held locked by another process: every DNS and proxy block is answered,
and the audit counters say what the log could not take.

Two cases run a service of their own (same parts, same config), as they would spoil the
shared one: the audit store's disk full (a small tmpfs, filled; root only): DNS and proxy
blocks answered, the failed appends and the shed events counted in /metrics and said in
the log, the log verifying once the disk has room; and `kill -9` while blocked queries
flow, then a start on the same state: the proxy child does not outlive serve, the log
verifies, and every block answered up to KILL_MARGIN before the kill is in it or counted
as shed. (tests/test_audit_never_waited.py and tests/test_audit_crash_loss.py test the
same faults on a DNS-only node, in more detail.)
"""

from __future__ import annotations

import http.client
import importlib.util
import inspect
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import netfilter.serve
from netfilter.keys import PrivateKey, generate_keypair, load_private_key
from netfilter.listfile import build_bundle
from tests.fault_support import FaultyOrigin, StubUpstream
from tests.flood import Flood, flood
from tests.support import (
    HOST,
    ChildProcess,
    fill_disk,
    free_port,
    hold_write_lock,
    read_events,
    small_tmpfs,
    wait_for,
)

TIMEOUT = 1.0  # dns.timeout of the service
SLACK = 0.6  # on top of it, for a loaded 2-core machine
DNS_CLIENT = "127.0.0.77"  # the clients' addresses, never to be seen in the log
PROXY_CLIENT = "127.0.0.78"
FLOODERS = ("127.0.0.2", "127.0.0.3")  # the clients of the kill -9 case
# what a kill -9 may lose: blocks answered in the last moments before it; the relay's
# per-second counts, the appender's linger (0.25 s) and a commit, as in
# tests/test_audit_crash_loss.py
KILL_MARGIN = 2.25
HAS_PROXY = importlib.util.find_spec("mitmproxy") is not None
HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
needs_proxy = pytest.mark.skipif(not HAS_PROXY, reason="mitmproxy (the proxy extra) is "
                                                       "not installed")
# SIGHUP re-reads the config only where serve knows how (another change brings it)
REREADS_CONFIG = "reread" in inspect.signature(netfilter.serve.serve).parameters

OLD_LIST = """\
issuer: Fault Test Authority
legal_basis: Test Act s. 1
contact: mailto:appeals@authority.test
entries:
  - {domain: blocked.example, ref: F-1, category: csam}
  - {domain: old-only.example, ref: F-OLD, category: csam}
  - {url: "http://partly.example/dir/", ref: F-2, category: csam}
"""
NEW_LIST = OLD_LIST.replace("old-only.example, ref: F-OLD", "new-only.example, ref: F-NEW")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ---------------------------------------------------------------- the service


class Service(ChildProcess):
    """`netfilter serve --config` with every part, its output in `serve.log`."""

    name = "netfilter serve"
    start_bound = 40.0
    stop_bound = 15.0

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.directory = directory
        self.config = config
        self.conf = directory / "netfilter.yaml"
        self.write_config(config)
        self.log_path = directory / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, config: dict[str, Any]) -> None:
        self.conf.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    @property
    def dns_port(self) -> int:
        return int(self.config["dns"]["listen"][0].rsplit(":", 1)[1])

    @property
    def metrics_port(self) -> int:
        return int(self.config["metrics"]["listen"].rsplit(":", 1)[1])

    @property
    def proxy_port(self) -> int:
        return int(self.config["proxy"]["listen"].rsplit(":", 1)[1])

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONUNBUFFERED"] = "1"
        self.popen([sys.executable, "-m", "netfilter.cli", "serve", "--config",
                    str(self.conf)], env=env, cwd=self.directory)
        self.wait_until(lambda: "netfilter: serving" in self.log(), pause=0.1)

    def mark(self) -> int:
        return len(self.log())

    def since(self, mark: int) -> list[str]:
        return self.log()[mark:].splitlines()

    def hup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop_page(self, host: str) -> int:
        """The stop page's status for a request to `host` (451: a block it knows)."""
        port = int(self.config["stoppage"]["listen"].rsplit(":", 1)[1])
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": host})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    # ------------------------------------------------------------ metrics, health

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://{HOST}:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def scrape(self) -> Samples:
        status, text = self.get("/metrics")
        assert status == 200
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    # ------------------------------------------------------------ proxy

    def fetch(self, url: str) -> tuple[int, float]:
        """GET `url` through the proxy from PROXY_CLIENT: the status and the time taken."""
        started = time.monotonic()
        conn = http.client.HTTPConnection(HOST, self.proxy_port, timeout=15,
                                          source_address=(PROXY_CLIENT, 0))
        try:
            conn.request("GET", url)
            response = conn.getresponse()
            response.read()
            return response.status, time.monotonic() - started
        finally:
            conn.close()


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass
class Rig:
    service: Service
    upstream: StubUpstream
    origin: FaultyOrigin
    bundle: Path  # the configured bundle file
    good: bytes  # what it holds when no case changes it: the old entries
    new_list: Path  # a good version 2 of the same list (blocks new-only, not old-only)
    key: PrivateKey  # the authority's
    stranger: PrivateKey  # a key the node does not trust

    @property
    def events(self) -> list[dict[str, Any]]:
        return read_events(self.service.directory / "audit.sqlite")


def _bundle(directory: Path, text: str, key: PrivateKey, version: int, name: str) -> Path:
    source = directory / f"{name}.yaml"
    source.write_text(text, encoding="utf-8")
    out = directory / f"{name}.nfl"
    build_bundle(source, out, key=key, list_id="faults", version=version)
    return out


def every_part(directory: Path, bundle: Path, trust: Path, upstream: StubUpstream,
               audit: Path | None = None, checkpoint_interval: float = 3600) -> dict[str, Any]:
    """The config of a service with every part (the proxy where mitmproxy is installed),
    on free loopback ports; its state in `directory`, its audit log at `audit`."""
    config: dict[str, Any] = {
        "node": {"id": "faults.test", "key": str(directory / "node.key")},
        "lists": [{"path": str(bundle), "trust": [str(trust)], "action": "nxdomain"}],
        # the answer cache off: these tests watch each query meet the faulty upstream;
        # one DNS process, whose log lines they count (each worker reports on its own)
        "dns": {"listen": [f"{HOST}:{free_port()}"], "upstreams": [upstream.address],
                "timeout": TIMEOUT, "cache_size": 0, "workers": 1},
        "stoppage": {"listen": f"{HOST}:{free_port()}"},
        "audit": {"path": str(audit or directory / "audit.sqlite"), "client": "truncated",
                  "checkpoint_interval": checkpoint_interval, "aggregate_window": 0,
                  "queue_size": 64},
        "metrics": {"listen": f"{HOST}:{free_port()}"},
    }
    if HAS_PROXY:
        config["proxy"] = {"listen": f"{HOST}:{free_port()}", "intercept": "none",
                           "confdir": str(directory / "mitmproxy"),
                           "allowed_destinations": ["127.0.0.0/8"]}
    return config


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory,
        authority: tuple[Path, Path]) -> Iterator[Rig]:
    directory = tmp_path_factory.mktemp("faults")
    key = load_private_key(authority[0])
    old = _bundle(directory, OLD_LIST, key, 1, "old")
    bundle = directory / "lists" / "faults.nfl"
    bundle.parent.mkdir()
    shutil.copyfile(old, bundle)
    stranger = load_private_key(generate_keypair(directory / "stranger")[0])
    upstream = StubUpstream()
    origin = FaultyOrigin()
    service = Service(directory, every_part(directory, bundle, authority[1], upstream))
    try:
        service.start()
        yield Rig(service, upstream, origin, bundle, bundle.read_bytes(),
                  _bundle(directory, NEW_LIST, key, 2, "new"), key, stranger)
    finally:
        status = service.stop()
        upstream.close()
        origin.close()
        output = service.log()
        print(f"----- serve.log -----\n{output[-20000:]}", file=sys.stderr)
    assert status == 0, "the service did not stop cleanly"
    assert "Traceback" not in output


@pytest.fixture(autouse=True)
def healthy(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every case on the rig starts and ends with working upstreams and the service
    alive (the cases with a service of their own leave the rig alone)."""
    if "rig" not in request.fixturenames:
        yield
        return
    rig: Rig = request.getfixturevalue("rig")
    rig.upstream.switch("answer")
    rig.origin.switch("up")
    yield
    rig.upstream.switch("answer")
    rig.origin.switch("up")
    rig.bundle.write_bytes(rig.good)
    assert rig.service.alive(), rig.service.log()[-5000:]


# ---------------------------------------------------------------- DNS clients


@dataclass
class Answer:
    name: str
    rcode: int | None  # None: no answer within the client's wait
    seconds: float


def ask(port: int, names: list[str], wait: float = TIMEOUT + SLACK) -> list[Answer]:
    """Query every name (type A) at once from DNS_CLIENT, each on its own socket; each
    answer's rcode and how long it took (None when none came within `wait`)."""
    sockets: list[tuple[socket.socket, int]] = []  # with the query's id
    answers: dict[int, Answer] = {}  # by position in `names`
    started = time.monotonic()
    try:
        for name in names:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append((sock, 0))
            sock.bind((DNS_CLIENT, 0))
            query = dns.message.make_query(name, "A")
            sock.sendto(query.to_wire(), (HOST, port))
            sockets[-1] = (sock, query.id)
        waiting = {sock.fileno(): i for i, (sock, _) in enumerate(sockets)}
        while waiting:
            left = started + wait - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(waiting), [], [], left)
            for fd in ready:
                i = waiting.pop(fd)
                sock, query_id = sockets[i]
                response = dns.message.from_wire(sock.recv(65535))
                assert response.id == query_id
                answers[i] = Answer(names[i], response.rcode(), time.monotonic() - started)
    finally:
        for sock, _ in sockets:
            sock.close()
    return [answers.get(i, Answer(name, None, wait)) for i, name in enumerate(names)]


COUNTER = iter(range(1_000_000))


def fresh(label: str) -> str:
    """A clean name never asked before: its first query takes the full (Python) path."""
    return f"n{next(COUNTER)}-{label}.clean.test"


WARM = "warm.clean.test"  # asked while the upstream answers: then by the C relay


# ---------------------------------------------------------------- DNS upstream faults


@dataclass(frozen=True)
class DnsFault:
    mode: str
    line: str  # the specific log line
    moved: tuple[str, ...]  # metrics (labelled by upstream where marked "{upstream}")


DNS_FAULTS = [
    DnsFault("silent", "did not answer within", ("netfilter_upstream_timeouts_total{upstream}",)),
    DnsFault("garbage", "sent a packet that is not a DNS response",
             ("netfilter_dns_upstream_mismatch_total",
              "netfilter_upstream_timeouts_total{upstream}")),
    DnsFault("wrong-id", "whose id is of no query in flight",
             ("netfilter_dns_upstream_mismatch_total",
              "netfilter_upstream_timeouts_total{upstream}")),
]
DOWN = DnsFault("down", "unreachable (ICMP error)",
                ("netfilter_upstream_errors_total{upstream}",))


def survive(rig: Rig, fault: DnsFault, *, relay_recovers: bool = True) -> None:
    """Clean names get SERVFAIL in time (by the full path and by the C relay), blocked
    names their block, the log one specific line, the metrics move, /readyz says
    "upstream"; once the upstream answers again, so do clean names and /readyz."""
    service, upstream = rig.service, rig.upstream
    port = service.dns_port
    # the upstream answers: a warm name for the C relay, and ready
    assert [a.rcode for a in ask(port, [WARM, fresh("before")])] == [dns.rcode.NOERROR] * 2
    assert service.get("/readyz") == (200, "ready\n")  # (readiness compares with this)
    before, mark = service.scrape(), service.mark()

    upstream.switch(fault.mode)
    clean = [fresh(fault.mode) for _ in range(4)] + [WARM] * 2
    blocked = ["blocked.example", "x.old-only.example", f"{fault.mode}.blocked.example"]
    answers = ask(port, clean + blocked)
    for answer in answers[: len(clean)]:  # a definite answer, within the timeout
        assert answer.rcode == dns.rcode.SERVFAIL, answer
        assert answer.seconds <= TIMEOUT + SLACK, answer
    for answer in answers[len(clean):]:  # blocks never need the upstream
        assert answer.rcode == dns.rcode.NXDOMAIN, answer
        assert answer.seconds < 0.5, answer
    # the log says what is wrong, once (rate-limited), and names no client
    assert wait_for(lambda: any(fault.line in line for line in service.since(mark)), 3)
    lines = service.since(mark)
    assert sum(fault.line in line for line in lines) == 1, lines
    assert not any(DNS_CLIENT in line for line in lines), lines
    # the metrics say so too
    after = service.scrape()
    labels = {"upstream": upstream.address}
    for metric in fault.moved:
        name, _, labelled = metric.partition("{")
        by = labels if labelled else {}
        assert value(after, name, **by) > value(before, name, **by), metric
    assert value(after, "netfilter_dns_servfail_total") >= \
        value(before, "netfilter_dns_servfail_total") + 4
    assert service.get("/readyz") == (503, "not ready: upstream\n")
    assert service.get("/healthz") == (200, "ok\n")

    upstream.switch("answer")  # recovered: answers and readiness are back
    names = [fresh("after")] + ([WARM] if relay_recovers else [])
    assert [a.rcode for a in ask(port, names)] == [dns.rcode.NOERROR] * len(names)
    assert service.get("/readyz") == (200, "ready\n")


@pytest.mark.parametrize("fault", DNS_FAULTS, ids=[f.mode for f in DNS_FAULTS])
def test_upstream_fault(rig: Rig, fault: DnsFault) -> None:
    survive(rig, fault)


# ---------------------------------------------------------------- origin faults


ORIGIN_FAULT_LINE = "proxy: origin "  # the addon's one line per kind and interval
ORIGIN_FAULT_KIND = {"down": "refused", "reset": "reset"}
FAULT_INTERVAL_SLACK = 10.5  # the addon's interval between two lines of one kind, and some


@needs_proxy
@pytest.mark.parametrize("mode", ["down", "reset"])
def test_origin_fault(rig: Rig, mode: str) -> None:
    """502 at once, blocked URLs answered as before, the service alive; back once the
    origin is."""
    service, origin = rig.service, rig.origin
    page = f"http://{HOST}:{origin.port}/page.html"
    assert service.fetch(page)[0] == 200
    mark = service.mark()
    origin.switch(mode)
    for _ in range(3):
        status, seconds = service.fetch(page)
        assert status == 502 and seconds < 5, (status, seconds)
        # blocked URLs never need the origin
        assert service.fetch("http://partly.example/dir/page.html")[0] == 451
        assert service.fetch("http://old-only.example/")[0] == 451
    assert wait_for(lambda: any(ORIGIN_FAULT_LINE in line and str(origin.port) in line
                                for line in service.since(mark)), 3), service.since(mark)
    assert not any(PROXY_CLIENT in line for line in service.since(mark))
    origin.switch("up")
    assert service.fetch(page)[0] == 200
    assert service.get("/healthz") == (200, "ok\n")


@needs_proxy
@pytest.mark.parametrize("mode", ["down", "reset"])
def test_origin_fault_is_one_specific_log_line(rig: Rig, mode: str) -> None:
    """Eight failed requests within the interval: one line that names the kind and the
    origin (mitmproxy's own line per failed connection is gone), no client."""
    service, origin = rig.service, rig.origin
    page = f"http://{HOST}:{origin.port}/page.html"
    origin.switch("up")
    assert service.fetch(page)[0] == 200
    time.sleep(FAULT_INTERVAL_SLACK)  # a line said by an earlier test is out of the way
    mark = service.mark()
    origin.switch(mode)
    for _ in range(8):
        assert service.fetch(page)[0] == 502
    time.sleep(0.3)  # the child's lines reach the log
    lines = [line for line in service.since(mark) if str(origin.port) in line and any(
        word in line.lower() for word in ("error", "reset", "refused", "failed"))]
    assert len(lines) == 1, service.since(mark)
    assert ORIGIN_FAULT_LINE in lines[0] and ORIGIN_FAULT_KIND[mode] in lines[0], lines
    assert PROXY_CLIENT not in lines[0]


@needs_proxy
@pytest.mark.parametrize("mode", ["down", "reset"])
def test_origin_fault_moves_a_metric(rig: Rig, mode: str) -> None:
    """netfilter_origin_errors_total of the fault's kind moves by the failed requests;
    the proxy's requests and blocks are on the node's /metrics (from its child)."""
    service, origin = rig.service, rig.origin
    kind = (("kind", ORIGIN_FAULT_KIND[mode]),)
    allowed = ("netfilter_requests_total", frozenset({("frontend", "proxy"),
                                                      ("verdict", "allow")}))
    blocked = ("netfilter_requests_total", frozenset({("frontend", "proxy"),
                                                      ("verdict", "block")}))
    before = service.scrape()
    origin.switch(mode)
    for _ in range(3):
        assert service.fetch(f"http://{HOST}:{origin.port}/page.html")[0] == 502
    assert service.fetch("http://partly.example/dir/page.html")[0] == 451
    after = service.scrape()
    errors = ("netfilter_origin_errors_total", frozenset(kind))
    assert after[errors] - before.get(errors, 0.0) == 3
    assert after[allowed] - before.get(allowed, 0.0) == 3  # sent on; the origin failed
    assert after[blocked] - before.get(blocked, 0.0) == 1
    timed = ("netfilter_request_duration_seconds_count", frozenset({("frontend", "proxy")}))
    assert after[timed] - before.get(timed, 0.0) == 4
    proxy_blocks = sum(number - before.get(key, 0.0) for key, number in after.items()
                       if key[0] == "netfilter_blocks_total"
                       and ("frontend", "proxy") in key[1])
    assert proxy_blocks == 1


@needs_proxy
def test_a_stalled_proxy_child_costs_a_scrape_one_second(rig: Rig) -> None:
    """The proxy's counters come from its mitmdump child at each scrape. A child that
    does not answer (stopped here with SIGSTOP) must not stall /metrics beyond the
    ask's bound, nor leave /readyz saying ready; once it runs again, both are back.
    While a scrape waits for it, DNS answers and /healthz do not (the metrics listener
    shares serve's loop; a scrape's waiting is done on a thread of its own)."""
    service = rig.service
    found = re.search(r"mitmdump pid (\d+)", service.log())
    assert found, service.log()
    child = int(found.group(1))
    assert service.get("/readyz")[0] == 200
    os.kill(child, signal.SIGSTOP)
    try:
        scraped: list[tuple[int, str]] = []
        scraping = threading.Thread(target=lambda: scraped.append(service.get("/metrics")))
        started = time.monotonic()
        scraping.start()
        time.sleep(0.2)  # the scrape is asking the stopped child now
        [answer] = ask(service.dns_port, ["blocked.example"])  # decided on serve's loop
        assert answer.rcode == dns.rcode.NXDOMAIN and answer.seconds < 0.5, answer
        healthz = time.monotonic()
        assert service.get("/healthz") == (200, "ok\n")
        assert time.monotonic() - healthz < 0.5
        scraping.join(10)
        # get() gives up after 5 s: without the ask's bound (1 s) this would hang
        assert scraped and time.monotonic() - started < 3.0
        status, text = scraped[0]
        assert status == 200 and "netfilter_requests_total" in text
        assert "netfilter_proxy_requests_total" not in text  # the child's families left out
        assert service.get("/readyz") == (503, "not ready: proxy\n")
    finally:
        os.kill(child, signal.SIGCONT)
    assert wait_for(lambda: service.get("/readyz")[0] == 200, 5)
    assert "netfilter_proxy_requests_total" in service.get("/metrics")[1]


# ---------------------------------------------------------------- bundle faults on reload


def _corrupt(rig: Rig) -> bytes:
    data = bytearray(rig.new_list.read_bytes())
    for at in range(len(data) // 2, len(data) // 2 + 64):
        data[at] ^= 0xFF
    return bytes(data)


def _truncated(rig: Rig) -> bytes:
    return rig.new_list.read_bytes()[: len(rig.new_list.read_bytes()) // 2]


def _wrongly_signed(rig: Rig) -> bytes:
    out = _bundle(rig.service.directory, NEW_LIST, rig.stranger, 2, "stranger-signed")
    return out.read_bytes()


BAD_BUNDLES = {"corrupt": _corrupt, "truncated": _truncated, "wrongly-signed": _wrongly_signed}


@pytest.mark.parametrize("kind", list(BAD_BUNDLES))
def test_bad_bundle_on_reload_keeps_the_old_list(rig: Rig, kind: str) -> None:
    service = rig.service
    before, mark = service.scrape(), service.mark()
    rig.bundle.write_bytes(BAD_BUNDLES[kind](rig))
    service.hup()
    refused = "netfilter_reloads_total"
    assert wait_for(lambda: value(service.scrape(), refused, result="refused")
                    > value(before, refused, result="refused"), 10)
    # the old list stays in force: what only it blocks is still blocked
    answers = ask(service.dns_port, ["old-only.example", "new-only.example"])
    assert [a.rcode for a in answers] == [dns.rcode.NXDOMAIN, dns.rcode.NOERROR]
    assert service.stop_page("old-only.example") == 451
    if HAS_PROXY:
        assert service.fetch("http://old-only.example/")[0] == 451
    after = service.scrape()
    assert value(after, refused, result="ok") == value(before, refused, result="ok")
    version = ("netfilter_list_version", {"list": "faults", "source": "authority"})
    assert value(after, version[0], **version[1]) == value(before, version[0], **version[1])
    lines = [line for line in service.since(mark)  # serve's own (not mitmdump's)
             if "refused" in line and line.startswith("netfilter: ERROR")]
    assert len(lines) == 1, service.since(mark)


@pytest.mark.parametrize("kind", ["corrupt"])
def test_a_refused_bundle_is_an_audit_event(rig: Rig, kind: str) -> None:
    service = rig.service
    before = service.scrape()
    refused_events = sum(e["type"] == "list-refused" for e in rig.events)
    rig.bundle.write_bytes(BAD_BUNDLES[kind](rig))
    service.hup()
    refused = "netfilter_reloads_total"
    assert wait_for(lambda: value(service.scrape(), refused, result="refused")
                    > value(before, refused, result="refused"), 10)
    assert wait_for(lambda: sum(e["type"] == "list-refused" for e in rig.events)
                    > refused_events, 5), "no list-refused event"


def test_good_bundle_on_reload_is_taken(rig: Rig) -> None:
    """The control case: the same steps with a good version 2 swap the lists."""
    service = rig.service
    before = service.scrape()
    rig.bundle.write_bytes(rig.new_list.read_bytes())
    service.hup()
    ok = "netfilter_reloads_total"
    assert wait_for(lambda: value(service.scrape(), ok, result="ok")
                    > value(before, ok, result="ok"), 10)
    answers = ask(service.dns_port, ["old-only.example", "new-only.example"])
    assert [a.rcode for a in answers] == [dns.rcode.NOERROR, dns.rcode.NXDOMAIN]
    # back to the old entries: as a new version (version 1 again would be a rollback)
    rig.good = _bundle(service.directory, OLD_LIST, rig.key, 3, "old-again").read_bytes()
    rig.bundle.write_bytes(rig.good)
    service.hup()
    assert wait_for(lambda: value(service.scrape(), "netfilter_list_version", list="faults",
                                  source="authority") == 3, 10)


# ---------------------------------------------------------------- config faults on reload


@pytest.mark.skipif(not REREADS_CONFIG, reason="serve does not re-read its config on "
                                               "SIGHUP yet")
def test_config_edited_wrong_keeps_the_old_config(rig: Rig) -> None:
    service = rig.service
    before, mark = service.scrape(), service.mark()
    broken = {**service.config, "dns": {**service.config["dns"], "timeout": "soon"}}
    service.write_config(broken)
    try:
        service.hup()
        refused = "netfilter_reloads_total"
        assert wait_for(lambda: value(service.scrape(), refused, result="refused")
                        > value(before, refused, result="refused"), 10)
        lines = [line for line in service.since(mark) if "refused" in line]
        assert len(lines) == 1 and "dns.timeout" in lines[0], service.since(mark)
        # still answering, with the old config and lists
        answers = ask(service.dns_port, ["old-only.example", WARM])
        assert [a.rcode for a in answers] == [dns.rcode.NXDOMAIN, dns.rcode.NOERROR]
        assert service.alive()
    finally:
        service.write_config(service.config)


# ---------------------------------------------------------------- the audit store locked




def test_locked_audit_store_never_stops_answers(rig: Rig) -> None:
    service = rig.service
    before, mark = service.scrape(), service.mark()
    holder = hold_write_lock(service.directory / "audit.sqlite", 4)
    try:
        end, blocked, proxied = time.monotonic() + 3.0, 0, 0
        while time.monotonic() < end and blocked < 3000:
            names = [f"n{blocked + i}.blocked.example" for i in range(20)]
            answers = ask(service.dns_port, names)
            assert all(a.rcode == dns.rcode.NXDOMAIN for a in answers), answers
            blocked += len(names)
            if HAS_PROXY and proxied < 20:
                status, seconds = service.fetch(f"http://partly.example/dir/{proxied}.html")
                assert status == 451 and seconds < 2, (status, seconds)
                proxied += 1
        assert service.stop_page("x.blocked.example") == 451
        during = service.scrape()
        assert holder.wait(30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    assert blocked >= 200
    audit = "netfilter_audit_"
    # the queue filled while the store was locked: shed, counted
    assert value(during, f"{audit}shed_total") > value(before, f"{audit}shed_total")
    assert wait_for(lambda: value(service.scrape(), f"{audit}appended_total")
                    > value(during, f"{audit}appended_total"), 10)
    assert wait_for(lambda: any(e["type"] == "shed" for e in rig.events), 10)
    shedding = [line for line in service.since(mark) if "events shed since" in line]
    assert 1 <= len(shedding) <= 2, service.since(mark)  # loud, and rate-limited
    assert not any(DNS_CLIENT in line or PROXY_CLIENT in line for line in service.since(mark))
    assert service.get("/healthz") == (200, "ok\n")


# ---------------------------------------------------------------- the upstream down
# Last in the module: before the relay re-registered its reader, uvloop stopped reading
# the upstream socket after an ICMP error, which the cases above must not inherit.


def test_upstream_down(rig: Rig) -> None:
    survive(rig, DOWN, relay_recovers=True)


def test_a_flood_of_failing_queries_costs_the_log_a_few_lines(rig: Rig) -> None:
    """Hundreds of queries to a dead upstream: every one answered, the log stays short."""
    service = rig.service
    mark = service.mark()
    rig.upstream.switch("down")
    names = [fresh("flood") for _ in range(150)] + [WARM] * 50
    answers = ask(service.dns_port, names, wait=TIMEOUT + 2 * SLACK)
    assert all(a.rcode == dns.rcode.SERVFAIL for a in answers), \
        [a for a in answers if a.rcode != dns.rcode.SERVFAIL][:5]
    lines = [line for line in service.since(mark) if "dns: upstream" in line]
    assert len(lines) <= 2, lines  # one per kind, at most every 10 s
    assert not any(DNS_CLIENT in line for line in lines), lines


def test_the_relay_recovers_after_the_upstream_was_down(rig: Rig) -> None:
    port = rig.service.dns_port
    assert [a.rcode for a in ask(port, [WARM, WARM])] == [dns.rcode.NOERROR] * 2
    rig.upstream.switch("down")
    assert [a.rcode for a in ask(port, [WARM, WARM])] == [dns.rcode.SERVFAIL] * 2
    rig.upstream.switch("answer")
    for _ in range(3):  # one at a time: a relayed name, again and again
        assert [a.rcode for a in ask(port, [WARM])] == [dns.rcode.NOERROR]


# ---------------------------------------------------------------- the audit store's
# disk full, and kill -9 under load: each on a service of its own (the rig's log and
# process stay as the cases above expect them)


def lone_service(directory: Path, authority: tuple[Path, Path], upstream: StubUpstream,
                 audit: Path | None = None, checkpoint_interval: float = 3600) -> Service:
    """A service with every part (not started), on the old list, state in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    bundle = _bundle(directory, OLD_LIST, load_private_key(authority[0]), 1, "faults")
    return Service(directory, every_part(directory, bundle, authority[1], upstream, audit,
                                         checkpoint_interval))


def audit_verify(service: Service) -> subprocess.CompletedProcess[str]:
    """`netfilter audit verify` on the service's log, trusting its node key."""
    key = Path(service.config["node"]["key"])
    return subprocess.run([sys.executable, "-m", "netfilter.cli", "audit", "verify", "--log",
                           service.config["audit"]["path"], "--trust",
                           str(key.with_suffix(".pub"))],
                          capture_output=True, text=True, timeout=60, check=False)


def test_full_audit_disk_never_stops_answers(tmp_path: Path,
                                             authority: tuple[Path, Path]) -> None:
    """The audit store's disk full (a small tmpfs, filled): every DNS and proxy block is
    answered, the log says so in its own lines, the metrics count the failed appends and
    the shed events; once the disk has room, the log takes writes again and verifies."""
    upstream = StubUpstream()
    with small_tmpfs(tmp_path / "disk", 32) as disk:
        service = lone_service(tmp_path / "node", authority, upstream, disk / "audit.sqlite")
        try:
            service.start()
            assert ask(service.dns_port, ["blocked.example"])[0].rcode == dns.rcode.NXDOMAIN
            before, mark = service.scrape(), service.mark()
            filler = fill_disk(disk)
            audit, blocked, proxied = "netfilter_audit_", 0, 0

            def moved(samples: Samples) -> bool:
                return all(value(samples, f"{audit}{name}_total")
                           > value(before, f"{audit}{name}_total")
                           for name in ("shed", "append_failures"))

            # blocks until the log both failed to append and shed (bounded in count)
            while blocked < 20000 and not (blocked % 400 == 0 and moved(service.scrape())):
                names = [f"n{blocked + i}.blocked.example" for i in range(20)]
                answers = ask(service.dns_port, names)
                assert all(a.rcode == dns.rcode.NXDOMAIN for a in answers), answers
                blocked += len(names)
                if HAS_PROXY and proxied < 20:
                    assert service.fetch(f"http://partly.example/dir/{proxied}.html")[0] == 451
                    proxied += 1
            during = service.scrape()
            assert moved(during), f"{blocked} blocks, and the audit metrics did not move"
            assert service.stop_page("x.blocked.example") == 451
            assert service.get("/healthz") == (200, "ok\n")
            lines = service.since(mark)
            # the line names the cause (SQLite's own words)
            assert any("audit: append failed (database or disk is full)" in line
                       for line in lines), lines
            shedding = [line for line in lines if "events shed since" in line]
            assert 1 <= len(shedding) <= 2, lines  # loud, and rate-limited
            assert not any(DNS_CLIENT in line or PROXY_CLIENT in line for line in lines)
            filler.unlink()  # room again: the log takes writes, and says what it shed
            assert wait_for(lambda: value(service.scrape(), f"{audit}appended_total")
                            > value(during, f"{audit}appended_total"), 15)
            assert wait_for(lambda: any(e["type"] == "shed" for e in read_events(
                disk / "audit.sqlite")), 15)
        finally:
            status = service.stop()
            upstream.close()
            print(f"----- serve.log -----\n{service.log()[-5000:]}", file=sys.stderr)
        assert status == 0 and "Traceback" not in service.log()
        verify = audit_verify(service)
        assert verify.returncode == 0 and verify.stdout.startswith("OK"), \
            verify.stdout + verify.stderr


def logged_blocks(events: list[dict[str, Any]]) -> int:
    """The blocks a log's events hold: the relay's come as one event with a count per
    (answer, client) and second."""
    return sum(int(e.get("count") or 1) for e in events if e["type"] == "block")


def _state(pid: int) -> str:
    """A process's state letter (R, S, Z, ...); "gone" once it is no more."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[0]


def _pid_gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by whoever inherited it counts as exited)."""
    return _state(pid) in ("gone", "Z", "X")


def test_kill_9_under_load_then_restart(tmp_path: Path,
                                        authority: tuple[Path, Path]) -> None:
    """`kill -9` of the service while blocked queries flow from two clients, then a
    start on the same state: it serves again, `netfilter audit verify` passes, and every
    block answered up to KILL_MARGIN before the kill is in the log or counted as shed."""
    upstream = StubUpstream()
    service = lone_service(tmp_path, authority, upstream, checkpoint_interval=1)
    audit = Path(service.config["audit"]["path"])
    results: list[Flood] = []
    stop = threading.Event()
    clients = [threading.Thread(target=lambda s=s: results.append(
        flood(service.dns_port, 30.0, source=s, stop=stop))) for s in FLOODERS]
    child: int | None = None
    try:
        service.start()
        found = re.search(r"mitmdump pid (\d+)", service.log())
        child = int(found.group(1)) if found else None
        for c in clients:
            c.start()
        # under load for longer than a kill may lose, and the log has taken a good
        # many blocks, the relay's counts among them (bounded wait)
        time.sleep(KILL_MARGIN + 1.0)
        assert wait_for(lambda: logged_blocks(read_events(audit)) >= 20000, 20), \
            service.log()[-3000:]
        assert service.proc is not None
        killed_at = time.monotonic()
        os.kill(service.proc.pid, signal.SIGKILL)
        service.proc.wait(10)
        stop.set()
        for c in clients:
            c.join(15)
        if child is not None:  # the proxy child goes with it, freeing its port
            assert wait_for(lambda: _pid_gone(child), 10), \
                f"mitmdump outlived serve (state {_state(child)})"
        answered = Flood(answers=sorted(t for r in results for t in r.answers))
        sent = sum(r.sent for r in results)
        assert all(set(r.rcodes) <= {dns.rcode.NXDOMAIN} for r in results), results
        # a start on the same state (config, node key, audit log): it serves again
        service.log_path = tmp_path / "serve-again.log"
        service.start()
        assert ask(service.dns_port, [WARM])[0].rcode == dns.rcode.NOERROR
        if HAS_PROXY:
            assert service.fetch("http://partly.example/dir/x.html")[0] == 451
            answered.answers.append(time.monotonic())  # that block is logged too
            sent += 1
    finally:
        stop.set()
        status = service.stop()
        upstream.close()
        if child is not None and not _pid_gone(child):
            os.kill(child, signal.SIGKILL)
        print(f"----- serve-again.log -----\n{service.log()[-5000:]}", file=sys.stderr)
    assert status == 0 and "Traceback" not in service.log()
    verify = audit_verify(service)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("OK") and "WARN" not in verify.stdout, verify.stdout
    events = read_events(audit)
    logged = logged_blocks(events)
    shed = sum(int(e.get("count", 0)) for e in events if e["type"] == "shed")
    before_kill = answered.answered_before(killed_at - KILL_MARGIN)
    print(f"kill -9 under load: {len(answered.answers)} blocks answered ({before_kill} "
          f"{KILL_MARGIN} s before the kill), {logged} logged, {shed} shed")
    assert before_kill > 2000, "too little load to say anything"
    assert before_kill <= logged + shed, "blocks answered before the kill are missing"
    assert logged <= sent  # never a block the service was not asked for
