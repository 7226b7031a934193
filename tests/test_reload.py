"""SIGHUP re-reads the config of `netfilter serve --config`: a good one is applied
live where it can be (lists, local lists, DNS answers; what cannot is named in one
"restart" line per key and keeps its value), a bad one is refused in one line and the
config in force stays, in the server and in its mitmdump child alike."""

from __future__ import annotations

import http.client
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.rcode
import pytest
import yaml

from tests.dns_support import (
    DEMO_LIST,
    DEMO_PUB,
    HOST,
    Netfilter,
    Unbound,
    free_port,
    read_events,
    require_tools,
    udp,
    wait_for,
)
from tests.support import ChildProcess

REPO = Path(__file__).resolve().parent.parent
LOCAL_BLOCK = REPO / "lists" / "demo" / "local-block.yaml"  # gambling.example


@pytest.fixture(scope="module")
def unbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    require_tools("unbound")
    with Unbound(tmp_path_factory.mktemp("unbound")) as server:
        yield server  # type: ignore[misc]


def _rcode(port: int, name: str) -> int:
    return udp(dns.message.make_query(name, "A"), port).rcode()


def _ede(port: int, name: str) -> list[int]:
    query = dns.message.make_query(name, "A", use_edns=0)
    return [e.code for e in udp(query, port).extended_errors()]


def _hup(server: ChildProcess, text: str, count: int) -> None:
    """SIGHUP, then wait until `text` is in the log `count` times (bounded)."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: server.log().count(text) >= count, 20), server.log()


def test_sighup_applies_a_new_config_and_refuses_a_bad_one(unbound: Unbound,
                                                           tmp_path: Path) -> None:
    server = Netfilter(tmp_path, upstreams=[unbound.address])
    with server:
        port = server.port
        assert _rcode(port, "www.clean.example") == dns.rcode.NOERROR
        blocked = tmp_path / "block.yaml"
        blocked.write_text("entries:\n  - www.clean.example\n", encoding="utf-8")
        good: dict[str, Any] = dict(server.config)
        good["local"] = {"block": str(blocked), "action": "nxdomain"}
        good["dns"] = {**server.config["dns"], "ede": 17}
        server.conf.write_text(yaml.safe_dump(good), encoding="utf-8")
        _hup(server, "config reload: applied", 1)
        assert _rcode(port, "www.clean.example") == dns.rcode.NXDOMAIN
        assert _ede(port, "blocked.example") == [17]  # read per query: changed live
        assert wait_for(lambda: any(
            e["type"] == "config-changed" and "local" in (e.get("detail") or "")
            for e in read_events(server.events_path)), 10)

        # An unknown key, then a missing list file: one line each, nothing changes.
        for n, bad in enumerate((
            {**good, "dns": {**good["dns"], "bogus": 1}},
            {**good, "local": {"block": str(tmp_path / "missing.yaml")}},
        ), start=1):
            server.conf.write_text(yaml.safe_dump(bad), encoding="utf-8")
            _hup(server, "config reload refused", n)
            refused = [line for line in server.log().splitlines()
                       if "config reload refused" in line]
            assert len(refused) == n
            assert ("dns.bogus" in refused[-1]) if n == 1 else ("missing.yaml" in refused[-1])
            assert _rcode(port, "www.clean.example") == dns.rcode.NXDOMAIN
            assert _rcode(port, "clean.example") == dns.rcode.NOERROR
            assert _ede(port, "blocked.example") == [17]

        # A new listen address needs a restart: said once, the old one keeps serving.
        other = free_port()
        moved = {**good, "dns": {**good["dns"], "listen": [f"{HOST}:{other}"]}}
        server.conf.write_text(yaml.safe_dump(moved), encoding="utf-8")
        _hup(server, "restart is needed", 1)
        restart = [line for line in server.log().splitlines() if "restart is needed" in line]
        assert len(restart) == 1 and "dns.listen" in restart[0]
        assert _rcode(port, "www.clean.example") == dns.rcode.NXDOMAIN
        with pytest.raises(dns.exception.Timeout):
            udp(dns.message.make_query("clean.example", "A"), other, timeout=0.5)
        assert server.proc is not None and server.proc.poll() is None
    assert "Traceback" not in server.log()


# ---------------------------------------------------------------- the proxy child


class Serve(ChildProcess):
    """`netfilter serve PART --config FILE` (for the proxy: with its mitmdump child)."""

    name = "netfilter serve"
    stop_bound = 20.0

    def __init__(self, directory: Path, config: Path, part: str = "proxy") -> None:
        self.log_path = directory / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONUNBUFFERED"] = "1"
        self.popen([sys.executable, "-m", "netfilter.cli", "serve", part, "--config",
                    str(config)], env=env)

    def child(self) -> int:
        """The mitmdump child's pid."""
        assert self.proc is not None
        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])


