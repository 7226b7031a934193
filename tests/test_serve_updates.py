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


class Served:
    """A `netfilter serve dns` child with a directory source, and its ports."""

    def __init__(self, tmp_path: Path, first: Path, trust: Path, **updates: object) -> None:
        self.node, self.source = tmp_path / "node", tmp_path / "published"
        (self.node / "lists").mkdir(parents=True)
        self.source.mkdir()
        shutil.copyfile(first, self.node / "lists" / "test.nfl")
        self.dns_port, self.metrics_port = free_port(), free_port()
        self.config = self.node / "netfilter.yaml"
        self.config.write_text(yaml.safe_dump({
            "node": {"id": "updates-serve.example", "key": "node.key"},
            "lists": [{"path": "lists/test.nfl", "trust": [str(trust)],
                       "action": "nxdomain", "source": str(self.source)}],
            "updates": {"interval": 1, "jitter": 0, "retry_min": 1, "retry_max": 2,
                        **updates},
            "dns": {"listen": [f"{HOST}:{self.dns_port}"], "upstreams": [f"{HOST}:9"]},
            "audit": {"path": "audit.sqlite", "client": "none"},
            "metrics": {"listen": f"{HOST}:{self.metrics_port}"},
        }), encoding="utf-8")
        self.log = tmp_path / "serve.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "netfilter.cli", "serve", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.node)
        assert wait_for(lambda: "netfilter: serving" in self.log.read_text(), 30), (
            self.log.read_text())

    def stop(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(30) == 0, self.log.read_text()

    def events(self) -> list[tuple[str, str | None, int | None]]:
        return [(e["type"], e.get("action"), e.get("version"))
                for e in read_events(self.node / "audit.sqlite")
                if e["type"].startswith("list-")]


def test_serve_installs_from_its_source_and_refuses_a_rollback(
        tmp_path: Path, build: BuildBundle, authority: tuple[Path, Path]) -> None:
    served = Served(tmp_path, build(version=1), authority[1])
    dns_port, metrics_port, source = served.dns_port, served.metrics_port, served.source
    try:
        assert _rcode(dns_port, NEW_NAME) != dns.rcode.NXDOMAIN  # v1 does not block it
        _publish(build(V2, version=2), source)
        assert wait_for(lambda: _rcode(dns_port, NEW_NAME) == dns.rcode.NXDOMAIN, 20), (
            served.log.read_text())
        assert _metric(metrics_port, "netfilter_updates_installed_total") >= 1
        assert _rcode(dns_port, "blocked.example") == dns.rcode.NXDOMAIN  # still in force
        _publish(build(version=1), source)  # an old version served again: refused
        assert wait_for(lambda: _metric(metrics_port, "netfilter_updates_refused_total") >= 1,
                        20), served.log.read_text()
        assert _rcode(dns_port, NEW_NAME) == dns.rcode.NXDOMAIN  # v2 stays in force
    finally:
        served.stop()
    kinds = served.events()
    assert ("list-loaded", "install", 2) in kinds
    assert ("list-refused", "rollback", 1) in kinds


def test_a_version_confirmed_from_a_shell_is_enforced_without_a_sighup(
        tmp_path: Path, build: BuildBundle, authority: tuple[Path, Path]) -> None:
    """The operator confirms a held version with the CLI (another process): the running
    node's next check sees the bundle in place is not the one it enforces, and reloads.
    While held, the per-list gauge names the version and the trigger."""
    served = Served(tmp_path, build(version=1), authority[1], max_entry_change=0.01)
    held_series = 'netfilter_list_held_version{list="test",trigger="entry-change"}'
    try:
        _publish(build(V2, version=2), served.source)  # one entry more: past 1%, held
        assert wait_for(lambda: _metric(served.metrics_port, held_series) == 2, 20), (
            served.log.read_text())
        assert _rcode(served.dns_port, NEW_NAME) != dns.rcode.NXDOMAIN  # not in force
        done = subprocess.run([sys.executable, "-m", "netfilter.cli", "list", "confirm",
                               "test", "2", "--config", str(served.config)],
                              capture_output=True, text=True, timeout=60, cwd=served.node)
        assert done.returncode == 0, done.stderr
        assert wait_for(lambda: _rcode(served.dns_port, NEW_NAME) == dns.rcode.NXDOMAIN, 20), (
            served.log.read_text())
        assert _metric(served.metrics_port, held_series) == 0  # the series is gone
    finally:
        served.stop()
    kinds = served.events()
    assert ("list-held", "entry-change", 2) in kinds
    assert ("list-confirmed", "confirm", 2) in kinds
    assert ("list-loaded", None, 2) in kinds  # the engine's load, at the check after it
