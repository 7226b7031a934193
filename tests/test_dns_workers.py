"""`dns.workers`: a real `netfilter serve dns` with two processes on SO_REUSEPORT sockets.

dnspython is the client; every query goes out from a socket of its own (a new source
port), so the kernel spreads them over both workers. Blocked names need no upstream;
the upstream is a closed port (the relay gets ICMP unreachable: SERVFAIL at once).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from netfilter.config import DnsSettings
from netfilter.dnsworkers import worker_share
from tests.conftest import SOURCE, BuildBundle
from tests.dns_tls_support import closed_by_server
from tests.support import HOST, free_port, read_events, wait_for

NEW_NAME = "newly.test"
V2 = SOURCE + f"  - {{domain: {NEW_NAME}, ref: N-1, category: csam}}\n"
SPREAD = 48  # queries from as many sockets: all on one worker by chance is 2**-47


def _rcode(port: int, name: str) -> int:
    query = dns.message.make_query(name, "A")
    return dns.query.udp(query, HOST, port=port, timeout=3).rcode()


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _per_worker(port: int, verdict: str) -> dict[str, float]:
    """netfilter_dns_worker_requests_total of `verdict`, per worker."""
    out = {}
    for name, value in _metrics(port).items():
        if name.startswith("netfilter_dns_worker_requests_total{") and (
                f'verdict="{verdict}"' in name):
            out[name.split('worker="')[1].split('"')[0]] = value
    return out


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


class Served:
    """`netfilter serve dns` with `dns.workers: 2` (or `dns` as given), a directory
    source for list swaps."""

    def __init__(self, tmp_path: Path, first: Path, trust: Path,
                 dns: dict[str, object] | None = None) -> None:
        self.node, self.source = tmp_path / "node", tmp_path / "published"
        (self.node / "lists").mkdir(parents=True)
        self.source.mkdir()
        shutil.copyfile(first, self.node / "lists" / "test.nfl")
        self.dns_port, self.metrics_port = free_port(), free_port()
        self.config = self.node / "netfilter.yaml"
        self.config.write_text(yaml.safe_dump({
            "node": {"id": "workers.example", "key": "node.key"},
            "lists": [{"path": "lists/test.nfl", "trust": [str(trust)],
                       "action": "nxdomain", "source": str(self.source)}],
            "updates": {"interval": 1, "jitter": 0, "retry_min": 1, "retry_max": 2},
            "dns": {"listen": [f"{HOST}:{self.dns_port}"], "upstreams": [f"{HOST}:9"],
                    **({"workers": 2} if dns is None else dns)},
            "audit": {"path": "audit.sqlite", "client": "none", "checkpoint_interval": 1},
            "metrics": {"listen": f"{HOST}:{self.metrics_port}"},
        }), encoding="utf-8")
        self.log = tmp_path / "serve.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "netfilter.cli", "-v", "serve", "--config",
                 str(self.config)], stdout=out, stderr=subprocess.STDOUT, cwd=self.node)
        assert wait_for(lambda: "netfilter: serving" in self.log.read_text(), 60), (
            self.log.read_text())

    def workers(self) -> set[int]:
        return _children(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        assert self.proc.wait(30) == 0, self.log.read_text()


@pytest.fixture
def served(tmp_path: Path, build: BuildBundle, authority: tuple[Path, Path]) -> Served:
    server = Served(tmp_path, build(version=1), authority[1])
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(30)


def test_by_default_one_worker_per_core(tmp_path: Path, build: BuildBundle,
                                        authority: tuple[Path, Path]) -> None:
    """No `dns.workers`: one process per core this process may use (the first one
    serves too), each answering."""
    server = Served(tmp_path, build(version=1), authority[1], dns={})
    try:
        cores = len(os.sched_getaffinity(0))
        assert len(server.workers()) == cores - 1, (cores, server.workers())
        assert _rcode(server.dns_port, "blocked.example") == dns.rcode.NXDOMAIN
        assert f"{cores - 1} worker process(es)" in server.log.read_text() or cores == 1
    finally:
        server.stop()


def test_the_nodes_bounds_are_shared_out() -> None:
    """Each of N processes gets an N-th, rounded down, of the node-wide bounds, and at
    least one connection; a cache switched off stays off; per-connection limits stay."""
    settings = DnsSettings(tcp_max_connections=512, tcp_per_client=5, cache_size=65536,
                           tcp_pipeline=100)
    share = worker_share(settings, 2)
    assert (share.tcp_max_connections, share.tcp_per_client, share.cache_size) == (
        256, 2, 32768)
    assert share.tcp_pipeline == 100 and share.tcp_max_buffer == settings.tcp_max_buffer
    assert worker_share(settings, 1) == settings
    tiny = worker_share(DnsSettings(tcp_per_client=1, cache_size=0), 4)
    assert (tiny.tcp_per_client, tiny.cache_size) == (1, 0)
    assert worker_share(DnsSettings(cache_size=3), 4).cache_size == 1


def test_a_clients_connections_keep_to_the_nodes_cap(tmp_path: Path, build: BuildBundle,
                                                     authority: tuple[Path, Path]) -> None:
    """`dns.tcp_per_client` holds for the node, not per worker: the workers share it,
    so a client that opens many connections (each on a new source port, spread over
    both processes by the kernel) keeps at most that many open."""
    cap, opened = 4, 12
    server = Served(tmp_path, build(version=1), authority[1],
                    dns={"workers": 2, "tcp_per_client": cap})
    held: list[socket.socket] = []
    try:
        wire = dns.message.make_query("blocked.example", "A")
        for _ in range(opened):
            sock = socket.create_connection((HOST, server.dns_port), timeout=5)
            held.append(sock)
            dns.query.send_tcp(sock, wire)
            answer, _ = dns.query.receive_tcp(sock, time.time() + 5)
            assert answer.rcode() == dns.rcode.NXDOMAIN
        time.sleep(0.5)  # the FINs of the connections that made room
        still = sum(not closed_by_server(sock, bound=0.05) for sock in held)
        assert 1 <= still <= cap, (still, cap)
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_config_check_refuses_a_bad_worker_count(tmp_path: Path) -> None:
    for bad in (-1, "two", True):
        config = tmp_path / "netfilter.yaml"
        config.write_text(yaml.safe_dump({"node": {"id": "w.example", "key": "node.key"},
                                          "dns": {"workers": bad}}), encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "netfilter.cli", "config", "check",
                               str(config)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (bad, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "dns.workers" in lines[0], (bad, done.stderr)


def test_two_workers_share_lists_audit_and_metrics(served: Served, build: BuildBundle,
                                                   authority: tuple[Path, Path]) -> None:
    """Both workers answer; per-worker counters add up to the queries sent; a list swap
    under load reaches both; the audit log holds one verifiable tree whose block counts
    equal the blocked answers; SIGTERM leaves no worker behind."""
    port, metrics_port = served.dns_port, served.metrics_port
    pids = served.workers()
    assert len(pids) == 1, pids  # the first process serves too: one child for 2 workers
    before = sum(_per_worker(metrics_port, "block").values())
    assert all(_rcode(port, "blocked.example") == dns.rcode.NXDOMAIN for _ in range(SPREAD))
    blocked = SPREAD
    # blocks the relay answers from its cache are counted every RECORD_INTERVAL
    assert wait_for(lambda: sum(_per_worker(metrics_port, "block").values()) - before
                    == SPREAD, 10), _per_worker(metrics_port, "block")
    after = _per_worker(metrics_port, "block")
    assert set(after) == {"0", "1"}, after
    assert all(count > 0 for count in after.values()), after  # both answered
    answered_sum = sum(
        v for k, v in _metrics(metrics_port).items()
        if k.startswith("netfilter_requests_total{") and 'frontend="dns"' in k)
    assert answered_sum == sum(sum(_per_worker(metrics_port, v).values())
                               for v in ("block", "allow", "route", "invalid"))

    # a list swap under load: a thread keeps asking for a blocked name meanwhile
    assert _rcode(port, NEW_NAME) != dns.rcode.NXDOMAIN  # v1 does not block it
    stop = threading.Event()
    load = {"nxdomain": 0, "other": 0}

    def keep_asking() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            rcode = _rcode(port, "blocked.example")
            load["nxdomain" if rcode == dns.rcode.NXDOMAIN else "other"] += 1

    thread = threading.Thread(target=keep_asking)
    thread.start()
    try:
        tmp = served.source / ".incoming"
        shutil.copyfile(build(V2, version=2), tmp)
        os.replace(tmp, served.source / "test.nfl")
        assert wait_for(lambda: _rcode(port, NEW_NAME) == dns.rcode.NXDOMAIN, 30), (
            served.log.read_text())
        blocked += 1
    finally:
        stop.set()
        thread.join(70)
    assert load["other"] == 0 and load["nxdomain"] > 0, load
    blocked += load["nxdomain"]
    # the load's blocks counted (the relay's every RECORD_INTERVAL), then only the new
    # name: each worker's block count rises, so each answers the new verdict
    assert wait_for(lambda: sum(_per_worker(metrics_port, "block").values()) - before
                    == blocked, 10), (blocked, _per_worker(metrics_port, "block"))
    start = _per_worker(metrics_port, "block")
    time.sleep(0.5)  # the reload reaches the worker after the first process's
    rcodes = [_rcode(port, NEW_NAME) for _ in range(SPREAD)]
    blocked += rcodes.count(dns.rcode.NXDOMAIN)
    assert rcodes == [dns.rcode.NXDOMAIN] * SPREAD, rcodes
    assert wait_for(lambda: sum(_per_worker(metrics_port, "block").values()) - before
                    == blocked, 10), (blocked, _per_worker(metrics_port, "block"))
    end = _per_worker(metrics_port, "block")
    assert all(end[w] > start[w] for w in ("0", "1")), (start, end)

    workers = served.workers()
    served.stop()
    assert not any(_alive(pid) for pid in workers), workers  # no orphan
    events = read_events(served.node / "audit.sqlite")
    counted = sum(e.get("count") or 1 for e in events if e["type"] == "block")
    assert counted == blocked
    loaded = [e for e in events if e["type"] == "list-loaded" and e.get("version") == 2]
    assert len(loaded) >= 2  # the first process's and the worker's reload
    done = subprocess.run(
        [sys.executable, "-m", "netfilter.cli", "audit", "verify", "--log",
         str(served.node / "audit.sqlite"), "--trust", str(served.node / "node.pub")],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    text = served.log.read_text()
    assert "Traceback" not in text, text


def _counted(port: int) -> tuple[float, float]:
    """The node's DNS blocks, and worker 1's, as /metrics has them now."""
    values = _metrics(port)
    return (values['netfilter_requests_total{frontend="dns",verdict="block"}'],
            values['netfilter_dns_worker_requests_total{verdict="block",worker="1"}'])


def test_a_dead_worker_is_started_again_and_readyz_says_so(served: Served) -> None:
    """...and what it had counted stays counted: neither the node's sums nor its own
    series go back (a counter that falls is a reset to Prometheus)."""
    metrics_port = served.metrics_port
    assert _readyz(metrics_port)[0] == 200
    for _ in range(SPREAD):
        assert _rcode(served.dns_port, "blocked.example") == dns.rcode.NXDOMAIN
    # blocks the relay answers from its cache are handed over each second
    assert wait_for(lambda: _counted(metrics_port)[0] == SPREAD, 5), _counted(metrics_port)
    node, its = _counted(metrics_port)
    assert 0 < its < SPREAD, (node, its)
    (pid,) = served.workers()
    os.kill(pid, signal.SIGKILL)
    seen: list[tuple[int, str]] = []

    def down() -> bool:
        seen.append(_readyz(metrics_port))
        return seen[-1][0] == 503

    assert wait_for(down, 10), seen
    assert "dns_workers" in seen[-1][1]
    assert wait_for(lambda: _readyz(metrics_port)[0] == 200, 30), served.log.read_text()
    (again,) = served.workers()
    assert again != pid
    assert _rcode(served.dns_port, "blocked.example") == dns.rcode.NXDOMAIN
    values = _metrics(metrics_port)
    assert values['netfilter_dns_worker_restarts_total{worker="1"}'] == 1
    # (the last block may come from a relay cache, handed over within a second)
    assert wait_for(lambda: _counted(metrics_port)[0] >= node + 1, 5), (
        _counted(metrics_port), node, its)
    assert _counted(metrics_port)[1] >= its, (_counted(metrics_port), node, its)
    lines = [line for line in served.log.read_text().splitlines() if "exited with" in line]
    assert len(lines) == 1, lines


def test_no_worker_survives_a_killed_serve(served: Served) -> None:
    workers = served.workers()
    assert workers
    served.proc.kill()
    served.proc.wait(30)
    assert wait_for(lambda: not any(_alive(pid) for pid in workers), 20), workers


def test_a_port_in_use_fails_the_start_in_one_line(tmp_path: Path) -> None:
    """The workers' sockets are bound before anything starts: a UDP port another
    socket holds (without SO_REUSEPORT) ends the start in one line."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind((HOST, 0))
    port = holder.getsockname()[1]
    config = tmp_path / "netfilter.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"id": "w.example", "key": "node.key"},
        "dns": {"listen": [f"{HOST}:{port}"], "upstreams": [f"{HOST}:9"], "workers": 2},
    }), encoding="utf-8")
    try:
        done = subprocess.run([sys.executable, "-m", "netfilter.cli", "serve", "--config",
                               str(config)], capture_output=True, text=True, timeout=60,
                              cwd=tmp_path)
    finally:
        holder.close()
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "dns.listen[0]" in lines[0], done.stderr
