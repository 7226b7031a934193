"""The proxy's own log names no client unless `audit.client` is `full`: a real
`netfilter serve proxy` (mitmdump as its child) and a direct `mitmdump -s` addon, driven
by curl; the output must not hold any client's address:port, while warnings (a failed
upstream connection) stay."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.proxy_support import (
    HOST,
    MITMDUMP,
    Mitmdump,
    Origin,
    free_port,
    require_tools,
    write_config,
)
from tests.support import ChildProcess, listening

pytestmark = pytest.mark.slow


class ServeProxy(ChildProcess):
    """`netfilter serve proxy --config ...`: its output and its mitmdump child's."""

    name = "netfilter serve proxy"

    def __init__(self, directory: Path, client: str) -> None:
        self.port = free_port()
        config = write_config(directory)
        settings = yaml.safe_load(config.read_text(encoding="utf-8"))
        settings["proxy"]["listen"] = f"{HOST}:{self.port}"
        settings["audit"]["client"] = client
        config.write_text(yaml.safe_dump(settings), encoding="utf-8")
        self.args = [sys.executable, "-m", "netfilter.cli", "serve", "proxy", "--config",
                     str(config)]
        self.log_path = directory / "serve.log"
        self.proc = None

    def start(self) -> ServeProxy:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONUNBUFFERED"] = "1"
        self.popen(self.args, env=env, new_session=True)
        self.wait_until(lambda: listening(self.port) and "serving proxy" in self.log())
        return self


def curl_port(proxy_port: int, url: str, *args: str) -> tuple[int, int]:
    """(HTTP status, the client's local port) of one request through the proxy."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(["curl", "-s", "-o", os.devnull, "--max-time", "10", "--proxy",
                           f"http://{HOST}:{proxy_port}", "-w", "%{http_code} %{local_port}",
                           *args, url], capture_output=True, text=True, timeout=20,
                          check=False, env=env)
    status, port = done.stdout.split()
    return int(status), int(port)


@pytest.fixture(scope="module")
def origins() -> Iterator[tuple[Origin, int]]:
    require_tools("curl")
    if not MITMDUMP.exists():
        pytest.skip(f"{MITMDUMP} missing: install the proxy extra (pip install -e .[proxy])")
    origin = Origin()
    try:
        yield origin, free_port()  # nothing listens on the second: a failed connection
    finally:
        origin.close()


def _traffic(port: int, origin: Origin, dead: int) -> list[int]:
    """A clean request, a blocked one, a tunnel and a failed upstream: the client ports."""
    seen = []
    for url, args, expected in [
        (f"http://{HOST}:{origin.port}/clean", (), 200),
        ("http://blocked.example/page", (), 451),
        (f"http://{HOST}:{origin.port}/tunnel", ("--proxytunnel",), 200),
        (f"http://{HOST}:{dead}/", (), 502),
    ]:
        status, client_port = curl_port(port, url, *args)
        assert status == expected, url
        seen.append(client_port)
    return seen


def _logged_traffic(tmp_path: Path, client: str,
                    origins: tuple[Origin, int]) -> tuple[str, list[int]]:
    """`netfilter serve proxy` with `audit.client: client`, some traffic through it:
    its output, and the client ports the traffic came from."""
    origin, dead = origins
    proxy = ServeProxy(tmp_path, client).start()
    try:
        ports = _traffic(proxy.port, origin, dead)
    finally:
        proxy.stop()
    return proxy.log(), ports


@pytest.mark.parametrize("client", ["pseudonym", "truncated", "none"])
def test_serve_proxy_logs_no_client(tmp_path: Path, origins: tuple[Origin, int],
                                    client: str) -> None:
    origin, _ = origins
    log, ports = _logged_traffic(tmp_path, client, origins)
    for port in ports:
        assert f":{port}" not in log, log
    assert "client connect" not in log and "client disconnect" not in log, log
    assert f"server connect {HOST}:{origin.port}" in log  # mitmproxy's own lines stay
    # an origin fault: the addon's one line (mitmproxy's per-connection one is dropped)
    assert "error establishing server connection" not in log
    assert f"proxy: origin {HOST}:" in log and "failed: refused" in log, log


def test_serve_proxy_names_clients_when_configured(tmp_path: Path,
                                                   origins: tuple[Origin, int]) -> None:
    log, ports = _logged_traffic(tmp_path, "full", origins)
    for port in ports:
        assert f"[{HOST}:{port}] client connect" in log, log


def test_direct_mitmdump_turns_flow_lines_off(tmp_path: Path,
                                              origins: tuple[Origin, int]) -> None:
    # mitmdump's default flow_detail=1 prints each request with its client: the addon
    # switches it off while audit.client is not `full` (write_config: truncated).
    origin, dead = origins
    config = write_config(tmp_path)
    proxy = Mitmdump(tmp_path, config, tmp_path / "confdir")
    proxy.args[proxy.args.index("flow_detail=0")] = "flow_detail=1"
    proxy.start()
    try:
        ports = _traffic(proxy.port, origin, dead)
    finally:
        proxy.stop()
    log = proxy.log()
    assert "setting flow_detail=0" in log, log
    for port in ports:
        assert f":{port}" not in log, log
    assert "GET http" not in log
