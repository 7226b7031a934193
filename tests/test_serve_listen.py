"""`netfilter serve` binds every part's listening sockets before it starts any part.

With one part's port taken (DNS over UDP, DNS over TCP, the stop page, the proxy, the
audit tiles, metrics; or two parts configured on one address) the start ends with exit 2
and exactly one line on stderr naming the part and the address; no other part ever
answered on its port; the audit log got nothing (no list-loaded event, no checkpoint);
and every port is free again.

Real `netfilter serve` subprocesses on loopback; the ports are taken by real sockets of
this test, and a prober thread asks every other port for an answer for as long as serve
runs. A TCP handshake may complete in the kernel while serve still binds the other parts
(its TCP sockets listen at once, so that two parts given one address fail at the bind
too); what must never come back is an answer.
"""

from __future__ import annotations

import http.client
import importlib.util
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import pytest
import yaml

from netfilter.config import load_config
from netfilter.node import make_engine
from tests.support import DEMO_LIST, DEMO_PUB, HOST, free_port, wait_for

HAS_PROXY = importlib.util.find_spec("mitmproxy") is not None
IN_USE = "(address already in use)"
QUERY = dns.message.make_query("blocked.example", "A").to_wire()  # answered without upstream
HTTP_GET = b"GET / HTTP/1.0\r\nHost: blocked.example\r\n\r\n"
TCP, UDP = socket.SOCK_STREAM, socket.SOCK_DGRAM
PROBER = "127.0.0.2"  # the prober's address: never the one it asks (no self-connect)


@dataclass
class Node:
    """A configured node whose audit log already holds its first start's events."""

    config: Path
    store: Path
    ports: dict[str, int]  # part -> port: dns (UDP and TCP), stoppage, tiles, metrics, proxy

    def write(self, **override: int) -> None:
        """The config, with the listening ports of `self.ports` (or `override`)."""
        port = {**self.ports, **override}
        sections: dict[str, Any] = {
            "dns": {"listen": [f"{HOST}:{port['dns']}"], "upstreams": [f"{HOST}:9"]},
            "stoppage": {"listen": f"{HOST}:{port['stoppage']}"},
            "metrics": {"listen": f"{HOST}:{port['metrics']}"},
        }
        if "proxy" in port:
            sections["proxy"] = {"listen": f"{HOST}:{port['proxy']}", "intercept": "none"}
        base = self.config.parent
        self.config.write_text(yaml.safe_dump({
            "node": {"id": "listen-test.example", "key": str(base / "node.key")},
            "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
            "audit": {"path": str(self.store), "client": "none", "tiles": str(base / "tiles"),
                      "tiles_listen": f"{HOST}:{port['tiles']}"},
            **sections}), encoding="utf-8")

    def logged(self) -> tuple[int, int]:
        """(events, checkpoints) in the audit log."""
        db = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True)
        try:
            return (int(db.execute("SELECT count(*) FROM leaves").fetchone()[0]),
                    int(db.execute("SELECT count(*) FROM checkpoints").fetchone()[0]))
        finally:
            db.close()


@pytest.fixture
def node(tmp_path: Path) -> Node:
    parts = ["dns", "stoppage", "tiles", "metrics"] + (["proxy"] if HAS_PROXY else [])
    ports: dict[str, int] = {}
    for part in parts:  # distinct ports: free_port may hand out one just released
        port = free_port()
        while port in ports.values():
            port = free_port()
        ports[part] = port
    found = Node(tmp_path / "netfilter.yaml", tmp_path / "audit.sqlite", ports)
    found.write()
    make_engine(load_config(found.config)).close()  # node key, store, first events
    assert found.logged()[0] >= 1
    return found


