"""Debian's dnsdist in front of two netfilter nodes, with its health checks: what an ISP's
network engineer would check before putting resolver nodes behind a load balancer.

Everything is real and on loopback: an unbound serving local-data (the upstream), two
`netfilter serve` nodes on 127.0.0.2 and 127.0.0.3 (same port, each with its own list
source directory and /metrics), and dnsdist on 127.0.0.1 with health checks
(`checkName` a clean name the nodes answer through unbound, `checkInterval` 1 s,
`maxCheckFailures` 2, `checkTimeout` 250 ms). dnsdist's JSON API (its webserver on
127.0.0.1, API key only) is dnsdist's own view: each backend's state and query count.

In order (the roll-out comes first so that both nodes are up to show the skew, and the
rejoining node then shows it kept the version it installed):

1. A list rolled out one node after the other: v2 (it blocks clean.test, which unbound
   answers) published to node A's source, then, once A enforces it, to node B's. During
   the skew each node's `netfilter_list_version` says 2 and 1, and queries through dnsdist
   pinned to each backend (two extra dnsdist listeners whose rules send to a one-server
   pool) get NXDOMAIN from A and an address from B; unpinned queries reach both.
2. Node A fails while a bounded client loop asks dnsdist for a clean name, in one of two
   ways (the test runs both): `kill`, SIGKILL to its process group, as when the process
   dies (the host still answers with ICMP port unreachable, so dnsdist's checks fail at
   once); `hang`, SIGSTOP to the group, as when a node or its host stops answering (no
   ICMP: every check waits its timeout). The client: dnspython over UDP, each query
   sent once with a 250 ms timeout and counted once (no retry: a stub's retry would hide
   exactly the loss measured). A query is lost when it times out or is not NOERROR. No
   query sent later than the bound below may be lost; the figures (lost, dnsdist's time
   to mark A down, the last loss) are printed.
3. Node A back (started again after `kill`, SIGCONT after `hang`): dnsdist marks it up
   and unpinned queries reach it again (its query count in dnsdist grows), at list
   version 2.

The bound is derived from the configuration, not tuned: dnsdist checks each backend
every `checkInterval` and marks it down after `maxCheckFailures` consecutive failures,
each taking at most `checkTimeout`; so it is down within CHECK_INTERVAL * MAX_FAILURES +
CHECK_TIMEOUT of the kill, plus one more CHECK_INTERVAL of margin (dnsdist's health-check
loop wakes once a second, so the first check after the kill may come up to an interval
late), plus one client timeout for a query already in flight to the dead node.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from tests.conftest import SOURCE, BuildBundle
from tests.dns_support import Unbound, require_tools
from tests.support import HOST, ChildProcess, free_port, wait_for

NODE_A, NODE_B = "127.0.0.2", "127.0.0.3"
CHECK_NAME = "clean.example."  # answered NOERROR by the nodes, through unbound
NEW_NAME = "clean.test"  # unbound answers it (192.0.2.40); only list v2 blocks it
V2 = SOURCE + f"  - {{domain: {NEW_NAME}, ref: N-1, category: csam}}\n"

CHECK_INTERVAL = 1.0  # seconds, dnsdist's checkInterval
MAX_FAILURES = 2  # dnsdist's maxCheckFailures
CHECK_TIMEOUT = 0.25  # seconds, dnsdist's checkTimeout (it takes milliseconds)
CLIENT_TIMEOUT = 0.25  # seconds a client query may take before it counts as lost
# No query sent later than this after the kill may be lost (see the module docstring).
LOSS_BOUND = CHECK_INTERVAL * (MAX_FAILURES + 1) + CHECK_TIMEOUT + CLIENT_TIMEOUT
KILL_LOOP = LOSS_BOUND + 3.0  # seconds the client loop runs after the kill
API_KEY = "netfilter-test-api-key"


def _query(address: str, port: int, name: str, timeout: float = 2.0) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, "A"), address, port=port,
                         timeout=timeout)


def _answers(address: str, port: int, name: str = CHECK_NAME) -> bool:
    try:
        return _query(address, port, name, timeout=0.3).rcode() == dns.rcode.NOERROR
    except (dns.exception.DNSException, OSError):
        return False


class Node(ChildProcess):
    """`netfilter serve` on its own loopback address, with a directory list source (as a
    mirror of the authority's would be), updates checked every second, and /metrics.

    Started in a session of its own so that a kill reaches every process it may have
    (dns workers), as a machine that dies would."""

    start_bound = 30.0

    def __init__(self, directory: Path, name: str, address: str, port: int,
                 first: Path, trust: Path, upstream: str) -> None:
        self.name, self.address, self.port = name, address, port
        self.directory = directory
        self.source = directory / "published"
        (directory / "lists").mkdir(parents=True)
        self.source.mkdir()
        shutil.copyfile(first, directory / "lists" / "test.nfl")
        self.metrics_port = free_port()
        self.config = directory / "netfilter.yaml"
        self.config.write_text(yaml.safe_dump({
            "node": {"id": f"{name}.example", "key": "node.key"},
            "lists": [{"path": "lists/test.nfl", "trust": [str(trust)],
                       "action": "nxdomain", "source": str(self.source)}],
            "updates": {"interval": 1, "jitter": 0, "retry_min": 1, "retry_max": 2},
            "dns": {"listen": [f"{address}:{port}"], "upstreams": [upstream]},
            "audit": {"path": "audit.sqlite", "client": "none"},
            "metrics": {"listen": f"{address}:{self.metrics_port}"},
        }), encoding="utf-8")
        self.log_path = directory / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        self.popen([sys.executable, "-m", "netfilter.cli", "serve", "--config",
                    str(self.config)], cwd=self.directory, new_session=True)

    def wait_ready(self) -> None:
        self.wait_until(lambda: "netfilter: serving" in self.log()
                        and _answers(self.address, self.port))

    def fail(self, how: str) -> None:
        """`kill`: SIGKILL to the whole process group, no goodbye; `hang`: SIGSTOP to it,
        every packet to it unanswered (a frozen node, or a host gone from the net)."""
        assert self.proc is not None
        if how == "kill":
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        else:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def recover(self, how: str) -> None:
        """Back after `fail(how)`: started again after a kill, continued after a hang;
        returns once it answers."""
        assert self.proc is not None
        if how == "kill":
            self.spawn()
        else:
            os.killpg(self.proc.pid, signal.SIGCONT)
        self.wait_ready()

    def stop(self) -> int | None:
        """SIGTERM as usual, after a SIGCONT in case it was left stopped by a hang."""
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
        return super().stop()

    def publish(self, bundle: Path) -> None:
        """As a mirror does: the file appears whole (a new inode)."""
        tmp = self.source / ".incoming"
        shutil.copyfile(bundle, tmp)
        os.replace(tmp, self.source / "test.nfl")

    def list_version(self) -> float | None:
        """`netfilter_list_version` of list `test` from the authority, from /metrics."""
        url = f"http://{self.address}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if re.match(r'netfilter_list_version\{list="test",source="authority"\} ', line):
                return float(line.split()[-1])
        return None

    def rcode(self, name: str) -> int:
        return _query(self.address, self.port, name).rcode()


def _dnsdist_conf(port: int, pinned: dict[str, int], nodes: list[Node],
                  web_port: int) -> str:
    """The example config's settings (examples/dnsdist/dnsdist.conf), on test ports, plus
    one listener per node whose queries go to that node's one-server pool."""
    lines = [
        f"setLocal('{HOST}:{port}')",
        *(f"addLocal('{HOST}:{p}')" for p in pinned.values()),
        "setSecurityPollSuffix('')",
        "setServerPolicy(roundrobin)", "setVerboseHealthChecks(true)",
    ]
    for node in nodes:
        lines.append(
            f"newServer({{address='{node.address}:{node.port}', name='{node.name}', "
            f"pool={{'', '{node.name}'}}, checkName='{CHECK_NAME}', checkType='A', "
            f"mustResolve=true, checkInterval={int(CHECK_INTERVAL)}, "
            f"checkTimeout={int(CHECK_TIMEOUT * 1000)}, maxCheckFailures={MAX_FAILURES}, "
            f"rise=1}})")
    lines += [f"addAction(DSTPortRule({p}), PoolAction('{name}'))"
              for name, p in pinned.items()]
    lines += [
        f"webserver('{HOST}:{web_port}')",
        f"setWebserverConfig({{apiKey='{API_KEY}', acl='127.0.0.0/8'}})",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Dnsdist(ChildProcess):
    """dnsdist in the foreground (RECIPES.md), its JSON API for its view of the nodes."""

    directory: Path
    nodes: list[Node]
    name: str = "dnsdist"
    port: int = field(default_factory=free_port)
    web_port: int = field(default_factory=free_port)
    pinned: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.pinned = {node.name: free_port() for node in self.nodes}
        self.log_path = self.directory / "dnsdist.log"
        self.conf = self.directory / "dnsdist.conf"
        self.conf.write_text(_dnsdist_conf(self.port, self.pinned, self.nodes,
                                           self.web_port), encoding="utf-8")

    def start(self) -> None:
        self.popen(["dnsdist", "--supervised", "--disable-syslog", "-C", str(self.conf)])
        self.wait_until(lambda: _answers(HOST, self.port)
                        and all(s["state"] == "up" for s in self.servers().values()))

    def servers(self) -> dict[str, dict[str, object]]:
        """Each backend by name, as dnsdist's API reports it (state, queries, ...)."""
        request = urllib.request.Request(
            f"http://{HOST}:{self.web_port}/api/v1/servers/localhost",
            headers={"X-API-Key": API_KEY})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                body = json.load(response)
        except OSError:
            return {}
        return {s["name"]: s for s in body["servers"]}

    def state(self, name: str) -> str:
        return str(self.servers().get(name, {}).get("state", "?"))

    def queries(self, name: str) -> int:
        return int(self.servers()[name]["queries"])  # type: ignore[call-overload]


@pytest.fixture
def front(tmp_path: Path, build: BuildBundle,
          authority: tuple[Path, Path]) -> Iterator[tuple[Dnsdist, Node, Node, Path]]:
    """unbound, nodes A and B at list v1, dnsdist in front; yields the v2 bundle too."""
    require_tools("dnsdist", "unbound")
    first, second = build(version=1), build(V2, version=2)
    upstream_dir = tmp_path / "unbound"
    upstream_dir.mkdir()
    with Unbound(upstream_dir) as unbound:
        port = free_port()
        nodes = [Node(tmp_path / name, name, address, port, first, authority[1],
                      unbound.address)
                 for name, address in (("node-a", NODE_A), ("node-b", NODE_B))]
        dnsdist = Dnsdist(tmp_path, nodes)
        try:
            for node in nodes:
                node.spawn()
            for node in nodes:
                node.wait_ready()
            dnsdist.start()
            yield dnsdist, nodes[0], nodes[1], second
        except BaseException:
            for process in (dnsdist, *nodes):
                print(f"----- {process.name} ({process.log_path}) -----\n{process.log()}",
                      file=sys.stderr)
            raise
        finally:
            dnsdist.stop()
            for node in nodes:
                node.stop()


def _loop(dnsdist: Dnsdist, until: float) -> list[tuple[float, bool]]:
    """Clean queries through dnsdist, one at a time until `until` (monotonic): each sent
    once, CLIENT_TIMEOUT to answer; (time sent, answered NOERROR) for each."""
    results = []
    query = dns.message.make_query(CHECK_NAME, "A")
    while (sent := time.monotonic()) < until:
        try:
            answer = dns.query.udp(query, HOST, port=dnsdist.port, timeout=CLIENT_TIMEOUT)
            ok = answer.rcode() == dns.rcode.NOERROR
        except (dns.exception.DNSException, OSError):
            ok = False
        results.append((sent, ok))
        if ok:
            time.sleep(0.01)  # ~100 q/s: a steady client, not a load test
    return results


def _watch(dnsdist: Dnsdist, name: str, state: str, since: float, bound: float,
           out: dict[str, float]) -> None:
    """Poll dnsdist's API every 50 ms; out['seconds']: when `name` first showed `state`."""
    while time.monotonic() - since < bound:
        if dnsdist.state(name) == state:
            out["seconds"] = time.monotonic() - since
            return
        time.sleep(0.05)


def _fail_and_watch(dnsdist: Dnsdist, node: Node, how: str, when: float,
                    out: dict[str, float]) -> None:
    """At `when` (monotonic) fail `node`; out['at']: the moment just before the signal
    (the reference of every figure), out['down']: seconds from then until dnsdist's API
    first showed it down (absent if not within the client loop's time)."""
    time.sleep(max(0.0, when - time.monotonic()))
    out["at"] = time.monotonic()
    node.fail(how)
    seen: dict[str, float] = {}
    _watch(dnsdist, node.name, "down", out["at"], KILL_LOOP, seen)
    if seen:
        out["down"] = seen["seconds"]


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_dnsdist_fails_over_sees_the_skew_and_takes_the_node_back(
        front: tuple[Dnsdist, Node, Node, Path], how: str) -> None:
    dnsdist, node_a, node_b, second = front
    figures: dict[str, object] = {"how": how, "loss_bound_s": LOSS_BOUND}

    # 1. Roll-out, one node after the other: the skew on each side.
    assert node_a.list_version() == node_b.list_version() == 1
    node_a.publish(second)
    assert wait_for(lambda: node_a.rcode(NEW_NAME) == dns.rcode.NXDOMAIN, 20), node_a.log()
    assert (node_a.list_version(), node_b.list_version()) == (2, 1)
    pinned_a = _query(HOST, dnsdist.pinned[node_a.name], NEW_NAME).rcode()
    pinned_b = _query(HOST, dnsdist.pinned[node_b.name], NEW_NAME).rcode()
    assert (pinned_a, pinned_b) == (dns.rcode.NXDOMAIN, dns.rcode.NOERROR)
    before = {n.name: dnsdist.queries(n.name) for n in (node_a, node_b)}
    unpinned = [_query(HOST, dnsdist.port, NEW_NAME).rcode() for _ in range(10)]
    after = {n.name: dnsdist.queries(n.name) for n in (node_a, node_b)}
    # Round robin over both: half the answers say blocked, half do not, during the skew.
    assert unpinned.count(dns.rcode.NXDOMAIN) == 5, unpinned
    assert all(after[name] - before[name] == 5 for name in before), (before, after)
    node_b.publish(second)
    assert wait_for(lambda: node_b.rcode(NEW_NAME) == dns.rcode.NXDOMAIN, 20), node_b.log()
    assert (node_a.list_version(), node_b.list_version()) == (2, 2)
    assert {_query(HOST, dnsdist.port, NEW_NAME).rcode() for _ in range(4)} == {
        dns.rcode.NXDOMAIN}

    # 2. Node A fails under a steady client.
    for _ in range(20):  # warm: every answer in the loop below comes from a node's cache
        assert _query(HOST, dnsdist.port, CHECK_NAME).rcode() == dns.rcode.NOERROR
    failed_at: dict[str, float] = {}  # when node A was failed, and when dnsdist saw it
    failer = threading.Thread(target=_fail_and_watch,
                              args=(dnsdist, node_a, how, time.monotonic() + 1.0, failed_at))
    failer.start()
    try:
        results = _loop(dnsdist, time.monotonic() + 1.0 + KILL_LOOP)
    finally:
        failer.join()
    killed = failed_at["at"]
    detected = {"seconds": failed_at["down"]} if "down" in failed_at else {}
    assert node_a.alive() == (how == "hang")
    lost = [t - killed for t, ok in results if not ok]
    figures.update(queries=len(results), lost=len(lost),
                   lost_before_kill=sum(1 for t in lost if t < 0),
                   last_loss_s=round(max(lost), 3) if lost else None,
                   detect_s=round(detected["seconds"], 3) if detected else None)
    assert detected, f"dnsdist never marked {node_a.name} down: {dnsdist.servers()}"
    assert not [t for t in lost if t < 0 or t > LOSS_BOUND], (figures, lost)
    assert dnsdist.state(node_b.name) == "up"

    # 3. Node A back: dnsdist marks it up, queries reach it again, at version 2.
    restarted = time.monotonic()
    node_a.recover(how)
    ready = time.monotonic()
    risen: dict[str, float] = {}
    _watch(dnsdist, node_a.name, "up", ready, 10.0, risen)
    assert risen, f"dnsdist never marked {node_a.name} up again: {dnsdist.servers()}"
    figures.update(start_s=round(ready - restarted, 3), rejoin_after_ready_s=round(
        risen["seconds"], 3))
    before_a = dnsdist.queries(node_a.name)
    answers = [_query(HOST, dnsdist.port, CHECK_NAME).rcode() for _ in range(10)]
    assert answers == [dns.rcode.NOERROR] * 10
    assert dnsdist.queries(node_a.name) - before_a == 5
    assert _query(HOST, dnsdist.pinned[node_a.name], NEW_NAME).rcode() == dns.rcode.NXDOMAIN
    assert node_a.list_version() == 2
    print(f"\ndnsdist front figures: {json.dumps(figures)}")


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dnsdist" / "dnsdist.conf"


def test_the_example_config_is_valid_and_checks_as_tested() -> None:
    """The documented config parses in the installed dnsdist and uses the health-check
    settings the test above measured, so the README's figures hold for it."""
    require_tools("dnsdist")
    done = subprocess.run(["dnsdist", "--check-config", "-C", str(EXAMPLE)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    text = EXAMPLE.read_text(encoding="utf-8")
    servers = re.findall(r"newServer\(\{.*?\}\)", text, re.S)
    assert len(servers) == 2
    for server in servers:
        assert f"checkInterval={int(CHECK_INTERVAL)}," in server
        assert f"checkTimeout={int(CHECK_TIMEOUT * 1000)}," in server
        assert f"maxCheckFailures={MAX_FAILURES}," in server
        assert f"checkName='{CHECK_NAME}'" in server
