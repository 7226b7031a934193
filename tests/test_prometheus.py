"""A real Prometheus (Debian's `prometheus`) scrapes a running node on loopback; the
block and query counters, read back through Prometheus's HTTP API, moved exactly as
the test's queries did."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import dns.message
import dns.rcode
import yaml

from tests.dns_support import HOST, Netfilter, Unbound, free_port, start_all, udp
from tests.support import ChildProcess, require_tools

BLOCKED, CLEAN = 6, 9
BLOCKS = 'netfilter_requests_total{frontend="dns",verdict="block"}'
ALLOWS = 'netfilter_requests_total{frontend="dns",verdict="allow"}'
DEMO_BLOCKS = ('sum(netfilter_blocks_total{frontend="dns",list="demo",category="csam",'
               'action="nxdomain"}) or vector(0)')


class Prometheus(ChildProcess):
    """prometheus in the foreground on a free loopback port, scraping one target every
    second, its storage in the test's directory; nothing remote."""

    name = "prometheus"

    def __init__(self, directory: Path, target: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = directory / "prometheus.log"
        self.proc = None
        self.config = directory / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "netfilter",
                                "static_configs": [{"targets": [target]}]}],
        }), encoding="utf-8")
        self.storage = directory / "data"

    def start(self) -> None:
        self.popen(["prometheus", f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.storage}",
                    f"--web.listen-address={HOST}:{self.port}"], cwd=self.config.parent)
        self.wait_until(self._ready, pause=0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def query(self, expression: str) -> float | None:
        """The value of an instant query with one result; None when it has none."""
        url = (f"http://{HOST}:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expression}))
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        result = body["data"]["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expression: str, wanted: float, bound: float = 30.0) -> float | None:
        """Poll until `expression` is `wanted` (bounded); the last value seen."""
        deadline = time.monotonic() + bound
        seen = self.query(expression)
        while seen != wanted and time.monotonic() < deadline:
            time.sleep(0.25)
            seen = self.query(expression)
        return seen

    def wait_present(self, expression: str, bound: float = 30.0) -> float:
        deadline = time.monotonic() + bound
        seen = self.query(expression)
        while seen is None and time.monotonic() < deadline:
            time.sleep(0.25)
            seen = self.query(expression)
        assert seen is not None, f"{expression}: never scraped; prometheus said:\n{self.log()}"
        return seen


def test_prometheus_scrapes_the_node(tmp_path: Path) -> None:
    require_tools("prometheus", why="Debian: apt-get install prometheus")
    require_tools("unbound", why="Debian: apt-get install unbound")
    upstream = Unbound(tmp_path)
    node = Netfilter(tmp_path / "nf", upstreams=[upstream.address])
    metrics_port = free_port()
    node.config["metrics"] = {"listen": f"{HOST}:{metrics_port}"}
    node.conf.write_text(yaml.safe_dump(node.config), encoding="utf-8")
    start_all([upstream, node])
    prometheus = Prometheus(tmp_path / "prometheus", f"{HOST}:{metrics_port}")
    try:
        prometheus.start()
        assert prometheus.wait_for('up{job="netfilter"}', 1.0) == 1.0
        blocks, allows = prometheus.wait_present(BLOCKS), prometheus.wait_present(ALLOWS)
        demo = prometheus.wait_present(DEMO_BLOCKS)
        for i in range(BLOCKED):
            answer = udp(dns.message.make_query(f"q{i}.blocked.example", "A"), node.port)
            assert answer.rcode() == dns.rcode.NXDOMAIN
        for _ in range(CLEAN):
            answer = udp(dns.message.make_query("clean.example", "A"), node.port)
            assert answer.rcode() == dns.rcode.NOERROR and answer.answer
        assert prometheus.wait_for(BLOCKS, blocks + BLOCKED) == blocks + BLOCKED
        assert prometheus.wait_for(ALLOWS, allows + CLEAN) == allows + CLEAN
        assert prometheus.wait_for(DEMO_BLOCKS, demo + BLOCKED) == demo + BLOCKED
        assert prometheus.query('netfilter_list_version{list="demo"}') == 1.0
    finally:
        prometheus.stop()
        node.stop()
        upstream.stop()
    assert "Traceback" not in node.log()
