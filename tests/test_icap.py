"""The ICAP server (RFC 3507): OPTIONS and REQMOD over real sockets against the real
engine and demo bundle, its limits, and a real Squid (Debian `squid`) adapting through
it with curl: a blocked URL answered 451 with the stop page, a clean URL served by a
loopback origin, an HTTPS CONNECT to a blocked domain refused."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from netfilter.config import IcapSettings, load_config
from netfilter.icap import IcapServer
from netfilter.node import make_engine
from netfilter.stoppage import Renderer
from netfilter.stoppage.render import blocked_by_url
from tests.proxy_support import Curl, Origin, write_config
from tests.squid_support import (
    NetfilterServe,
    Rig,
    Squid,
    helper_runtime,
    require_squid,
    set_listen,
    squid_directory,
)
from tests.support import HOST, connect_from, read_events, wait_for

BLOCKED = b"GET http://partly.example/dir/secret.html HTTP/1.1\r\nHost: partly.example\r\n" \
          b"Accept: text/html\r\n\r\n"
CLEAN = b"GET http://partly.example/public/page.html HTTP/1.1\r\nHost: partly.example\r\n\r\n"


class Running:
    """An IcapServer on its own event loop in a thread, on a free loopback port."""

    def __init__(self, config: Path, **limits: Any) -> None:
        settings = load_config(config)
        self.engine = make_engine(settings)
        icap = IcapSettings(listen=f"{HOST}:0", **limits)
        renderer = Renderer(settings.stoppage, base=settings.base,  # type: ignore[arg-type]
                            blocked_by=blocked_by_url(settings))
        self.server = IcapServer(self.engine, icap, renderer)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        self.port = self.server.port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.engine.close()


@pytest.fixture
def icap(tmp_path: Path) -> Iterator[Running]:
    running = Running(write_config(tmp_path), max_connections_per_client=3,
                      header_timeout=1.0, idle_timeout=1.0)
    yield running
    running.close()


def exchange(port: int, data: bytes, *, bound: float = 10.0) -> bytes:
    """Send `data`, read until the server closes (every request here says close)."""
    with socket.create_connection((HOST, port), timeout=bound) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def reqmod(http: bytes, *, body: bytes | None = None, extra: str = "Allow: 204\r\n") -> bytes:
    section = "null-body" if body is None else "req-body"
    head = (f"REQMOD icap://{HOST}/reqmod ICAP/1.0\r\nHost: {HOST}\r\n{extra}"
            f"Connection: close\r\nEncapsulated: req-hdr=0, {section}={len(http)}\r\n\r\n")
    data = head.encode() + http
    if body is not None:
        data += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    return data


def fields(reply: bytes) -> dict[str, str]:
    head = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}


def test_options_advertises_reqmod_preview_204_and_limits(icap: Running) -> None:
    reply = exchange(icap.port, f"OPTIONS icap://{HOST}/reqmod ICAP/1.0\r\nHost: {HOST}\r\n"
                                "Connection: close\r\nEncapsulated: null-body=0\r\n\r\n".encode())
    assert reply.startswith(b"ICAP/1.0 200 OK\r\n")
    f = fields(reply)
    assert f["methods"] == "REQMOD"
    assert f["preview"] == "0" and f["allow"] == "204"
    assert f["max-connections"] == "256"
    assert f["istag"].startswith('"') and f["istag"].endswith('"') and len(f["istag"]) <= 34


def test_istag_changes_with_the_lists_in_force(tmp_path: Path) -> None:
    local = tmp_path / "local-block.yaml"
    local.write_text(yaml.safe_dump(["one.example"]))
    config = write_config(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["local"]["block"] = str(local)
    config.write_text(yaml.safe_dump(settings))
    running = Running(config)
    try:
        before = running.server.istag()
        assert running.server.istag() == before  # stable while the lists stay
        local.write_text(yaml.safe_dump(["one.example", "two.example"]))
        assert running.engine.reload()
        assert running.server.istag() != before
    finally:
        running.close()


def test_blocked_request_gets_the_451_stop_page_encapsulated(icap: Running,
                                                             tmp_path: Path) -> None:
    reply = exchange(icap.port, reqmod(BLOCKED))
    assert reply.startswith(b"ICAP/1.0 200 OK\r\n")
    assert fields(reply)["encapsulated"].startswith("res-hdr=0, res-body=")
    http = reply.split(b"\r\n\r\n", 1)[1]
    assert http.startswith(b"HTTP/1.1 451 Unavailable For Legal Reasons\r\n")
    assert b"DEMO-0003" in http and b"Test School IT" in http
    assert http.endswith(b"\r\n0\r\n\r\n")
    icap.engine.close()
    blocks = [e for e in read_events(tmp_path / "audit.sqlite") if e["type"] == "block"]
    assert [(e["frontend"], e["ref"]) for e in blocks] == [("icap", "DEMO-0003")]


def test_clean_request_gets_204_or_is_echoed(icap: Running) -> None:
    assert exchange(icap.port, reqmod(CLEAN)).startswith(b"ICAP/1.0 204 No Content\r\n")
    # in a preview (Preview: 0, the body to come), 204 too
    preview = exchange(icap.port, reqmod(CLEAN, body=b"", extra="Preview: 0\r\n"))
    assert preview.startswith(b"ICAP/1.0 204 No Content\r\n")
    # without Allow: 204, the request comes back unchanged, body included
    echoed = exchange(icap.port, reqmod(CLEAN, body=b"hello", extra=""))
    assert echoed.startswith(b"ICAP/1.0 200 OK\r\n")
    assert echoed.split(b"\r\n\r\n", 1)[1] == CLEAN + b"5\r\nhello\r\n0\r\n\r\n"


def test_blocked_connect_gets_451(icap: Running) -> None:
    http = b"CONNECT blocked.example:443 HTTP/1.1\r\nHost: blocked.example:443\r\n\r\n"
    reply = exchange(icap.port, reqmod(http))
    assert b"\r\n\r\nHTTP/1.1 451 " in reply
    assert b"text/plain" in reply  # a tunnel cannot show a page


@pytest.mark.parametrize(("data", "status"), [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"REQMOD icap://h/reqmod ICAP/2.0\r\n\r\n", b"505"),
    (b"REQMOD icap://h/other ICAP/1.0\r\nEncapsulated: null-body=0\r\n\r\n", b"404"),
    (b"RESPMOD icap://h/reqmod ICAP/1.0\r\nEncapsulated: null-body=0\r\n\r\n", b"405"),
    (b"REQMOD icap://h/reqmod ICAP/1.0\r\nEncapsulated: res-hdr=0\r\n\r\n", b"400"),
    (b"REQMOD icap://h/reqmod ICAP/1.0\r\n\r\n", b"400"),
    (b"REQMOD icap://h/reqmod ICAP/1.0\r\nEncapsulated: req-hdr=0, null-body=9\r\n\r\n"
     b"GET / X\r\n\r\n", b"400"),
    (b"REQMOD icap://h/reqmod ICAP/1.0\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", b"400"),
])
def test_bad_requests_get_their_status_and_a_closed_connection(
        icap: Running, data: bytes, status: bytes) -> None:
    reply = exchange(icap.port, data)
    assert reply.startswith(b"ICAP/1.0 " + status), reply[:200]
    # the server still serves others
    assert exchange(icap.port, reqmod(CLEAN)).startswith(b"ICAP/1.0 204")


def test_connections_per_client_are_capped(icap: Running) -> None:
    held = [socket.create_connection((HOST, icap.port), timeout=10) for _ in range(3)]
    try:
        assert wait_for(lambda: sum(icap.server._clients.values()) == 3, bound=5.0)
        assert exchange(icap.port, reqmod(CLEAN)).startswith(b"ICAP/1.0 503")
    finally:
        for sock in held:
            sock.close()
    assert wait_for(lambda: not icap.server._clients, bound=5.0)
    assert exchange(icap.port, reqmod(CLEAN)).startswith(b"ICAP/1.0 204")


def test_a_silent_client_is_closed_after_the_header_timeout(icap: Running) -> None:
    with socket.create_connection((HOST, icap.port), timeout=10) as sock:
        sock.sendall(b"REQMOD icap://h/reqmod ICAP/1.0\r\n")  # and never the rest
        assert sock.recv(100) == b""  # closed by the server, not by our 10 s timeout
    assert icap.server.stats["timeouts"] == 1


def read_answers(sock: socket.socket, count: int) -> list[bytes]:
    """`count` ICAP answers read off a kept-alive connection (each a head, and its
    chunked body when the Encapsulated field names one)."""
    data, out = b"", []
    while len(out) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            encapsulated = fields(data[:end + 4]).get("encapsulated", "")
            stop = end + 4 if "null-body" in encapsulated else \
                data.find(b"\r\n0\r\n\r\n", end) + 7
            if stop >= end + 4:
                out.append(data[:stop])
                data = data[stop:]
                continue
        chunk = sock.recv(65536)
        assert chunk, (out, data)
        data += chunk
    assert not data, data
    return out


def keepalive(http: bytes) -> bytes:
    """A REQMOD for `http` that keeps the connection open."""
    return reqmod(http).replace(b"Connection: close\r\n", b"")


def test_pipelined_requests_are_answered_in_order(icap: Running) -> None:
    with socket.create_connection((HOST, icap.port), timeout=10) as sock:
        sock.sendall(keepalive(BLOCKED) + keepalive(CLEAN) + keepalive(BLOCKED)
                     + keepalive(CLEAN))
        blocked, clean, blocked2, clean2 = read_answers(sock, 4)
        assert b"\r\n\r\nHTTP/1.1 451 " in blocked and b"DEMO-0003" in blocked
        assert clean.startswith(b"ICAP/1.0 204 No Content\r\n")
        assert b"\r\n\r\nHTTP/1.1 451 " in blocked2
        assert clean2.startswith(b"ICAP/1.0 204 No Content\r\n")
        # and the connection stays open for more
        sock.sendall(reqmod(CLEAN))
        assert sock.recv(65536).startswith(b"ICAP/1.0 204")
    assert icap.server.stats["requests"] == 5


def test_a_request_sent_byte_by_byte_is_served(icap: Running) -> None:
    data = reqmod(CLEAN, body=b"hello world", extra="")
    with socket.create_connection((HOST, icap.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for n in range(len(data)):
            sock.sendall(data[n:n + 1])
            time.sleep(0.001)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    assert out.startswith(b"ICAP/1.0 200 OK\r\n")
    assert out.split(b"\r\n\r\n", 1)[1] == CLEAN + b"b\r\nhello world\r\n0\r\n\r\n"


def test_a_body_in_many_chunks_is_echoed_and_drained(icap: Running) -> None:
    pieces = [bytes([65 + n % 26]) * (n * 997 % 70_000 + 1) for n in range(12)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    head = reqmod(CLEAN, body=b"", extra="").removesuffix(b"0\r\n\r\n")
    echoed = exchange(icap.port, head + body)
    assert echoed.split(b"\r\n\r\n", 1)[1] == CLEAN + body
    # blocked, the body is drained and the stop page answers
    head = reqmod(BLOCKED, body=b"").removesuffix(b"0\r\n\r\n")
    assert b"\r\n\r\nHTTP/1.1 451 " in exchange(icap.port, head + body)


@pytest.mark.parametrize(("chunk", "answer"), [
    (b"zz\r\n", b""),  # no number: a broken connection, closed without an answer
    (b"1" * 300 + b"\r\n", b"ICAP/1.0 400"),  # chunk-size line too long
    (b"3\r\nabcXY0\r\n\r\n", b"ICAP/1.0 400"),  # a chunk not followed by CRLF
])
def test_a_broken_chunked_body_closes_the_connection(icap: Running, chunk: bytes,
                                                     answer: bytes) -> None:
    head = reqmod(CLEAN, body=b"", extra="Preview: 0\r\n").removesuffix(b"0\r\n\r\n")
    reply = exchange(icap.port, head + chunk)
    assert reply.startswith(answer) if answer else reply == b""
    assert exchange(icap.port, reqmod(CLEAN)).startswith(b"ICAP/1.0 204")


def test_a_head_sent_slower_than_the_header_timeout_is_cut_off(icap: Running) -> None:
    """header_timeout bounds a whole head, not each byte: a client that trickles
    bytes (each well within the timeout) is closed once the head has taken longer."""
    data = reqmod(CLEAN)
    start = time.monotonic()
    with socket.create_connection((HOST, icap.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)  # one byte at a time never fills a buffer

        def closed() -> bool:
            try:
                return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                return False
            except ConnectionError:
                return True

        sent = 0
        while sent < len(data) and not closed():
            try:
                sock.sendall(data[sent:sent + 1])
            except ConnectionError:
                break
            sent += 1
            time.sleep(0.1)  # a byte every 0.1 s (timeout 1 s): the head takes ~10 s
        elapsed = time.monotonic() - start
    assert 5 < sent < len(data) and 0.9 < elapsed < 3.0, (sent, elapsed)
    assert wait_for(lambda: icap.server.stats["timeouts"] == 1, bound=5.0)


def test_a_kept_alive_connection_is_closed_after_the_idle_timeout(icap: Running) -> None:
    with socket.create_connection((HOST, icap.port), timeout=10) as sock:
        sock.sendall(keepalive(CLEAN))
        assert sock.recv(65536).startswith(b"ICAP/1.0 204")
        start = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server
        assert 0.5 < time.monotonic() - start < 5.0
    assert icap.server.stats["timeouts"] == 1


def test_connections_at_once_are_capped(tmp_path: Path) -> None:
    running = Running(write_config(tmp_path), max_connections=2, header_timeout=5.0)
    try:
        held = [connect_from(running.port, f"127.0.0.{n + 2}") for n in range(2)]
        try:
            assert wait_for(lambda: sum(running.server._clients.values()) == 2, bound=5.0)
            assert exchange(running.port, reqmod(CLEAN)).startswith(b"ICAP/1.0 503")
            assert running.server.stats["refused_busy"] == 1
        finally:
            for sock in held:
                sock.close()
        assert wait_for(lambda: not running.server._clients, bound=5.0)
        assert exchange(running.port, reqmod(CLEAN)).startswith(b"ICAP/1.0 204")
    finally:
        running.close()


def test_a_client_that_does_not_read_is_not_read_from(icap: Running) -> None:
    """Flow control: echoing a body to a client that takes nothing, the server stops
    reading (its memory stays bounded) and drops the client after header_timeout."""
    head = reqmod(CLEAN, body=b"", extra="").removesuffix(b"0\r\n\r\n")
    piece = b"x" * 65536
    with socket.create_connection((HOST, icap.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(head)
        sock.settimeout(0.5)
        sent = 0
        with contextlib.suppress(OSError):  # a full window (timeout), or a reset
            while sent < 256 * 1024 * 1024:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
        assert sent < 64 * 1024 * 1024, sent  # it stopped reading long before
        assert wait_for(lambda: icap.server.stats["timeouts"] == 1, bound=5.0)
        assert wait_for(lambda: not icap.server._clients, bound=5.0)


def test_stop_aborts_open_connections(tmp_path: Path) -> None:
    running = Running(write_config(tmp_path), header_timeout=60.0, idle_timeout=60.0)
    with socket.create_connection((HOST, running.port), timeout=10) as sock:
        sock.sendall(keepalive(CLEAN))
        assert sock.recv(65536).startswith(b"ICAP/1.0 204")
        start = time.monotonic()
        running.close()
        assert time.monotonic() - start < 5.0
        with contextlib.suppress(ConnectionResetError):  # or a reset: either way, gone
            assert sock.recv(100) == b""


# ---------------------------------------------------------------- Squid through ICAP


ICAP_DIRECTIVES = [
    "icap_enable on",
    "icap_send_client_ip on",
    "icap_preview_enable on",
]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_squid()
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    work = tmp_path_factory.mktemp("icap-node")
    config = write_config(work)
    icap_port = set_listen(config, "icap")
    with contextlib.ExitStack() as stack:
        squid = Squid(squid_directory(), [
            *ICAP_DIRECTIVES,
            f"icap_service netfilter_req reqmod_precache icap://{HOST}:{icap_port}/reqmod "
            "bypass=0",
            "adaptation_access netfilter_req allow all",
            "http_access allow localhost",
            "http_access deny all",
        ])
        stack.callback(squid.close)
        origin = Origin()
        stack.callback(origin.close)
        node = NetfilterServe("icap", config, icap_port, work / "node.log")
        stack.callback(node.stop)
        node.start()
        squid.start()
        yield Rig(squid, origin, Curl(squid.url, tmp_path_factory.mktemp("curl")),
                  work / "audit.sqlite")


def test_squid_icap_blocked_url_gets_451_and_the_stop_page(rig: Rig) -> None:
    before = rig.origin.snapshot()
    result = rig.curl(f"http://partly.example:{rig.origin.port}/dir/secret.html",
                      "-H", "Accept: text/html")
    assert result.status == 451, rig.explain()
    assert "DEMO-0003" in result.text and "Test School IT" in result.text
    assert result.header("link") is not None
    assert rig.origin.snapshot() == before

    def recorded() -> bool:
        return any(e["type"] == "block" and e["frontend"] == "icap"
                   for e in read_events(rig.audit))

    assert wait_for(recorded, bound=10.0)


def test_squid_icap_clean_url_is_served_by_the_origin(rig: Rig) -> None:
    result = rig.curl(f"http://partly.example:{rig.origin.port}/public/page.html?x=1")
    assert result.status == 200, rig.explain()
    assert result.text == "hello from the origin: /public/page.html?x=1\n"
    upload = rig.curl(f"http://clean.test:{rig.origin.port}/public/up", "--data-binary", "abc")
    assert upload.status == 200, rig.explain()
    assert rig.origin.requests[-1].body == b"abc"


def test_squid_icap_refuses_https_connect_to_a_blocked_domain(rig: Rig) -> None:
    before = rig.origin.snapshot()
    result = rig.curl(f"https://blocked.example:{rig.origin.port}/")
    assert result.connect_status == 451, (result.stderr, rig.explain())
    assert rig.origin.snapshot() == before


def test_serve_binds_icap_listen_first_and_names_it(tmp_path: Path) -> None:
    """open_listeners binds icap.listen with the other parts; a taken address is one
    error naming the key, before anything starts."""
    from netfilter.errors import ListenError
    from netfilter.serve import open_listeners

    config = write_config(tmp_path)
    settings = yaml.safe_load(config.read_text())
    with socket.create_server((HOST, 0)) as taken:
        settings["icap"] = {"listen": f"{HOST}:{taken.getsockname()[1]}"}
        config.write_text(yaml.safe_dump(settings))
        with pytest.raises(ListenError, match="icap.listen"):
            open_listeners(load_config(config), ["icap"])
    settings["icap"] = {"listen": f"{HOST}:0"}
    config.write_text(yaml.safe_dump(settings))
    bound = open_listeners(load_config(config), ["icap"])
    try:
        assert bound.icap is not None and bound.icap.getsockname()[1] > 0
    finally:
        bound.close()


# ---------------------------------------------------------------- Squid, gated by host


@dataclass
class GatedRig:
    squid: Squid
    origin: Origin
    curl: Curl
    icap: Running


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatedRig]:
    """Squid asking the ICAP server (in this process, to count what it is asked) only
    for hosts the gate says a URL on may be blocked."""
    require_squid()
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    with contextlib.ExitStack() as stack:
        runtime = stack.enter_context(helper_runtime())
        directory = squid_directory()
        icap = Running(write_config(tmp_path_factory.mktemp("gated-icap")))
        stack.callback(icap.close)
        squid = Squid(directory, [
            *ICAP_DIRECTIVES,
            "external_acl_type netfilter_gate concurrency=100 children-max=1 "
            f"children-startup=1 ttl=60 negative_ttl=60 %>rd "
            f"{runtime.command(runtime.config(directory))} --gate",
            "acl netfilter_maybe external netfilter_gate",
            f"icap_service netfilter_req reqmod_precache icap://{HOST}:{icap.port}/reqmod "
            "bypass=0",
            "adaptation_access netfilter_req allow netfilter_maybe",
            "http_access allow localhost",
            "http_access deny all",
        ], env=runtime.environment())
        stack.callback(squid.close)
        origin = Origin()
        stack.callback(origin.close)
        squid.start()
        yield GatedRig(squid, origin, Curl(squid.url, tmp_path_factory.mktemp("curl")), icap)


def test_gated_squid_never_asks_icap_about_a_clean_host(gated: GatedRig) -> None:
    asked = gated.icap.server.stats["requests"]
    for n in range(3):
        result = gated.curl(f"http://clean.test:{gated.origin.port}/page/{n}.html")
        assert result.status == 200, gated.squid.explain()
    assert gated.icap.server.stats["requests"] == asked


def test_gated_squid_still_blocks_urls_and_domains_through_icap(gated: GatedRig) -> None:
    before = gated.origin.snapshot()
    asked = gated.icap.server.stats["requests"]
    page = gated.curl(f"http://partly.example:{gated.origin.port}/dir/secret.html",
                      "-H", "Accept: text/html")
    assert page.status == 451, gated.squid.explain()
    assert "DEMO-0003" in page.text
    tunnel = gated.curl(f"https://blocked.example:{gated.origin.port}/")
    assert tunnel.connect_status == 451, (tunnel.stderr, gated.squid.explain())
    clean = gated.curl(f"http://partly.example:{gated.origin.port}/public/page.html")
    assert clean.status == 200, gated.squid.explain()
    assert gated.origin.snapshot() != before  # the clean page only
    assert gated.icap.server.stats["requests"] == asked + 3
    assert gated.icap.server.stats["blocked"] >= 2
