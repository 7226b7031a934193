"""The proxy front-end end to end: a real `mitmdump -s addons/netfilter_proxy.py` in
front of counting origins on 127.0.0.1, driven by curl and headless Chromium.

The proxy refuses every destination outside 127.0.0.0/8 and reaches the test names
(*.example, *.test, which resolve nowhere) through `netfilter_resolve` routes to
127.0.0.1. curl sends names to the proxy, never resolving them itself; where a test
needs a different tunnel than the URL's, it uses `--connect-to`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.proxy_support import (
    HOST,
    MITMDUMP,
    OPERATOR_URL,
    Curl,
    CurlResult,
    Mitmdump,
    Origin,
    make_certificate,
    read_events,
    require_tools,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

NAMES = ["partly.example", "blocked.example", "www.mixed.example", "clean.test",
         "clean.example"]
LINK = f'<{OPERATOR_URL}>; rel="blocked-by"'
ISSUER = "netfilter test origin"


@dataclass
class Rig:
    directory: Path
    proxy: Mitmdump
    plain: Origin  # HTTP origin
    secure: Origin  # HTTPS origin, self-signed
    origin_cert: Path
    curl: Curl

    @property
    def mitm_ca(self) -> Path:
        return self.proxy.confdir / "mitmproxy-ca-cert.pem"

    def events(self) -> list[dict[str, object]]:
        return read_events(self.directory / "audit.sqlite")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_tools("curl")
    if not MITMDUMP.exists():
        pytest.skip(f"{MITMDUMP} missing: install the proxy extra (pip install -e .[proxy])")
    directory = tmp_path_factory.mktemp("proxy-e2e")
    cert, key = make_certificate(directory, NAMES, ISSUER)
    plain, secure = Origin(), Origin(tls=(cert, key))
    confdir = directory / "confdir"
    config = write_config(directory, confdir=confdir)  # a CA: intercept is selective
    # stream_large_bodies: mitmproxy marks big uploads for streaming before the addon
    # sees them; the blocked-upload test checks they are still answered, not streamed.
    proxy = Mitmdump(directory, config, confdir, extra=["--set", "stream_large_bodies=1m"])
    try:
        proxy.start()
        yield Rig(directory, proxy, plain, secure, cert, Curl(proxy.url, directory))
    finally:
        proxy.stop()
        plain.close()
        secure.close()


def _explain(rig: Rig, result: CurlResult) -> str:
    return f"curl: {result.stderr[-1500:]}\nmitmdump: {rig.proxy.log()[-3000:]}"


def _issuer_line(result: CurlResult) -> str:
    return next((line for line in result.stderr.splitlines() if "issuer:" in line), "")


# ---------------------------------------------------------------- plain HTTP


def test_http_blocked_url_gets_451_and_never_reaches_the_origin(rig: Rig) -> None:
    before = rig.plain.snapshot()
    result = rig.curl(f"http://partly.example:{rig.plain.port}/dir/secret.html",
                      "-H", "Accept: text/html")
    assert result.status == 451, _explain(rig, result)
    assert result.header("link") == LINK
    assert result.header("content-type").startswith("text/html")  # type: ignore[union-attr]
    assert result.header("cache-control") == "no-store"
    assert "DEMO-0003" in result.text
    assert "Demo Blocking Authority" in result.text
    assert rig.plain.snapshot() == before


def test_http_text_answer_for_non_html_requests(rig: Rig) -> None:
    result = rig.curl(f"http://blocked.example:{rig.plain.port}/pic.png",
                      "-H", "Accept: image/png", "-H", "Sec-Fetch-Dest: image")
    assert result.status == 451
    assert result.header("content-type").startswith("text/plain")  # type: ignore[union-attr]
    assert "DEMO-0001" in result.text


def test_http_clean_url_reaches_the_origin(rig: Rig) -> None:
    before = len(rig.plain.requests)
    result = rig.curl(f"http://partly.example:{rig.plain.port}/public/page.html?x=1")
    assert result.status == 200, _explain(rig, result)
    assert result.text == "hello from the origin: /public/page.html?x=1\n"
    seen = rig.plain.requests[before:]
    assert [(s.path, s.host) for s in seen] == [
        ("/public/page.html?x=1", f"partly.example:{rig.plain.port}")]


UPLOAD = 50 << 20  # bytes: a sparse file, so nothing is written to disk


@pytest.fixture(scope="module")
def upload(rig: Rig) -> Path:
    path = rig.directory / "upload.bin"
    with open(path, "wb") as f:
        f.truncate(UPLOAD)
    return path


@pytest.fixture(scope="module")
def buffering(rig: Rig) -> Iterator[Mitmdump]:
    """A second mitmdump over the rig's config and CA, without stream_large_bodies
    (mitmproxy then buffers request bodies)."""
    directory = rig.directory / "buffering"
    directory.mkdir()
    proxy = Mitmdump(directory, rig.proxy.config, rig.proxy.confdir)
    try:
        yield proxy.start()
    finally:
        proxy.stop()


_CRASH = ("Traceback", "crashed", "Can't set a response")


@pytest.mark.parametrize("expect", [True, False], ids=["expect-100", "no-expect"])
@pytest.mark.parametrize(("scheme", "flag", "version"), [
    ("http", "--http1.1", "1.1"), ("https", "--http1.1", "1.1"), ("https", "--http2", "2")])
@pytest.mark.parametrize("streaming", [True, False],
                         ids=["stream_large_bodies", "buffered"])
def test_blocked_upload_is_answered_without_reading_its_body(
        rig: Rig, buffering: Mitmdump, upload: Path, streaming: bool, scheme: str,
        flag: str, version: str, expect: bool) -> None:
    """50 MB uploaded to a blocked URL: the 451 comes before the body. curl stops
    sending when it gets the answer: at most what the sockets buffer has gone out
    (nothing at all when it waits for 100 Continue, which never comes), where
    answering after the body would take all 50 MB. Nothing reaches the origin, and
    mitmdump logs no internal error (it did while draining a streamed upload)."""
    proxy = rig.proxy if streaming else buffering
    origin = rig.plain if scheme == "http" else rig.secure
    logged = len(proxy.log())
    before = (rig.plain.snapshot(), rig.secure.snapshot())
    args = [flag, "-T", str(upload), "-X", "POST"]
    if scheme == "https":
        args += ["--cacert", str(rig.mitm_ca)]
    if not expect:
        args += ["-H", "Expect:"]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(["curl", "-sS", "--proxy", proxy.url, "--max-time", "20",
                           "-o", os.devnull, "-w", "%{http_code} %{http_version} %{size_upload}",
                           *args, f"{scheme}://partly.example:{origin.port}/dir/upload"],
                          capture_output=True, text=True, timeout=60, check=False, env=env)
    # curl 55 (Send failure) here was the proxy closing the connection over the unread
    # upload: the kernel sent RST, which curl saw before the 451 (early.py now lingers).
    assert done.returncode == 0, done.stderr
    code, got_version, sent = done.stdout.split()
    assert (code, got_version) == ("451", version), done.stdout
    if expect and version == "1.1":
        assert int(sent) == 0
    assert int(sent) < UPLOAD // 4, f"curl sent {sent} bytes of {UPLOAD}"
    assert (rig.plain.snapshot(), rig.secure.snapshot()) == before
    _no_crash(proxy, logged)


def _answered_upload(rig: Rig, scheme: str) -> socket.socket:
    """A client that announces a 1 GiB upload to a blocked URL (over HTTPS inside a
    CONNECT tunnel, as curl does) and reads the proxy's answer, having sent nothing of
    the body yet."""
    origin = rig.plain if scheme == "http" else rig.secure
    authority = f"partly.example:{origin.port}"
    sock = socket.create_connection((HOST, rig.proxy.port), timeout=10)
    target = f"http://{authority}/dir/upload"
    if scheme == "https":
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head and (chunk := sock.recv(4096)):
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        tls = ssl.create_default_context(cafile=str(rig.mitm_ca))
        sock = tls.wrap_socket(sock, server_hostname="partly.example")
        target = "/dir/upload"
    sock.sendall(f"POST {target} HTTP/1.1\r\nHost: {authority}\r\n"
                 f"Content-Length: {1 << 30}\r\n\r\n".encode())
    # Read the answer, not up to the FIN: over TLS, OpenSSL refuses to send once it
    # has read a TCP EOF that no close_notify announced (mitmproxy sends none).
    answer = b""
    while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 451"), answer[:300]
    fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    assert fields[b"connection"] == b"close", head
    while len(body) < int(fields[b"content-length"]) and (chunk := sock.recv(65536)):
        body += chunk
    return sock


def _no_crash(proxy: Mitmdump, logged: int) -> None:
    time.sleep(0.2)  # what mitmdump may still log about that connection
    problems = [line for line in proxy.log()[logged:].splitlines()
                if any(word in line for word in _CRASH)]
    assert not problems, proxy.log()[logged:][-3000:]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_lingering_close_after_an_early_answer_is_bounded_in_time(
        rig: Rig, scheme: str) -> None:
    """After the 451 and its half-close the proxy goes on reading what the client
    still sends (so the kernel does not reset a connection whose client has yet to
    read the answer), but a client trickling its body does not hold the connection:
    the proxy closes it after LINGER_SECONDS."""
    from netfilter.proxy.early import LINGER_SECONDS
    logged = len(rig.proxy.log())
    with _answered_upload(rig, scheme) as sock:
        start = time.monotonic()
        with pytest.raises(OSError):  # reset, broken pipe, TLS EOF: closed
            while time.monotonic() - start < LINGER_SECONDS + 10:
                sock.sendall(bytes(1024))
                time.sleep(0.05)
        took = time.monotonic() - start
    assert LINGER_SECONDS - 0.5 < took < LINGER_SECONDS + 3, took
    _no_crash(rig.proxy, logged)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_lingering_close_after_an_early_answer_is_bounded_in_bytes(
        rig: Rig, scheme: str) -> None:
    """A client that sends its body as fast as it can after the 451 is cut off after
    LINGER_BYTES (plus what the sockets buffer), long before LINGER_SECONDS would
    let it send on loopback."""
    from netfilter.proxy.early import LINGER_BYTES
    buffers = 64 << 20  # more than both sockets hold (tcp_wmem + tcp_rmem maxima)
    logged = len(rig.proxy.log())
    sent = 0
    with _answered_upload(rig, scheme) as sock, pytest.raises(OSError):
        while sent < 4 * LINGER_BYTES:
            sock.sendall(bytes(1 << 20))
            sent += 1 << 20
    assert sent < LINGER_BYTES + buffers, sent
    _no_crash(rig.proxy, logged)


def test_clean_upload_still_reaches_the_origin(rig: Rig, upload: Path) -> None:
    before = rig.plain.snapshot()
    result = rig.curl(f"http://partly.example:{rig.plain.port}/public/upload", "-T",
                      str(upload), "-X", "POST", "-H", "Expect:", timeout=60)
    assert result.status == 200, _explain(rig, result)
    assert rig.plain.snapshot() == (before[0] + 1, before[1] + 1)
    assert len(rig.plain.requests[-1].body) == UPLOAD


def test_websocket_upgrade_to_a_blocked_url_is_refused(rig: Rig) -> None:
    before = rig.plain.snapshot()
    result = rig.curl(f"http://partly.example:{rig.plain.port}/dir/socket",
                      "-H", "Connection: Upgrade", "-H", "Upgrade: websocket",
                      "-H", "Sec-WebSocket-Version: 13",
                      "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
    assert result.status == 451, _explain(rig, result)
    assert result.header("content-type").startswith("text/plain")  # type: ignore[union-attr]
    assert rig.plain.snapshot() == before


def test_destination_outside_loopback_is_refused_without_connecting(rig: Rig) -> None:
    result = rig.curl("http://203.0.113.5/")  # TEST-NET-3: refused, never dialled
    assert result.status == 403
    assert "allowed_destinations" in result.text
    tunnel = rig.curl("https://accounts.google.com/")
    assert tunnel.connect_status == 403
    connects = [line for line in rig.proxy.log().splitlines() if "server connect" in line]
    assert not [line for line in connects if "203.0.113.5" in line or "google" in line]


# ---------------------------------------------------------------- HTTPS


def test_https_clean_host_passes_through_untouched(rig: Rig) -> None:
    before = len(rig.secure.requests)
    result = rig.curl(f"https://clean.test:{rig.secure.port}/hello",
                      "--cacert", str(rig.origin_cert))
    assert result.status == 200, _explain(rig, result)
    assert result.text == "hello from the origin: /hello\n"
    # the origin's own certificate reached curl (it trusts only that one)
    assert ISSUER in _issuer_line(result)
    assert "mitmproxy" not in _issuer_line(result)
    assert len(rig.secure.requests) == before + 1


def test_https_host_in_index_is_intercepted_and_blocked_urls_stop_there(rig: Rig) -> None:
    before = rig.secure.snapshot()
    result = rig.curl(f"https://partly.example:{rig.secure.port}/dir/x.html",
                      "--cacert", str(rig.mitm_ca), "-H", "Accept: text/html")
    assert result.status == 451, _explain(rig, result)
    assert "mitmproxy" in _issuer_line(result)
    assert result.header("link") == LINK
    assert "DEMO-0003" in result.text
    # lazy connections: the origin was not even connected to
    assert rig.secure.snapshot() == before
    clean = rig.curl(f"https://partly.example:{rig.secure.port}/gallery/p.html?id=8",
                     "--cacert", str(rig.mitm_ca))
    assert clean.status == 200, _explain(rig, clean)
    assert clean.text == "hello from the origin: /gallery/p.html?id=8\n"
    assert rig.secure.snapshot()[1] == before[1] + 1


@pytest.mark.parametrize(("flag", "version"), [("--http2", "2"), ("--http1.1", "1.1")])
def test_http2_and_http1_on_an_intercepted_host(rig: Rig, flag: str, version: str) -> None:
    before = rig.secure.snapshot()
    blocked = rig.curl(f"https://www.mixed.example:{rig.secure.port}/a/b/page.html",
                       flag, "--cacert", str(rig.mitm_ca))
    assert (blocked.status, blocked.http_version) == (451, version), _explain(rig, blocked)
    assert "DEMO-0005" in blocked.text
    assert rig.secure.snapshot() == before
    clean = rig.curl(f"https://www.mixed.example:{rig.secure.port}/a/b/other.html",
                     flag, "--cacert", str(rig.mitm_ca))
    assert (clean.status, clean.http_version) == (200, version), _explain(rig, clean)


def _urls_on_one_connection(rig: Rig, urls: list[str], *args: str) -> list[str]:
    """curl fetches `urls` in one run (one proxy connection, reused); their codes."""
    outputs = [arg for _ in urls for arg in ("-o", os.devnull)]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(["curl", "-sS", "--proxy", rig.proxy.url, "--max-time", "10",
                           "-w", "%{http_code} %{num_connects}\n", *args, *outputs, *urls],
                          capture_output=True, text=True, timeout=30, check=False, env=env)
    return done.stdout.split("\n")[:-1] if done.returncode == 0 else [done.stderr]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_netfilter_resolve_keeps_keep_alive_connections(rig: Rig, scheme: str) -> None:
    """Routed names reuse their upstream connection: 8 requests on one client
    connection are all answered over one upstream connection (mitmproxy allows 5 open
    per address and client connection: a route applied too late hung the 6th)."""
    origin = rig.plain if scheme == "http" else rig.secure
    # HTTP/1.1 inside the tunnel: mitmproxy gives an HTTP/2 client one upstream HTTP/1
    # connection per request anyway.
    args = () if scheme == "http" else ("--http1.1", "--cacert", str(rig.mitm_ca))
    urls = [f"{scheme}://partly.example:{origin.port}/public/{i}.html" for i in range(8)]
    before, names = origin.snapshot(), len(origin.server_names)
    lines = _urls_on_one_connection(rig, urls, *args)
    # one proxy connection for all (curl counts it on the first request only)
    assert lines == ["200 1"] + ["200 0"] * 7, _explain(rig, CurlResult(0, {}, b"",
                                                                        str(lines), "", 0))
    assert origin.snapshot() == (before[0] + 1, before[1] + 8)
    assert [s.host for s in origin.requests[-8:]] == [f"partly.example:{origin.port}"] * 8
    if scheme == "https":  # the upstream TLS names the host, not the routed address
        assert origin.server_names[names:] == ["partly.example"]


def test_https_domain_block_serves_the_page_over_tls(rig: Rig) -> None:
    before = rig.secure.snapshot()
    result = rig.curl(f"https://blocked.example:{rig.secure.port}/any/where",
                      "--cacert", str(rig.mitm_ca))
    assert result.status == 451, _explain(rig, result)
    assert "DEMO-0001" in result.text
    assert rig.secure.snapshot() == before


def test_sni_other_than_connect_host_is_checked_and_logged(rig: Rig) -> None:
    before = rig.secure.snapshot()
    port = rig.secure.port
    result = rig.curl(f"https://blocked.example:{port}/",
                      "--connect-to", f"blocked.example:{port}:clean.test:{port}",
                      "--cacert", str(rig.mitm_ca))
    assert result.status == 451, _explain(rig, result)
    assert wait_for(lambda: "SNI blocked.example differs from CONNECT clean.test"
                    in rig.proxy.log())
    assert rig.secure.snapshot() == before


def test_blocks_are_audit_events_of_the_proxy(rig: Rig) -> None:
    rig.curl(f"http://partly.example:{rig.plain.port}/gallery/p.html?id=7")

    def recorded() -> list[dict[str, object]]:
        return [e for e in rig.events() if e["type"] == "block" and e["ref"] == "DEMO-0004"]

    assert wait_for(recorded, 10.0), rig.events()
    (event,) = recorded()
    assert event["frontend"] == "proxy"
    assert event["detail"] == "GET"
    assert event["client"] == "127.0.0.0/24"


def test_sighup_reloads_the_lists_while_serving(rig: Rig) -> None:
    """Requests in flight during reloads are all answered, by the old or new lists."""
    loads = sum(1 for e in rig.events() if e["type"] == "list-loaded")
    answers: list[tuple[int, int]] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            clean = rig.curl(f"http://partly.example:{rig.plain.port}/during-reload")
            blocked = rig.curl(f"http://partly.example:{rig.plain.port}/dir/during-reload")
            answers.append((clean.status, blocked.status))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        for _ in range(2):
            time.sleep(0.3)
            rig.proxy.signal(signal.SIGHUP)
        assert wait_for(lambda: rig.proxy.log().count("lists reloaded") >= 2, 10.0), \
            rig.proxy.log()
        time.sleep(0.2)
    finally:
        stop.set()
        worker.join(30)
    assert len(answers) >= 5
    assert set(answers) == {(200, 451)}
    assert wait_for(lambda: sum(1 for e in rig.events() if e["type"] == "list-loaded")
                    >= loads + 2, 10.0)
    assert rig.proxy.proc is not None and rig.proxy.proc.poll() is None


def test_without_a_ca_a_blocked_connect_is_refused_and_nothing_decrypted(
        tmp_path: Path, rig: Rig) -> None:
    confdir = tmp_path / "confdir"
    config = write_config(tmp_path)  # no proxy.confdir: intercept defaults to none
    proxy = Mitmdump(tmp_path, config, confdir).start()
    try:
        curl = Curl(proxy.url, tmp_path)
        before = rig.secure.snapshot()
        refused = curl(f"https://blocked.example:{rig.secure.port}/")
        assert refused.connect_status == 451, refused.stderr
        assert rig.secure.snapshot() == before
        # a host-index name is not decrypted either: the origin's own certificate
        passed = curl(f"https://partly.example:{rig.secure.port}/dir/x",
                      "--cacert", str(rig.origin_cert))
        assert passed.status == 200, passed.stderr
        assert ISSUER in _issuer_line(passed)
    finally:
        proxy.stop()


def test_ipv6_spellings_of_a_listed_ipv4_address_are_blocked(tmp_path: Path,
                                                             rig: Rig) -> None:
    # 127.0.0.1 listed; its IPv4-mapped and NAT64 forms must not reach the origin by
    # a plain request or a CONNECT. The mapped loopback is an allowed destination as
    # such (so before the fix the addon let it through to the origin); NAT64 is not,
    # so nothing is ever dialled off loopback.
    block = tmp_path / "block.yaml"
    block.write_text("entries: [{domain: 127.0.0.1, ref: LOOP-1, category: test}]\n",
                     encoding="utf-8")
    config = write_config(tmp_path, allowed=["127.0.0.0/8", "::ffff:127.0.0.0/104"])
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    settings["local"]["block"] = str(block)
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    proxy = Mitmdump(tmp_path, config, tmp_path / "confdir").start()  # intercept: none
    try:
        curl = Curl(proxy.url, tmp_path)
        plain, secure = rig.plain.snapshot(), rig.secure.snapshot()
        for host in ["[::ffff:127.0.0.1]", "[::FFFF:7F00:1]", "[0:0:0:0:0:ffff:127.0.0.1]",
                     "[64:ff9b::7f00:1]"]:
            result = curl(f"http://{host}:{rig.plain.port}/page", "-g")
            assert result.status == 451, f"{host}: {result.stderr}\n{proxy.log()[-2000:]}"
            assert "LOOP-1" in result.text
            tunnel = curl(f"https://{host}:{rig.secure.port}/", "-g")
            assert tunnel.connect_status == 451, f"{host}: {tunnel.stderr}"
            tunnel = curl(f"http://{host}:{rig.plain.port}/", "-g", "--proxytunnel")
            assert tunnel.connect_status == 451, f"{host}: {tunnel.stderr}"
        assert rig.plain.snapshot() == plain
        assert rig.secure.snapshot() == secure
        assert "server connect" not in proxy.log()
        assert wait_for(lambda: any(e.get("ref") == "LOOP-1"
                                    for e in read_events(tmp_path / "audit.sqlite")))
    finally:
        proxy.stop()


def test_bad_config_stops_mitmdump_with_the_reason(tmp_path: Path) -> None:
    require_tools("curl")
    bad = tmp_path / "bad.yaml"
    bad.write_text("proxy: {intercept: sometimes}\n", encoding="utf-8")
    proxy = Mitmdump(tmp_path, bad, tmp_path / "confdir")
    with pytest.raises(RuntimeError, match="mitmdump exited"):
        proxy.start()
    assert proxy.proc is not None and proxy.proc.returncode != 0
    assert ("OptionsError: netfilter_config: " f"{bad}: proxy.intercept: Input should be "
            "'none', 'selective' or 'all' (got 'sometimes')") in proxy.log()


# ---------------------------------------------------------------- a real browser


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-features=NetworkTimeServiceQuerying",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-bypass-list=<-loopback>", "--window-size=800,600",
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium not installed (Debian: apt-get install chromium); "
                "the browser test needs it")


def _browse(rig: Rig, profile: Path, *args: str) -> str:
    cmd = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
           f"--proxy-server=http://{HOST}:{rig.proxy.port}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    return done.stdout


def test_headless_chromium_shows_the_stop_page(rig: Rig, tmp_path: Path) -> None:
    chromium = _chromium()
    assert chromium
    blocked_url = f"http://partly.example:{rig.plain.port}/dir/index.html"
    before = rig.plain.snapshot()
    dom = _browse(rig, tmp_path / "profile-1", "--dump-dom", blocked_url)
    assert "Demo Blocking Authority" in dom, dom[-2000:]
    assert "DEMO-0003" in dom
    assert rig.plain.snapshot() == before
    screenshot = tmp_path / "blocked.png"
    _browse(rig, tmp_path / "profile-2", f"--screenshot={screenshot}", blocked_url)
    assert screenshot.exists() and screenshot.stat().st_size > 1000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    clean = _browse(rig, tmp_path / "profile-3", "--dump-dom",
                    f"http://clean.test:{rig.plain.port}/welcome.html")
    assert "hello from the origin: /welcome.html" in clean, clean[-2000:]
    seen = [s.path for s in rig.plain.requests[before[1]:]]
    assert "/welcome.html" in seen and "/dir/index.html" not in seen
    # HTTPS on a host in the host index: decrypted with mitmproxy's CA (which this
    # throw-away profile is told to accept), the stop page is served inside TLS
    secure = rig.secure.snapshot()
    tls_dom = _browse(rig, tmp_path / "profile-4", "--ignore-certificate-errors",
                      "--dump-dom", f"https://partly.example:{rig.secure.port}/dir/page.html")
    assert "DEMO-0003" in tls_dom, tls_dom[-2000:]
    assert rig.secure.snapshot() == secure
    # the browser's own background traffic (update and account hosts) was refused by
    # the proxy without connecting: every upstream connection went to loopback
    log = rig.proxy.log()
    connects = [line for line in log.splitlines() if "server connect" in line]
    assert connects and all(f"server connect {HOST}:" in line for line in connects)