def _stop_page(port: int) -> tuple[int, str]:
    connection = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        connection.request("GET", "/", headers={"Host": "sub.blocked.example"})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def test_stop_page_texts_change_live(tmp_path: Path) -> None:
    port = free_port()
    config: dict[str, Any] = {
        "node": {"id": "reload-test", "key": str(tmp_path / "node.key")},
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
        "stoppage": {"listen": f"{HOST}:{port}", "operator": "Old Operator IT"},
    }
    path = tmp_path / "netfilter.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    serve = Serve(tmp_path, path, "stoppage")
    try:
        serve.wait_until(lambda: "serving stoppage" in serve.log(), pause=0.1)
        status, body = _stop_page(port)
        assert status == 451 and "Old Operator IT" in body
        path.write_text(yaml.safe_dump({**config, "stoppage": {
            **config["stoppage"], "operator": "New Operator IT", "max_clients": 64}}),
            encoding="utf-8")
        _hup(serve, "config reload: applied stoppage.operator", 1)
        assert "stoppage.max_clients changed; a restart is needed" in serve.log()
        status, body = _stop_page(port)
        assert status == 451 and "New Operator IT" in body and "Old Operator" not in body
    finally:
        serve.stop()
    assert "Traceback" not in serve.log(), serve.log()


def _curl(port: int, url: str) -> str:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                           "--max-time", "10", "-x", f"http://{HOST}:{port}", url],
                          capture_output=True, text=True, timeout=30, check=False, env=env)
    return done.stdout


def test_a_bad_config_leaves_the_proxy_answering(tmp_path: Path) -> None:
    if importlib.util.find_spec("mitmproxy") is None:
        pytest.skip("mitmproxy not installed (pip install 'netfilter[proxy]')")
    require_tools("curl")
    port = free_port()
    config: dict[str, Any] = {
        "node": {"id": "reload-test", "key": str(tmp_path / "node.key")},
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
        "proxy": {"listen": f"{HOST}:{port}", "intercept": "none",
                  "allowed_destinations": ["127.0.0.0/8"]},
        "audit": {"path": str(tmp_path / "audit.sqlite"), "client": "none"},
    }
    path = tmp_path / "netfilter.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    serve = Serve(tmp_path, path)
    blocked = "http://partly.example/dir/p.html"
    try:
        serve.wait_until(lambda: "serving proxy" in serve.log(), pause=0.1)
        assert _curl(port, blocked) == "451", serve.log()
        child = serve.child()
        path.write_text(yaml.safe_dump({**config, "bogus": True}), encoding="utf-8")
        _hup(serve, "config reload refused", 1)
        os.kill(child, signal.SIGHUP)  # the child's own re-read refuses it too
        assert wait_for(lambda: "reload refused, the config in force stays" in serve.log(), 20)
        time.sleep(0.2)
        assert _curl(port, blocked) == "451", serve.log()
        assert serve.child() == child and serve.proc is not None and serve.proc.poll() is None

        # A good config reaches the child with the server's SIGHUP: a new local list.
        path.write_text(yaml.safe_dump({**config, "local": {"block": str(LOCAL_BLOCK)}}),
                        encoding="utf-8")
        _hup(serve, "config reload: applied local", 1)
        assert wait_for(lambda: _curl(port, "http://gambling.example/") == "451", 20), \
            serve.log()
        assert _curl(port, blocked) == "451"
    finally:
        serve.stop()
    assert "Traceback" not in serve.log(), serve.log()


def test_the_proxy_keeps_its_node_and_audit_log_over_a_reload(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The mitmdump child re-reads the whole file on SIGHUP; like serve, it keeps the
    node and audit settings it started with (a restart changes those)."""
    pytest.importorskip("mitmproxy")
    from netfilter.config import load_config
    from netfilter.proxy.addon import _keep_restart_only

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("node: {id: a.example}\naudit: {path: var/a.sqlite}\n"
                     "proxy: {intercept: none}\n", encoding="utf-8")
    second.write_text("node: {id: b.example}\naudit: {path: var/b.sqlite}\n"
                      "proxy: {intercept: all}\n", encoding="utf-8")
    kept = _keep_restart_only(load_config(first), load_config(second))
    assert kept.node.id == "a.example" and kept.audit is not None
    assert kept.audit.path == Path("var/a.sqlite")
    assert kept.proxy is not None and kept.proxy.intercept == "all"  # live keys apply
    assert sum("a restart is needed" in r.getMessage() for r in caplog.records) == 2
