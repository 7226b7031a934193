"""The tiles over HTTP on the web stack, as `netfilter audit tiles --listen` runs them
(`TileServer`: a loop of its own) and as `netfilter serve` does (a listener beside
others on its loop): what they serve and refuse, keep-alive, and that idle
connections hold no thread and are closed after the timeout; and `netfilter audit
tiles --listen` serving a real log.

Servers on 127.0.0.1 port 0 in a thread; clients are real sockets and http.client,
some from 127.0.0.2 and others of 127/8 (Linux loopback is all of it).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from netfilter.audit.log import AuditLog, load_node_key
from netfilter.audit.store import AuditStore
from netfilter.events import Event
from netfilter.slots import Slots
from netfilter.web.server import Limits, WebServer
from netfilter.web.tiles import TileServer, tiles_listener
from tests.support import connect_from, free_port, wait_for

CHECKPOINT = b"tiles-test.example\n3\nAAAA\n\n\xe2\x80\x94 tiles-test.example xyz\n"
TILE = bytes(range(256)) * 3


@pytest.fixture
def tiles(tmp_path: Path) -> Path:
    root = tmp_path / "tiles"
    (root / "tile" / "0").mkdir(parents=True)
    (root / "tile" / "entries").mkdir()
    (root / "checkpoint").write_bytes(CHECKPOINT)
    (root / "tile" / "0" / "000.p").mkdir()
    (root / "tile" / "0" / "000.p" / "3").write_bytes(TILE)
    (root / "tile" / ".tmp-abc").write_bytes(b"half written")
    (tmp_path / "secret").write_bytes(b"outside")
    (root / "tile" / "link").symlink_to(tmp_path / "secret")
    return root


def _start(server: TileServer) -> Iterator[TileServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        assert not thread.is_alive()


LIMITS = Limits(64, 8, 1.0, 1.0, max_requests=100, answer_timeout=1.0)


class WebTiles:
    """The tiles' listener as `netfilter serve` runs it (a WebServer started on a loop
    that serves other things too), here a loop in a thread of its own."""

    def __init__(self, directory: Path) -> None:
        sock = socket.create_server(("127.0.0.1", 0))
        self.server_address = sock.getsockname()[:2]
        self.server = WebServer([tiles_listener(directory, sock, LIMITS)])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    @property
    def slots(self) -> Slots:
        return self.server.slots[0]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(params=["audit-tiles", "serve"])
def served(tiles: Path, request: pytest.FixtureRequest) -> Iterator[TileServer | WebTiles]:
    """The tiles served by `netfilter audit tiles --listen` and by serve."""
    if request.param == "audit-tiles":
        yield from _start(TileServer(tiles, "127.0.0.1", 0, limits=LIMITS))
        return
    web = WebTiles(tiles)
    try:
        yield web
    finally:
        web.close()


def _get(port: int, path: str, method: str = "GET",
         source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5,
                                      source_address=(source, 0))
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        conn.close()


def _raw(port: int, request: bytes) -> bytes:
    with connect_from(port) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _threads() -> int:
    """Native threads of this process (the interpreter's and any library's)."""
    return len(os.listdir("/proc/self/task"))


def test_serves_files_with_their_types(served: TileServer | WebTiles) -> None:
    port = served.server_address[1]
    status, headers, body = _get(port, "/checkpoint")
    assert (status, body) == (200, CHECKPOINT)
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["cache-control"] == "no-cache"
    status, headers, body = _get(port, "/tile/0/000.p/3")
    assert (status, body) == (200, TILE)
    assert headers["content-type"] == "application/octet-stream"
    assert headers["x-content-type-options"] == "nosniff"
    status, headers, body = _get(port, "/tile/0/000.p/3", "HEAD")
    assert (status, body) == (200, b"") and headers["content-length"] == str(len(TILE))
    assert _get(port, "/checkpoint?x=1")[0] == 200


@pytest.mark.parametrize("path", [
    "/", "/tile/", "/tile", "/tile/0/", "/../secret", "/tile/../../secret",
    "/%2e%2e/secret", "/tile/..%2f..%2fsecret", "/tile/link", "/tile/.tmp-abc",
    "/tile//0/000.p/3", "/tile/0/000.p/3%00", "/tile\\0", "/missing"])
def test_refuses_listings_traversal_and_other_files(served: TileServer | WebTiles,
                                                   path: str) -> None:
    status, _, body = _get(served.server_address[1], path)
    assert status == 404 and b"outside" not in body and b"half" not in body


def test_read_only_and_malformed(served: TileServer | WebTiles) -> None:
    port = served.server_address[1]
    status, headers, _ = _get(port, "/checkpoint", "POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert _raw(port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _raw(port, b"GET /checkpoint HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    assert _raw(port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.1 431 ")
    answer = _raw(port, b"GET /checkpoint HTTP/1.0\r\n\r\n")  # 1.0: closed after it
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(CHECKPOINT)


def test_keep_alive_bounded(tiles: Path) -> None:
    limits = Limits(header_timeout=1.0, max_requests=4)
    for server in _start(TileServer(tiles, "127.0.0.1", 0, limits=limits)):
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        try:
            conn.request("GET", "/checkpoint")
            conn.getresponse().read()
            first = conn.sock
            conn.request("GET", "/tile/0/000.p/3")
            response = conn.getresponse()
            assert response.read() == TILE and conn.sock is first  # the same connection
            conn.request("HEAD", "/missing")  # no body, so the connection stays usable
            response = conn.getresponse()
            assert response.status == 404 and response.read() == b""
            conn.request("GET", "/checkpoint")
            response = conn.getresponse()
            assert response.getheader("connection") == "close"  # the fourth and last
            response.read()
        finally:
            conn.close()


def test_kept_alive_answers_wait_for_no_delayed_ack(served: TileServer | WebTiles) -> None:
    """An answer's head and body are written apart: without TCP_NODELAY (which asyncio's
    own loop does not set on sockets bound before it) each answer on a kept-alive
    connection would wait ~40 ms for the client's delayed ACK."""
    conn = http.client.HTTPConnection("127.0.0.1", served.server_address[1], timeout=5)
    try:
        start = time.monotonic()
        for _ in range(20):
            conn.request("GET", "/checkpoint")
            assert conn.getresponse().read() == CHECKPOINT
        assert time.monotonic() - start < 0.6  # ~0.8 s and more with Nagle's algorithm
    finally:
        conn.close()


