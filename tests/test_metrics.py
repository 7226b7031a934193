"""Metrics and health: the labelled families over a real engine and audit log, and a real
`netfilter serve dns` scraped over HTTP (/metrics, /healthz, /readyz)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dns.message
import dns.rcode
import pytest
import yaml
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from netfilter.audit.log import AuditLog
from netfilter.config import load_config
from netfilter.dns.udp import relay_built
from netfilter.engine import Engine
from netfilter.metrics import BUCKETS, LatencyHistogram, NodeMetrics, for_node
from netfilter.node import make_engine
from netfilter.stoppage.server import StopPageServer
from netfilter.web.metrics import MetricsSite
from netfilter.web.server import Standalone, bind_tcp
from tests.conftest import BuildBundle
from tests.dns_support import (
    DEMO_ALLOW,
    HOST,
    Netfilter,
    Unbound,
    free_port,
    require_tools,
    start_all,
    udp,
)
from tests.support import connect_from, small_tmpfs

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample by name and labels, read with Prometheus' own parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def make(build: BuildBundle, authority: tuple[Path, Path], directory: Path,
         audit: Path) -> Engine:
    bundle = build(list_id="auth", version=3, expires=datetime.now(UTC) + timedelta(days=2))
    config = directory / "netfilter.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"id": "metrics-test", "key": str(directory / "node.key")},
        "lists": [{"path": str(bundle), "trust": [str(authority[1])], "action": "nxdomain"}],
        "local": {"allow": str(DEMO_ALLOW)},
        "audit": {"path": str(audit), "client": "full", "aggregate_window": 0},
        "stoppage": {"listen": f"{HOST}:0"},
    }), encoding="utf-8")
    return make_engine(load_config(config))


@pytest.fixture
def engine(build: BuildBundle, authority: tuple[Path, Path], tmp_path: Path) -> Iterator[Engine]:
    engine = make(build, authority, tmp_path, tmp_path / "audit.sqlite")
    try:
        yield engine
    finally:
        engine.close()


def test_histogram_buckets_are_cumulative() -> None:
    histogram = LatencyHistogram()
    for seconds in (0.0001, 0.0001, 0.003, 100.0):
        histogram.observe(seconds)
    buckets = dict(histogram.buckets())
    assert buckets[str(BUCKETS[0])] == 2 and buckets["0.005"] == 3 and buckets["+Inf"] == 4
    assert histogram.sum == pytest.approx(100.0032)


def test_engine_and_audit_families(engine: Engine) -> None:
    for _ in range(3):
        assert engine.check_host("a.blocked.example", frontend="dns").blocked
    assert engine.check_url("http://partly.example/dir/x", frontend="proxy").blocked
    assert not engine.check_host("cleared.blocked.example", frontend="dns").blocked
    assert not engine.check_host("clean.example", frontend="dns").blocked
    assert engine.reload()
    engine.flush()
    audit = engine.sink
    assert isinstance(audit, AuditLog)
    audit.flush()
    audit.checkpoint()

    metrics = for_node(engine)
    samples = parse(metrics.render().decode())
    blocks = "netfilter_blocks_total"
    assert value(samples, blocks, frontend="dns", list="auth", category="csam",
                 action="nxdomain") == 3
    assert value(samples, blocks, frontend="proxy", list="auth", category="csam",
                 action="nxdomain") == 1
    # the exception lifted a match: counted apart, never as a block
    assert value(samples, "netfilter_exceptions_total", frontend="dns", list="auth",
                 category="csam") == 1
    assert sum(v for (name, _), v in samples.items() if name == blocks) == 4
    assert not any("client" in dict(labels) or "name" in dict(labels)
                   for _, labels in samples)  # never by client or name
    assert value(samples, "netfilter_reloads_total", result="ok") == 1
    assert value(samples, "netfilter_reloads_total", result="refused") == 0
    assert value(samples, "netfilter_list_version", list="auth", source="authority") == 3
    assert value(samples, "netfilter_list_entries", list="auth", source="authority") == 8
    assert 0 <= value(samples, "netfilter_list_age_seconds", list="auth") < 600
    expiry = value(samples, "netfilter_list_expiry_seconds", list="auth")
    assert 2 * 86400 - 600 < expiry <= 2 * 86400
    assert value(samples, "netfilter_audit_appended_total") >= 3  # list-loaded x2, blocks
    assert value(samples, "netfilter_audit_queued") == 0
    assert 0 <= value(samples, "netfilter_audit_last_checkpoint_age_seconds") < 60
    assert metrics.not_ready() == []


def test_refused_reload_is_counted(engine: Engine, tmp_path: Path) -> None:
    path = Path(engine.settings.resolve(engine.settings.lists[0].path))
    path.write_bytes(b"not a bundle")
    assert not engine.reload()
    samples = parse(for_node(engine).render().decode())
    assert value(samples, "netfilter_reloads_total", result="refused") == 1
    assert value(samples, "netfilter_list_version", list="auth", source="authority") == 3


@contextlib.contextmanager
def served(metrics: NodeMetrics) -> Iterator[Standalone]:
    """`metrics` on the listener of metrics.listen (its limits), on a loop of its own."""
    site = MetricsSite(metrics)
    server = Standalone([site.listener(bind_tcp(HOST, 0))])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        site.close()
        thread.join(5)


def test_health_endpoints(engine: Engine) -> None:
    with served(for_node(engine)) as server:
        base = f"http://{HOST}:{server.server_address[1]}"
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/readyz") == (200, "ready\n")
        status, text = get(f"{base}/metrics")
        assert status == 200 and "netfilter_reloads_total" in text
        assert get(f"{base}/health")[0] == 404  # renamed to /healthz
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
            assert response.headers["Cache-Control"] == "no-store"
            assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_a_blocking_scrape_holds_neither_the_loop_nor_a_thread_per_request() -> None:
    """A scrape's blocking work (asking a stalled child: 1 s) runs off the loop, so
    /healthz answers meanwhile; scrapes that come together share the next run."""
    metrics = NodeMetrics()
    asked: list[float] = []

    def stalled_child() -> None:
        asked.append(time.monotonic())
        time.sleep(1.0)

    metrics.add_refresh(stalled_child)
    with served(metrics) as server:
        base = f"http://{HOST}:{server.server_address[1]}"
        results: list[tuple[int, str]] = []
        scrapes = [threading.Thread(target=lambda: results.append(get(f"{base}/metrics")))
                   for _ in range(8)]
        started = time.monotonic()
        for thread in scrapes:
            thread.start()
        time.sleep(0.2)
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert time.monotonic() - started < 0.7
        for thread in scrapes:
            thread.join(10)
        assert [status for status, _ in results] == [200] * 8
        assert len(asked) == 2  # the first, and one for all that came while it ran
        assert time.monotonic() - started < 3.0


def test_limits_hold_on_the_metrics_listener(engine: Engine) -> None:
    """A slowloris from one address (heads begun, never finished) and silent
    connections from many cost them their own oldest connections, never another
    client its scrape."""
    with served(for_node(engine)) as server:
        port = server.server_address[1]
        held: list[socket.socket] = []
        try:
            for _ in range(40):  # one address: at most 16 of these stay
                sock = connect_from(port, "127.0.0.2")
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                held.append(sock)
            for i in range(300):  # 30 addresses sending nothing: more than the 256 slots
                held.append(connect_from(port, f"127.0.0.{10 + i // 10}"))
            start = time.monotonic()
            conn = http.client.HTTPConnection(HOST, port, timeout=5,
                                              source_address=("127.0.0.3", 0))
            try:
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                assert response.status == 200 and b"netfilter_reloads_total" in response.read()
            finally:
                conn.close()
            assert time.monotonic() - start < 1.0
            assert len(server.slots) <= 256
            closed = 0
            for sock in held[:40]:  # evicted for the same address's newer ones
                sock.settimeout(0.5)
                try:
                    closed += sock.recv(1) == b""
                except ConnectionResetError:
                    closed += 1
                except TimeoutError:
                    pass
            assert closed >= 40 - 16
        finally:
            for sock in held:
                sock.close()


def test_stop_page_requests_and_latency(engine: Engine) -> None:
    settings = engine.settings.stoppage
    assert settings is not None

    def ask(port: int, host: str) -> int:
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        try:
            conn.request("GET", "/", headers={"Host": host})
            return conn.getresponse().status
        finally:
            conn.close()

    async def main() -> Samples:
        server = StopPageServer(engine, settings)
        await server.start()
        try:
            assert await asyncio.to_thread(ask, server.port, "blocked.example") == 451
            await asyncio.to_thread(ask, server.port, "clean.example")  # the generic page
            return parse(for_node(engine, [server]).render().decode())
        finally:
            await server.stop()

    samples = asyncio.run(main())
    assert value(samples, "netfilter_requests_total", frontend="stoppage", verdict="block") == 1
    assert value(samples, "netfilter_requests_total", frontend="stoppage", verdict="allow") == 1
    assert value(samples, "netfilter_request_duration_seconds_count", frontend="stoppage") == 2
    assert value(samples, "netfilter_blocks_total", frontend="stoppage", list="auth",
                 category="csam", action="nxdomain") == 1


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs for the audit store, to be filled up."""
    with small_tmpfs(tmp_path / "disk", 8) as disk:
        yield disk


