"""`netfilter serve` when a part cannot listen (its port taken): one line naming the
part and the address, exit 2, no traceback; every socket is bound before any part starts
or the audit log is opened, so nothing has started and nothing is written (no node key,
no audit store). tests/test_serve_listen.py asks the other ports while serve runs.

Real `netfilter serve` subprocesses; the ports are taken by real sockets of this test.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import DEMO_LIST, DEMO_PUB, HOST, free_port

IN_USE = "(address already in use)"


@contextmanager
def _taken(port: int, kind: int = socket.SOCK_STREAM) -> Iterator[None]:
    """HOST:port in use by a socket of this process (listening, for TCP)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, port))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        yield


def _serve(tmp_path: Path, sections: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "netfilter.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"id": "errors-test.example", "key": str(tmp_path / "node.key")},
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
        "audit": {"path": str(tmp_path / "audit.sqlite"), "client": "none"},
        **sections}), encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "netfilter.cli", "serve", "--config",
                           str(config)], capture_output=True, text=True, timeout=90)


def _one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line; every other line on stderr is an INFO log line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    other = [line for line in result.stderr.splitlines()
             if not line.startswith("netfilter: INFO: ")]
    assert len(other) == 1 and other[0].startswith("netfilter: error: "), result.stderr
    return other[0]


def _nothing_written(tmp_path: Path) -> bool:
    """Neither the node key nor the audit store was created."""
    return sorted(p.name for p in tmp_path.iterdir()) == ["netfilter.yaml"]


def test_dns_port_in_use(tmp_path: Path) -> None:
    port = free_port()
    with _taken(port, socket.SOCK_DGRAM):
        result = _serve(tmp_path, {"dns": {"listen": [f"{HOST}:{port}"],
                                           "upstreams": [f"{HOST}:9"]}})
    assert _one_error(result) == (f"netfilter: error: dns.listen[0]: cannot listen on {HOST} port "
                                  f"{port} {IN_USE}")
    assert _nothing_written(tmp_path)


def test_dns_names_the_address_that_failed(tmp_path: Path) -> None:
    first, second = free_port(), free_port()
    with _taken(second):
        result = _serve(tmp_path, {"dns": {"listen": [f"{HOST}:{first}", f"{HOST}:{second}"],
                                           "upstreams": [f"{HOST}:9"]}})
    assert _one_error(result).endswith(
        f"dns.listen[1]: cannot listen on {HOST} port {second} {IN_USE}")
    assert "dns: serving" not in result.stderr  # not even on the first address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:  # released
        again.bind((HOST, first))


def test_stoppage_port_in_use_dns_never_started(tmp_path: Path) -> None:
    dns_port, port = free_port(), free_port()
    with _taken(port):
        result = _serve(tmp_path, {"dns": {"listen": [f"{HOST}:{dns_port}"],
                                           "upstreams": [f"{HOST}:9"]},
                                   "stoppage": {"listen": f"{HOST}:{port}"}})
    assert _one_error(result).endswith(f"stoppage.listen: cannot listen on {HOST} port {port} "
                                       f"{IN_USE}")
    assert "dns: serving" not in result.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:  # released
        again.bind((HOST, dns_port))
    assert _nothing_written(tmp_path)


def test_proxy_port_in_use(tmp_path: Path) -> None:
    pytest.importorskip("mitmproxy")
    port = free_port()
    with _taken(port):
        result = _serve(tmp_path, {"proxy": {"listen": f"{HOST}:{port}", "intercept": "none"}})
    assert _one_error(result).endswith(
        f"proxy.listen: cannot listen on {HOST} port {port} {IN_USE}")


def test_tiles_port_in_use(tmp_path: Path) -> None:
    stop_port, port = free_port(), free_port()
    with _taken(port):
        result = _serve(tmp_path, {
            "stoppage": {"listen": f"{HOST}:{stop_port}"},
            "audit": {"path": str(tmp_path / "audit.sqlite"), "client": "none",
                      "tiles": str(tmp_path / "tiles"), "tiles_listen": f"{HOST}:{port}"}})
    assert _one_error(result).endswith(
        f"audit.tiles_listen: cannot listen on {HOST} port {port} {IN_USE}")


def test_metrics_port_in_use(tmp_path: Path) -> None:
    stop_port, port = free_port(), free_port()
    with _taken(port):
        result = _serve(tmp_path, {"stoppage": {"listen": f"{HOST}:{stop_port}"},
                                   "metrics": {"listen": f"{HOST}:{port}"}})
    assert _one_error(result).endswith(
        f"metrics.listen: cannot listen on {HOST} port {port} {IN_USE}")
    assert "stoppage: serving" not in result.stderr
    assert _nothing_written(tmp_path)