def test_logs_nothing_per_request(served: TileServer | WebTiles, caplog: pytest.LogCaptureFixture,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    port = served.server_address[1]
    _get(port, "/checkpoint")  # the server's start line may come from its thread as late
    caplog.clear()  # as its first answer: what counts is what requests log
    capfd.readouterr()
    _get(port, "/checkpoint", source="127.0.0.2")
    _get(port, "/missing", source="127.0.0.2")
    _raw(port, b"GARBAGE\r\n\r\n")
    assert not [r for r in caplog.records if r.name.startswith("netfilter")]
    assert not [r for r in caplog.records if "127.0.0" in r.getMessage()]
    out, err = capfd.readouterr()
    assert "127.0.0" not in out + err


def test_a_client_that_stops_reading_loses_its_connection(served: TileServer | WebTiles,
                                                          tiles: Path) -> None:
    """A client asks for a large file and reads nothing: once our send buffer has been
    full for `answer_timeout` the connection is reset and its slot freed (a close
    would wait on the client for ever)."""
    size = 8 << 20
    (tiles / "large").write_bytes(bytes(range(256)) * (size // 256))
    assert _get(served.server_address[1], "/checkpoint")[0] == 200  # serving
    assert wait_for(lambda: len(served.slots) == 0, 2.0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    try:
        sock.connect(("127.0.0.1", served.server_address[1]))
        sock.sendall(b"GET /large HTTP/1.1\r\nHost: tiles.example\r\n\r\n")
        assert wait_for(lambda: len(served.slots) == 1, 2.0)
        time.sleep(0.5)
        assert len(served.slots) == 1  # still taking (or not) its answer
        assert wait_for(lambda: len(served.slots) == 0, 5.0)
        sock.settimeout(5)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):  # what the kernels still held
                received += len(chunk)
        assert received < size  # the answer was cut off, not finished
    finally:
        sock.close()


def test_idle_connections_hold_no_thread_and_are_closed(served: TileServer | WebTiles) -> None:
    port = served.server_address[1]
    before = (threading.active_count(), _threads())
    idle = []
    try:
        for i in range(300):  # from 30 addresses, 10 each, sending nothing
            idle.append(connect_from(port, f"127.0.0.{10 + i // 10}"))
        opened = time.monotonic()
        assert threading.active_count() <= before[0] + 1
        assert _threads() <= before[1] + 1
        assert len(served.slots) <= 64
        for source in ("127.0.0.2", "127.0.0.1", "127.0.0.10"):  # normal clients
            start = time.monotonic()
            assert _get(port, "/checkpoint", source=source)[2] == CHECKPOINT
            assert time.monotonic() - start < 1.0
        closed = 0
        for sock in idle:  # every one ends: evicted at once, or after the 1 s timeout
            sock.settimeout(max(0.1, opened + 4.0 - time.monotonic()))
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:
                closed += 1
        assert closed == 300
        assert wait_for(lambda: len(served.slots) == 0, 2.0)
        assert threading.active_count() <= before[0] + 1
    finally:
        for sock in idle:
            sock.close()


def test_idle_connection_lives_for_the_timeout(served: TileServer | WebTiles) -> None:
    with connect_from(served.server_address[1], "127.0.0.2") as sock:
        start = time.monotonic()
        assert sock.recv(1) == b""
        assert 0.8 < time.monotonic() - start < 3.0


def test_audit_tiles_listen_serves_a_log(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "audit.sqlite")
    log = AuditLog(store, origin="tiles-test.example", key=load_node_key(tmp_path / "node.key"),
                   checkpoint_interval=3600)
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    log.record(Event("list-loaded", "tiles-test.example", time=now, list="demo", version=1))
    log.flush()
    log.close()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "netfilter.cli", "audit", "tiles",
                             "--log", str(tmp_path / "audit.sqlite"),
                             "--out", str(tmp_path / "out"), "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def served() -> bool:
            try:
                return _get(port, "/checkpoint")[0] == 200
            except OSError:
                return False

        assert wait_for(served, 20), proc.poll()
        assert _get(port, "/checkpoint")[2] == (tmp_path / "out" / "checkpoint").read_bytes()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert "serving" in out and "Traceback" not in err and "127.0.0.1 -" not in err