def test_readiness_follows_the_audit_log(build: BuildBundle, authority: tuple[Path, Path],
                                         tmp_path: Path, tiny_disk: Path) -> None:
    """A full disk: not ready ("audit") while appends fail, ready again once one lands."""
    engine = make(build, authority, tmp_path, tiny_disk / "audit.sqlite")
    audit = engine.sink
    assert isinstance(audit, AuditLog)
    metrics = for_node(engine)
    filler = tiny_disk / "filler"
    try:
        audit.flush()
        assert metrics.not_ready() == []
        with filler.open("wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        client = 0
        deadline = time.monotonic() + 20
        while not audit.append_failures and time.monotonic() < deadline:
            client += 1  # distinct clients: every block its own event
            engine.check_host("blocked.example", client=f"192.0.2.{client % 250}")
            time.sleep(0.05)
        assert audit.append_failures
        assert metrics.not_ready() == ["audit"]
        filler.unlink()
        appended = audit.appended
        assert wait_until(lambda: audit.appended > appended, 10)
        assert metrics.not_ready() == []
    finally:
        filler.unlink(missing_ok=True)
        engine.close()


def wait_until(predicate: Callable[[], bool], bound: float) -> bool:
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def scrape(port: int) -> Samples:
    status, text = get(f"http://{HOST}:{port}/metrics")
    assert status == 200
    return parse(text)


@pytest.mark.parametrize("listener", ["relay", "python"])
def test_serve_dns_metrics(tmp_path: Path, listener: str) -> None:
    """A real node: blocked and clean queries move the counters by what was asked,
    whether the C relay or the Python listener forwards the clean ones."""
    require_tools("unbound")
    if listener == "relay" and not relay_built():
        pytest.skip("the C relay is not built here")
    upstream = Unbound(tmp_path)
    node = Netfilter(tmp_path / "nf", upstreams=[upstream.address],
                     env={"NETFILTER_DNS_PYTHON": "1" if listener == "python" else "0"})
    metrics_port = free_port()
    node.config["metrics"] = {"listen": f"{HOST}:{metrics_port}"}
    node.conf.write_text(yaml.safe_dump(node.config), encoding="utf-8")
    start_all([upstream, node])
    try:
        assert get(f"http://{HOST}:{metrics_port}/healthz") == (200, "ok\n")
        before = scrape(metrics_port)
        for i in range(5):
            answer = udp(dns.message.make_query(f"n{i}.blocked.example", "A"), node.port)
            assert answer.rcode() == dns.rcode.NXDOMAIN
        for _ in range(7):
            answer = udp(dns.message.make_query("clean.example", "A"), node.port)
            assert answer.rcode() == dns.rcode.NOERROR and answer.answer
        after = scrape(metrics_port)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("netfilter_requests_total", frontend="dns", verdict="block") == 5
        assert moved("netfilter_requests_total", frontend="dns", verdict="allow") == 7
        assert value(after, "netfilter_blocks_total", frontend="dns", list="demo",
                     category="csam", action="nxdomain") == 5
        # every query decided in Python is timed: the 5 blocks, the first clean one
        assert moved("netfilter_request_duration_seconds_count", frontend="dns") >= 6
        assert value(after, "netfilter_upstream_timeouts_total",
                     upstream=upstream.address) == 0
        assert value(after, "netfilter_upstream_errors_total", upstream=upstream.address) == 0
        if listener == "relay":  # the first clean query takes the full path, the second
            assert moved("netfilter_dns_relay_relayed_total") == 1  # is relayed, the rest
            assert moved("netfilter_dns_relay_cache_hits_total") == 5  # come from the cache
        else:
            assert not any(name.startswith("netfilter_dns_relay_") for name, _ in after)
        assert value(after, "netfilter_list_version", list="demo", source="authority") == 1
        assert get(f"http://{HOST}:{metrics_port}/readyz") == (200, "ready\n")
    finally:
        node.stop()
        upstream.stop()
    assert "Traceback" not in node.log()


def test_readyz_says_when_no_upstream_answers(tmp_path: Path) -> None:
    dead = f"{HOST}:{free_port()}"  # nothing listens there
    node = Netfilter(tmp_path / "nf", upstreams=[dead], timeout=0.5)
    metrics_port = free_port()
    node.config["metrics"] = {"listen": f"{HOST}:{metrics_port}"}
    node.conf.write_text(yaml.safe_dump(node.config), encoding="utf-8")
    node.start()
    try:
        ready = f"http://{HOST}:{metrics_port}/readyz"
        assert get(ready) == (200, "ready\n")  # nothing forwarded yet: no evidence against
        answer = udp(dns.message.make_query("clean.example", "A"), node.port, timeout=3.0)
        assert answer.rcode() == dns.rcode.SERVFAIL
        deadline = time.monotonic() + 5
        while get(ready)[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(ready) == (503, "not ready: upstream\n")
        samples = scrape(metrics_port)
        assert (value(samples, "netfilter_upstream_errors_total", upstream=dead)
                + value(samples, "netfilter_upstream_timeouts_total", upstream=dead)) >= 1
    finally:
        node.stop()