@contextmanager
def taken(port: int, kind: int) -> Iterator[None]:
    """HOST:port in use by a socket of this process (listening, for TCP)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, port))
        if kind == TCP:
            sock.listen()
        yield


class Prober(threading.Thread):
    """Asks DNS over UDP and every TCP port for an answer until stopped; `answered`
    lists each "proto/port" that ever sent a byte back."""

    def __init__(self, udp: list[int], tcp: dict[int, bytes]) -> None:
        super().__init__(daemon=True)
        self.udp, self.tcp = udp, tcp
        self.answered: set[str] = set()
        self.rounds = 0
        self.done = threading.Event()

    def run(self) -> None:
        sockets = []
        for port in self.udp:
            sock = socket.socket(socket.AF_INET, UDP)
            sock.bind((PROBER, 0))
            sock.connect((HOST, port))
            sock.settimeout(0.005)
            sockets.append((port, sock))
        try:
            while True:  # one round at least, however late the thread runs
                stopping = self.done.is_set()
                for port, sock in sockets:
                    try:
                        sock.send(QUERY)
                        if sock.recv(4096):
                            self.answered.add(f"udp/{port}")
                    except OSError:  # nothing yet, or ICMP port unreachable
                        pass
                for port, request in self.tcp.items():
                    if self._tcp(port, request):
                        self.answered.add(f"tcp/{port}")
                self.rounds += 1
                if stopping:
                    break
        finally:
            for _, sock in sockets:
                sock.close()

    @staticmethod
    def _tcp(port: int, request: bytes) -> bool:
        try:
            with socket.create_connection((HOST, port), timeout=0.05,
                                          source_address=(PROBER, 0)) as sock:
                sock.settimeout(0.3)
                sock.sendall(request)
                return bool(sock.recv(1))
        except OSError:  # refused, reset, or no answer within the time
            return False


def serve_probed(node: Node, skip: tuple[int, int]) -> subprocess.CompletedProcess[str]:
    """Run serve to its end while the prober asks every port but `skip` (port, kind)."""
    udp = [node.ports["dns"]]
    tcp = {port: HTTP_GET for part, port in node.ports.items() if part != "dns"}
    tcp[node.ports["dns"]] = struct.pack("!H", len(QUERY)) + QUERY
    udp = [p for p in udp if (p, UDP) != skip]
    tcp = {p: r for p, r in tcp.items() if (p, TCP) != skip}
    prober = Prober(udp, tcp)
    prober.start()
    try:
        result = subprocess.run([sys.executable, "-m", "netfilter.cli", "serve", "--config",
                                 str(node.config)], capture_output=True, text=True, timeout=90)
    finally:
        prober.done.set()
        prober.join(10)
    assert prober.rounds > 0
    assert not prober.answered, (prober.answered, result.stderr)
    return result


def assert_nothing_started(node: Node, result: subprocess.CompletedProcess[str],
                           logged: tuple[int, int], line: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"netfilter: error: {line}\n"  # one line, nothing else
    assert result.stdout == ""
    assert node.logged() == logged  # no list-loaded event, no checkpoint
    for port in node.ports.values():  # every socket serve bound is closed again
        for kind in (TCP, UDP):
            with socket.socket(socket.AF_INET, kind) as again:
                if kind == TCP:  # as the servers bind: a TIME_WAIT is no conflict
                    again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                again.bind((HOST, port))
                if kind == TCP:
                    again.listen()


CASES = [
    pytest.param("dns", UDP, id="dns-udp"),
    pytest.param("dns", TCP, id="dns-tcp"),
    pytest.param("stoppage", TCP, id="stoppage"),
    pytest.param("proxy", TCP, id="proxy", marks=pytest.mark.skipif(
        not HAS_PROXY, reason="mitmproxy (the proxy extra) is not installed")),
    pytest.param("tiles", TCP, id="tiles"),
    pytest.param("metrics", TCP, id="metrics"),
]
KEY = {"dns": "dns.listen[0]", "stoppage": "stoppage.listen", "proxy": "proxy.listen",
       "tiles": "audit.tiles_listen", "metrics": "metrics.listen"}  # named as config check does


@pytest.mark.parametrize(("part", "kind"), CASES)
def test_a_port_in_use_starts_nothing(node: Node, part: str, kind: int) -> None:
    port = node.ports[part]
    logged = node.logged()
    with taken(port, kind):
        result = serve_probed(node, skip=(port, kind))
    assert_nothing_started(node, result, logged,
                           f"{KEY[part]}: cannot listen on {HOST} port {port} {IN_USE}")


def test_two_parts_on_one_address_start_nothing(node: Node) -> None:
    """Metrics configured on the stop page's address: the second bind fails."""
    port = node.ports["stoppage"]
    node.write(metrics=port)
    logged = node.logged()
    result = serve_probed(node, skip=(port, TCP))
    assert_nothing_started(node, result, logged,
                           f"metrics.listen: cannot listen on {HOST} port {port} {IN_USE}")


def test_the_second_dns_address_in_use_starts_nothing(node: Node) -> None:
    """The first DNS address never answers when the second cannot be bound."""
    second = free_port()
    while second in node.ports.values():
        second = free_port()
    text = node.config.read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    config["dns"]["listen"].append(f"{HOST}:{second}")
    node.config.write_text(yaml.safe_dump(config), encoding="utf-8")
    logged = node.logged()
    with taken(second, UDP):
        result = serve_probed(node, skip=(second, UDP))
    assert_nothing_started(node, result, logged,
                           f"dns.listen[1]: cannot listen on {HOST} port {second} {IN_USE}")


def test_served_on_the_sockets_bound_first(node: Node) -> None:
    """With every port free, each part answers on its own port (the sockets handed over
    to the servers are served)."""
    proc = subprocess.Popen([sys.executable, "-m", "netfilter.cli", "serve", "--config",
                             str(node.config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: _get("metrics", node, "/healthz") == 200 or
                        proc.poll() is not None, 60)  # metrics start last
        assert proc.poll() is None
        with socket.socket(socket.AF_INET, UDP) as sock:
            sock.settimeout(5)
            sock.sendto(QUERY, (HOST, node.ports["dns"]))
            assert dns.message.from_wire(sock.recv(4096)).answer  # the stop page's address
        with socket.create_connection((HOST, node.ports["dns"]), timeout=5) as sock:
            sock.sendall(struct.pack("!H", len(QUERY)) + QUERY)
            assert len(sock.recv(2)) == 2
        assert _get("stoppage", node, "/") == 451
        assert _get("tiles", node, "/checkpoint") in (200, 404)  # written at intervals
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0


def _get(part: str, node: Node, path: str) -> int | None:
    try:
        connection = http.client.HTTPConnection(HOST, node.ports[part], timeout=5)
        try:
            connection.request("GET", path, headers={"Host": "blocked.example"})
            return connection.getresponse().status
        finally:
            connection.close()
    except (OSError, http.client.HTTPException):
        return None
