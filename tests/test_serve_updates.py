"""`netfilter serve` with an `updates` section checks each list's source on its own and
puts a new version in force without a restart; an old one from the source is refused.

A real `netfilter serve dns` on loopback, a directory source this test publishes to,
and dnspython as the client (blocked names need no upstream).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import yaml

from tests.conftest import SOURCE, BuildBundle
from tests.support import HOST, free_port, read_events, wait_for

NEW_NAME = "newly.test"
V2 = SOURCE + f"  - {{domain: {NEW_NAME}, ref: N-1, category: csam}}\n"


def _rcode(port: int, name: str) -> int:
    query = dns.message.make_query(name, "A")
    return dns.query.udp(query, HOST, port=port, timeout=2).rcode()


def _publish(bundle: Path, source: Path) -> None:
    """As a mirror does: the file appears whole (a new inode)."""
    tmp = source / ".incoming"
    shutil.copyfile(bundle, tmp)
    os.replace(tmp, source / "test.nfl")


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_serve_installs_from_its_source_and_refuses_a_rollback(
        tmp_path: Path, build: BuildBundle, authority: tuple[Path, Path]) -> None:
    node, source = tmp_path / "node", tmp_path / "published"
    (node / "lists").mkdir(parents=True)
    source.mkdir()
    shutil.copyfile(build(version=1), node / "lists" / "test.nfl")
    dns_port, metrics_port = free_port(), free_port()
    config = node / "netfilter.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"id": "updates-serve.example", "key": "node.key"},
        "lists": [{"path": "lists/test.nfl", "trust": [str(authority[1])],
                   "action": "nxdomain", "source": str(source)}],
        "updates": {"interval": 1, "jitter": 0, "retry_min": 1, "retry_max": 2},
        "dns": {"listen": [f"{HOST}:{dns_port}"], "upstreams": [f"{HOST}:9"]},
        "audit": {"path": "audit.sqlite", "client": "none"},
        "metrics": {"listen": f"{HOST}:{metrics_port}"},
    }), encoding="utf-8")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "netfilter.cli", "serve", "--config",
                                  str(config)], stdout=out, stderr=subprocess.STDOUT, cwd=node)
    try:
        assert wait_for(lambda: "netfilter: serving" in log.read_text(), 30), log.read_text()
        assert _rcode(dns_port, NEW_NAME) != dns.rcode.NXDOMAIN  # v1 does not block it
        _publish(build(V2, version=2), source)
        assert wait_for(lambda: _rcode(dns_port, NEW_NAME) == dns.rcode.NXDOMAIN, 20), (
            log.read_text())
        assert _metric(metrics_port, "netfilter_updates_installed_total") >= 1
        assert _rcode(dns_port, "blocked.example") == dns.rcode.NXDOMAIN  # still in force
        _publish(build(version=1), source)  # an old version served again: refused
        assert wait_for(lambda: _metric(metrics_port, "netfilter_updates_refused_total") >= 1,
                        20), log.read_text()
        assert _rcode(dns_port, NEW_NAME) == dns.rcode.NXDOMAIN  # v2 stays in force
    finally:
        serve.terminate()
        assert serve.wait(30) == 0, log.read_text()
    kinds = [(e["type"], e.get("action"), e.get("version"))
             for e in read_events(node / "audit.sqlite") if e["type"].startswith("list-")]
    assert ("list-loaded", "install", 2) in kinds
    assert ("list-refused", "rollback", 1) in kinds
