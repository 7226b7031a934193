"""The mitmproxy addon's hooks, called directly with mitmproxy's own test helpers, over
the real engine and the demo bundle (config and audit log in tmp_path)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import ssl
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from netfilter.config import ProxySettings
from netfilter.proxy import (
    DestinationPolicy,
    NetfilterAddon,
    Routes,
    TlsAction,
    early,
    intercept_mode,
    normalize_host,
    parse_destination,
    parse_route,
)
from tests.proxy_support import DEMO_LIST, DEMO_PUB, OPERATOR_URL, read_events, write_config

CLIENT = "192.0.2.10"


# ---------------------------------------------------------------- helpers


@contextmanager
def addon_for(config: Path, **options: Any) -> Iterator[tuple[NetfilterAddon, Any]]:
    addon = NetfilterAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, netfilter_config=str(config), **options)
        try:
            yield addon, tctx
        finally:
            addon.done()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """CA configured (proxy.confdir): intercept defaults to selective."""
    return write_config(tmp_path, confdir=tmp_path / "ca", allowed=[])


@pytest.fixture
def addon(config: Path) -> Iterator[NetfilterAddon]:
    with addon_for(config) as (addon, _):
        yield addon


def client_conn(ip: str = CLIENT) -> connection.Client:
    client = tflow.tclient_conn()
    client.peername = (ip, 50000)
    return client


def request_flow(url: str, method: str = "GET", headers: dict[str, str] | None = None,
                 client: connection.Client | None = None) -> http.HTTPFlow:
    request = http.Request.make(method, url, b"", headers or {})
    return tflow.tflow(req=request, client_conn=client or client_conn())


def tunnel_request(client: connection.Client, host: str, path: str, *, authority: str,
                   headers: dict[str, str] | None = None) -> http.HTTPFlow:
    """A request inside a CONNECT tunnel: mitmproxy sets its host to the tunnel's
    (transparent inner layer), the client's name is in Host/:authority."""
    request = tutils.treq(host=host, port=443, scheme=b"https", authority=b"",
                          path=path.encode(), http_version=b"HTTP/2.0",
                          headers=http.Headers(), content=b"")
    request.authority = authority
    for name, value in (headers or {}).items():
        request.headers[name] = value
    return tflow.tflow(req=request, client_conn=client)


def connect_flow(host: str, port: int = 443,
                 client: connection.Client | None = None) -> http.HTTPFlow:
    request = tutils.treq(method=b"CONNECT", host=host, port=port, scheme=b"",
                          authority=f"{host}:{port}".encode(), path=b"",
                          headers=http.Headers(), content=b"")
    return tflow.tflow(req=request, client_conn=client or client_conn())


def client_hello(sni: str | None) -> tls.ClientHello:
    """A real ClientHello from Python's ssl, parsed the way mitmproxy parses one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    parsed = parse_client_hello(outgoing.read())
    assert parsed is not None
    return parsed


def hello_data(client: connection.Client, sni: str | None,
               address: tuple[str, int] | None) -> tls.ClientHelloData:
    """What mitmproxy hands `tls_clienthello`: the connection context (the server
    address is the CONNECT target, or the original destination when transparent)."""
    context = Context(client, ctx.options)
    context.server = connection.Server(address=address)
    return tls.ClientHelloData(context, client_hello(sni))


def server_data(client: connection.Client, address: tuple[str, int]
                ) -> server_hooks.ServerConnectionHookData:
    return server_hooks.ServerConnectionHookData(server=connection.Server(address=address),
                                                 client=client)


def events(addon: NetfilterAddon, tmp: Path) -> list[dict[str, Any]]:
    assert addon.runtime is not None
    addon.runtime.engine.sink.flush()  # type: ignore[attr-defined]
    return read_events(tmp / "audit.sqlite")


def blocks(addon: NetfilterAddon, tmp: Path) -> list[dict[str, Any]]:
    return [e for e in events(addon, tmp) if e["type"] == "block"]


def status(flow: http.HTTPFlow) -> int | None:
    return flow.response.status_code if flow.response else None


# ---------------------------------------------------------------- plain HTTP


def test_url_level_block_gets_the_stop_page(addon: NetfilterAddon, tmp_path: Path) -> None:
    flow = request_flow("http://partly.example/dir/secret.html",
                        headers={"Accept": "text/html", "Accept-Language": "de"})
    addon.requestheaders(flow)
    assert flow.response is not None
    assert flow.response.status_code == 451
    assert flow.response.reason == "Unavailable For Legal Reasons"
    assert flow.response.headers["content-type"].startswith("text/html")
    assert flow.response.headers["link"] == f'<{OPERATOR_URL}>; rel="blocked-by"'
    assert flow.response.headers["cache-control"] == "no-store"
    assert flow.response.headers["content-language"] == "de"
    assert b"DEMO-0003" in flow.response.content
    assert b"Demo-Sperrbeh" in flow.response.content
    (event,) = blocks(addon, tmp_path)
    assert event["frontend"] == "proxy"
    assert event["ref"] == "DEMO-0003"
    assert event["detail"] == "GET"
    assert event["client"] == "192.0.2.0/24"  # audit.client: truncated


@pytest.mark.parametrize("url", [
    "http://partly.example/",
    "http://partly.example/dirt/x",
    "http://partly.example/gallery/p.html?id=8",
    "http://www.mixed.example/a/b/other.html",
    "http://clean.test/dir/",
])
def test_clean_urls_pass(addon: NetfilterAddon, tmp_path: Path, url: str) -> None:
    flow = request_flow(url)
    addon.requestheaders(flow)
    assert flow.response is None
    assert blocks(addon, tmp_path) == []


@pytest.mark.parametrize(("url", "ref"), [
    ("http://partly.example/gallery/p.html?id=7", "DEMO-0004"),
    ("http://partly.example:8080/dir/sub/x.jpg", "DEMO-0003"),
    ("http://WWW.Mixed.Example/a/b/page.html", "DEMO-0005"),
    ("http://blocked.example/", "DEMO-0001"),  # domain-level: every path, every subdomain
    ("http://deep.www.blocked.example/any/thing?x=1", "DEMO-0001"),
    ("http://192.0.2.66/", "DEMO-0006"),
    ("http://198.51.100.7/files/a.zip", "DEMO-0007"),
])
def test_url_and_domain_level_blocks(addon: NetfilterAddon, url: str, ref: str) -> None:
    flow = request_flow(url)
    addon.requestheaders(flow)
    assert status(flow) == 451
    assert ref.encode() in flow.response.content  # type: ignore[union-attr]


def test_local_exception_lifts_a_domain_block(addon: NetfilterAddon, tmp_path: Path) -> None:
    flow = request_flow("http://cleared.blocked.example/page")
    addon.requestheaders(flow)
    assert flow.response is None
    assert [e["type"] for e in events(addon, tmp_path)].count("override") == 1


def test_host_header_is_checked_besides_the_address(addon: NetfilterAddon) -> None:
    """An absolute-form request to a clean address with a blocked Host: blocked."""
    flow = request_flow("http://127.0.0.1:8000/dir/x")
    flow.request.headers["Host"] = "partly.example"
    addon.requestheaders(flow)
    assert status(flow) == 451
    flow = request_flow("http://partly.example/dir/x")
    flow.request.headers["Host"] = "clean.test"
    addon.requestheaders(flow)
    assert status(flow) == 451


def test_two_host_headers_are_refused(addon: NetfilterAddon, tmp_path: Path) -> None:
    """An origin and the proxy might each read another of them: 400, nothing checked."""
    flow = request_flow("http://clean.test/dir/x")
    flow.request.headers.add("Host", "clean.test")
    flow.request.headers.add("Host", "partly.example")
    addon.requestheaders(flow)
    assert status(flow) == 400
    assert flow.response is not None and b"more than one Host" in flow.response.content
    assert blocks(addon, tmp_path) == []


NAMES = ["clean.test", "partly.example", "127.0.0.1", "PARTLY.example:8080"]


def test_target_cache_never_changes_a_decision(config: Path) -> None:
    """The per-origin cache is keyed on mitmproxy's raw fields (version, :authority,
    Host, address): whatever came before, each request gets the answer it gets from an
    addon with an empty cache."""
    with addon_for(config) as (addon, _):

        def answer(request: http.Request) -> int | None:
            flow = tflow.tflow(req=request.copy(), client_conn=client_conn())
            addon.requestheaders(flow)
            return status(flow)

        def make(version: bytes, authority: str, header: str | None, host: str,
                 port: int) -> http.Request:
            request = tutils.treq(host=host.partition(":")[0], port=port, scheme=b"http",
                                  authority=authority.encode(), path=b"/dir/x",
                                  http_version=version, headers=http.Headers(), content=b"")
            if header is not None:
                request.headers["Host"] = header
            return request

        requests = st.builds(make, st.sampled_from([b"HTTP/1.1", b"HTTP/2.0"]),
                             st.sampled_from(["", *NAMES]), st.sampled_from([None, *NAMES]),
                             st.sampled_from(NAMES), st.sampled_from([80, 8080]))

        @settings(max_examples=500, deadline=None, database=None)
        @given(st.lists(requests, min_size=2, max_size=8))
        @example([make(b"HTTP/1.1", "", "partly.example", "clean.test", 80),
                  make(b"HTTP/1.1", "", "clean.test", "clean.test", 80)])
        @example([make(b"HTTP/1.1", "partly.example", "clean.test", "clean.test", 80),
                  make(b"HTTP/2.0", "partly.example", "clean.test", "clean.test", 80)])
        def check(sequence: list[http.Request]) -> None:
            addon._targets.clear()
            cached = [answer(r) for r in sequence]  # each after the ones before it
            fresh = []
            for request in sequence:
                addon._targets.clear()
                fresh.append(answer(request))
            assert cached == fresh

        check()


@pytest.mark.parametrize(("accept", "dest", "html"), [
    ("text/html,application/xhtml+xml,*/*;q=0.8", "document", True),
    (None, None, True),
    ("*/*", "iframe", True),
    ("image/avif,image/webp,*/*;q=0.8", "image", False),
    ("*/*", "script", False),
    ("application/json", None, False),
    ("*/*", "empty", False),
])
def test_accept_and_sec_fetch_dest_choose_html_or_text(
        addon: NetfilterAddon, accept: str | None, dest: str | None, html: bool) -> None:
    headers = {k: v for k, v in (("Accept", accept), ("Sec-Fetch-Dest", dest)) if v}
    flow = request_flow("http://blocked.example/x", headers=headers)
    addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 451
    kind = "text/html" if html else "text/plain"
    assert flow.response.headers["content-type"].startswith(kind)
    assert b"DEMO-0001" in flow.response.content


def test_head_gets_headers_only(addon: NetfilterAddon) -> None:
    flow = request_flow("http://blocked.example/x", method="HEAD")
    addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 451
    assert flow.response.raw_content == b""
    assert int(flow.response.headers["content-length"]) > 0


def test_websocket_upgrade_to_a_blocked_url_is_refused(addon: NetfilterAddon) -> None:
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    flow = request_flow("http://partly.example/dir/socket", headers=upgrade)
    addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 451
    assert flow.response.headers["content-type"].startswith("text/plain")
    clean = request_flow("http://partly.example/chat", headers=upgrade)
    addon.requestheaders(clean)
    assert clean.response is None


class _BodyTripwire(http.Request):
    """A request whose body must not be touched (raises if anything reads it)."""

    def _trip(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the request body was read")

    content = property(_trip)  # type: ignore[assignment]
    raw_content = property(_trip)  # type: ignore[assignment]
    text = property(_trip)  # type: ignore[assignment]
    get_content = _trip  # type: ignore[assignment]
    get_text = _trip  # type: ignore[assignment]


def test_blocked_request_body_is_never_read_and_streaming_is_switched_off(
        addon: NetfilterAddon) -> None:
    flow = request_flow("http://partly.example/dir/upload", method="POST",
                        headers={"Content-Length": "10485760"})
    flow.request.stream = True  # what stream_large_bodies decides before the hook
    flow.request.__class__ = _BodyTripwire
    addon.requestheaders(flow)
    assert status(flow) == 451
    assert flow.request.stream is False
    # answered right after this hook, before the body (early.py; e2e tests show it)
    assert early.installed()
    assert flow.metadata.get("netfilter_answer_now") is True


def test_early_answers_install_once_and_only_over_mitmproxy_s_own_stream() -> None:
    from mitmproxy.proxy.layers import http as layers_http

    assert early.install() and early.install()
    assert layers_http.HttpStream is early.EarlyAnswerStream
    layers_http.HttpStream = type("Other", (early.EarlyAnswerStream,), {})  # type: ignore[misc]
    try:
        assert not early.install()  # someone else's class is left alone
        assert not early.installed()
    finally:
        layers_http.HttpStream = early.EarlyAnswerStream  # type: ignore[misc]


def test_answered_flows_are_left_alone(addon: NetfilterAddon) -> None:
    flow = request_flow("http://blocked.example/")
    flow.response = http.Response.make(204)
    addon.requestheaders(flow)
    assert status(flow) == 204


# ---------------------------------------------------------------- CONNECT and TLS


@pytest.mark.parametrize(("ca", "intercept", "host", "answer", "action"), [
    # CA configured: intercept defaults to selective
    (True, None, "blocked.example", None, TlsAction.BLOCK),  # stop page served inside TLS
    (True, None, "partly.example", None, TlsAction.INTERCEPT),
    (True, None, "clean.test", None, TlsAction.PASS),
    # no CA: intercept defaults to none; a domain block is refused at CONNECT
    (False, None, "blocked.example", 451, None),
    (False, None, "partly.example", None, TlsAction.PASS),
    (False, None, "clean.test", None, TlsAction.PASS),
    # explicit modes
    (True, "none", "blocked.example", 451, None),
    (True, "none", "partly.example", None, TlsAction.PASS),
    (True, "all", "clean.test", None, TlsAction.INTERCEPT),
    (True, "all", "blocked.example", None, TlsAction.BLOCK),
    (False, "selective", "partly.example", None, TlsAction.INTERCEPT),  # mitmproxy's CA
])
def test_connect_decisions(tmp_path: Path, ca: bool, intercept: str | None, host: str,
                           answer: int | None, action: TlsAction | None) -> None:
    config = write_config(tmp_path, confdir=tmp_path / "ca" if ca else None,
                          intercept=intercept, allowed=[])
    with addon_for(config) as (addon, _):
        flow = connect_flow(host)
        addon.http_connect(flow)
        assert status(flow) == answer
        state = addon.conns.get(flow.client_conn.id)
        if action is None:
            assert state is None
            assert flow.response is not None
            assert b"DEMO-0001" in flow.response.content
            assert flow.response.headers["content-type"].startswith("text/plain")
        else:
            assert state is not None and state.decision is not None
            assert state.decision.action is action
        blocked = blocks(addon, tmp_path)
        assert len(blocked) == (1 if host == "blocked.example" else 0)
        if blocked:
            assert blocked[0]["detail"] == "CONNECT"
            assert blocked[0]["frontend"] == "proxy"


def test_intercept_mode_defaults() -> None:
    assert intercept_mode(ProxySettings()) == "none"
    assert intercept_mode(ProxySettings(confdir=Path("ca"))) == "selective"
    assert intercept_mode(ProxySettings(intercept="selective")) == "selective"
    assert intercept_mode(ProxySettings(confdir=Path("ca"), intercept="none")) == "none"


@pytest.mark.parametrize(("host", "ignored"), [
    ("clean.test", True),  # passed through: never decrypted
    ("partly.example", False),  # host index: decrypted, URLs checked
    ("blocked.example", False),  # domain block with a CA: decrypted for the stop page
])
def test_tls_clienthello_after_connect(addon: NetfilterAddon, host: str,
                                       ignored: bool) -> None:
    client = client_conn()
    addon.http_connect(connect_flow(host, client=client))
    data = hello_data(client, host, (host, 443))
    addon.tls_clienthello(data)
    assert data.ignore_connection is ignored
    assert data.establish_server_tls_first is False
    assert addon.conns[client.id].intercepted is (not ignored)


def test_domain_block_inside_tls_serves_the_page_once_recorded(
        addon: NetfilterAddon, tmp_path: Path) -> None:
    client = client_conn()
    addon.http_connect(connect_flow("blocked.example", client=client))
    addon.tls_clienthello(hello_data(client, "blocked.example", ("blocked.example", 443)))
    for path in ("/", "/favicon.ico"):
        flow = tunnel_request(client, "blocked.example", path, authority="blocked.example",
                              headers={"accept": "text/html"})
        addon.requestheaders(flow)
        assert status(flow) == 451
        assert b"DEMO-0001" in flow.response.content  # type: ignore[union-attr]
    # one event for the blocked connection (at CONNECT), not one per page element
    assert len(blocks(addon, tmp_path)) == 1
    # and the upstream is never opened for it
    data = server_data(client, ("blocked.example", 443))
    addon.server_connect(data)
    assert data.server.error and "blocked" in data.server.error


def test_intercepted_host_checks_full_urls(addon: NetfilterAddon) -> None:
    client = client_conn()
    addon.http_connect(connect_flow("partly.example", client=client))
    addon.tls_clienthello(hello_data(client, "partly.example", ("partly.example", 443)))
    blocked = tunnel_request(client, "partly.example", "/gallery/p.html?id=7",
                             authority="partly.example")
    addon.requestheaders(blocked)
    assert status(blocked) == 451
    clean = tunnel_request(client, "partly.example", "/gallery/p.html?id=8",
                           authority="partly.example:443")
    addon.requestheaders(clean)
    assert clean.response is None
    data = server_data(client, ("partly.example", 443))
    addon.server_connect(data)
    assert data.server.error is None


def test_sni_differing_from_connect_is_logged_and_checked(
        addon: NetfilterAddon, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = client_conn()
    addon.http_connect(connect_flow("clean.test", client=client))
    data = hello_data(client, "blocked.example", ("clean.test", 443))
    with caplog.at_level(logging.WARNING, logger="netfilter.proxy"):
        addon.tls_clienthello(data)
    assert "SNI blocked.example differs from CONNECT clean.test" in caplog.text
    assert data.ignore_connection is False  # intercepted for the stop page
    state = addon.conns[client.id]
    assert state.decision is not None and state.decision.action is TlsAction.BLOCK
    assert [e["detail"] for e in blocks(addon, tmp_path)] == ["TLS"]
    flow = tunnel_request(client, "clean.test", "/", authority="blocked.example")
    addon.requestheaders(flow)
    assert status(flow) == 451


def test_sni_block_without_ca_closes_the_connection(tmp_path: Path) -> None:
    config = write_config(tmp_path, allowed=[])  # no CA: intercept none
    with addon_for(config) as (addon, _):
        client = client_conn()
        addon.http_connect(connect_flow("clean.test", client=client))
        data = hello_data(client, "blocked.example", ("clean.test", 443))
        addon.tls_clienthello(data)
        assert data.ignore_connection is True
        assert addon.conns[client.id].refused
        server = server_data(client, ("clean.test", 443))
        addon.server_connect(server)
        assert server.server.error  # nothing relayed: the client is disconnected


@pytest.mark.parametrize(("sni", "address", "ignored", "refused"), [
    ("clean.test", ("127.0.0.1", 443), True, False),
    ("partly.example", ("127.0.0.1", 443), False, False),
    ("blocked.example", ("127.0.0.1", 443), False, False),
    (None, ("192.0.2.66", 443), False, False),  # no SNI: the address is checked
])
def test_transparent_mode_decides_by_sni_and_address(
        addon: NetfilterAddon, sni: str | None, address: tuple[str, int], ignored: bool,
        refused: bool) -> None:
    client = client_conn()
    client.proxy_mode = ProxyMode.parse("transparent")
    data = hello_data(client, sni, address)
    addon.tls_clienthello(data)
    assert data.ignore_connection is ignored
    assert addon.conns[client.id].refused is refused


def test_coalesced_request_for_another_decision_gets_421(addon: NetfilterAddon) -> None:
    client = client_conn()
    addon.http_connect(connect_flow("partly.example", client=client))
    addon.tls_clienthello(hello_data(client, "partly.example", ("partly.example", 443)))
    # clean.test would be passed through untouched on a connection of its own
    other = tunnel_request(client, "partly.example", "/", authority="clean.test")
    addon.requestheaders(other)
    assert status(other) == 421
    assert other.response is not None
    assert b"clean.test" in other.response.content
    # a domain-blocked name gets its own connection (and its page there) too
    blocked = tunnel_request(client, "partly.example", "/", authority="blocked.example")
    addon.requestheaders(blocked)
    assert status(blocked) == 421
    # another host-index name shares the decision: its URLs are checked right here
    same = tunnel_request(client, "partly.example", "/a/b/page.html",
                          authority="www.mixed.example")
    addon.requestheaders(same)
    assert status(same) == 451
    fine = tunnel_request(client, "partly.example", "/a/b/", authority="www.mixed.example")
    addon.requestheaders(fine)
    assert fine.response is None


def test_coalescing_onto_a_blocked_connection(addon: NetfilterAddon) -> None:
    client = client_conn()
    addon.http_connect(connect_flow("blocked.example", client=client))
    addon.tls_clienthello(hello_data(client, "blocked.example", ("blocked.example", 443)))
    other = tunnel_request(client, "blocked.example", "/", authority="partly.example")
    addon.requestheaders(other)
    assert status(other) == 421
    also_blocked = tunnel_request(client, "blocked.example", "/", authority="192.0.2.66")
    addon.requestheaders(also_blocked)
    assert status(also_blocked) == 451
    assert b"DEMO-0006" in also_blocked.response.content  # type: ignore[union-attr]


def test_disconnect_forgets_the_connection(addon: NetfilterAddon) -> None:
    client = client_conn()
    addon.http_connect(connect_flow("partly.example", client=client))
    assert client.id in addon.conns
    addon.client_disconnected(client)
    assert client.id not in addon.conns


# ---------------------------------------------------------------- destinations


@pytest.fixture
def fenced(tmp_path: Path) -> Iterator[NetfilterAddon]:
    config = write_config(tmp_path, confdir=tmp_path / "ca",
                          allowed=["127.0.0.0/8", "::1", "*.internal.test"])
    with addon_for(config, netfilter_resolve=["*.example=127.0.0.1", "far.test=192.0.2.1"]
                   ) as (addon, _):
        yield addon


@pytest.mark.parametrize(("url", "answer"), [
    ("http://203.0.113.5/", 403),
    ("http://clean.test/", 403),  # a name outside the patterns, not routed
    ("http://far.test/", 403),  # routed, but outside the CIDRs
    ("http://127.0.0.1:8000/", None),
    ("http://[::1]:8000/", None),
    ("http://www.internal.test/", None),
    ("http://internal.test/", 403),  # *.internal.test: below it only
    ("http://partly.example/ok", None),  # routed to 127.0.0.1
    ("http://partly.example/dir/x", 451),  # a block is answered even where not allowed
    ("http://blocked.test/", 451),
])
def test_allowed_destinations_for_requests(fenced: NetfilterAddon, url: str,
                                           answer: int | None) -> None:
    flow = request_flow(url)
    fenced.requestheaders(flow)
    assert status(flow) == answer
    if answer == 403:
        assert flow.response is not None
        assert b"allowed_destinations" in flow.response.content


def test_allowed_destinations_for_connect_and_connections(fenced: NetfilterAddon) -> None:
    refused = connect_flow("accounts.google.com")
    fenced.http_connect(refused)
    assert status(refused) == 403
    client = client_conn()
    fine = connect_flow("clean.example", 8443, client=client)
    fenced.http_connect(fine)
    assert fine.response is None
    data = server_data(client, ("clean.example", 8443))
    fenced.server_connect(data)
    assert data.server.error is None
    assert data.server.address == ("127.0.0.1", 8443)  # netfilter_resolve
    far = server_data(client_conn(), ("198.51.100.1", 443))
    fenced.server_connect(far)
    assert far.server.error and "allowed_destinations" in far.server.error


def test_request_hook_routes_the_address_only(fenced: NetfilterAddon) -> None:
    """netfilter_resolve for HTTP is applied in `request`, before mitmproxy picks the
    upstream connection: the address changes, the Host header stays."""
    client = client_conn()
    unrouted = request_flow("http://www.internal.test:8080/ok", client=client)
    fenced.request(unrouted)
    assert unrouted.request.host == "www.internal.test"
    plain = request_flow("http://partly.example:8080/ok", client=client,
                         headers={"Host": "partly.example:8080"})
    fenced.requestheaders(plain)
    fenced.request(plain)
    assert (plain.request.host, plain.request.port) == ("127.0.0.1", 8080)
    assert plain.request.headers["Host"] == "partly.example:8080"
    data = server_data(client, ("127.0.0.1", 8080))
    fenced.server_connect(data)
    assert data.server.error is None and data.server.address == ("127.0.0.1", 8080)


def test_routed_address_outside_the_cidrs_and_sni(tmp_path: Path) -> None:
    config = write_config(tmp_path, confdir=tmp_path / "ca", allowed=["*.internal.test"])
    with addon_for(config, netfilter_resolve=["*.internal.test=192.0.2.7"]) as (addon, _):
        client = client_conn()
        flow = tunnel_request(client, "www.internal.test", "/x", authority="www.internal.test")
        addon.requestheaders(flow)
        assert flow.response is None  # allowed by name
        addon.request(flow)
        assert flow.request.host == "192.0.2.7"
        assert flow.request.authority == "www.internal.test"
        data = server_data(client, ("192.0.2.7", 443))
        data.server.sni = "192.0.2.7"  # what mitmproxy derives from the address
        addon.server_connect(data)
        assert data.server.error is None
        assert data.server.sni == "www.internal.test"
        # the same address asked for directly, or by another client: not routed here
        direct = server_data(client_conn(), ("192.0.2.7", 443))
        addon.server_connect(direct)
        assert direct.server.error and "allowed_destinations" in direct.server.error
        refused = request_flow("http://192.0.2.7/", client=client_conn())
        addon.requestheaders(refused)
        assert status(refused) == 403
        addon.request(refused)
        assert refused.request.host == "192.0.2.7"


def test_answered_requests_are_not_routed(fenced: NetfilterAddon) -> None:
    flow = request_flow("http://partly.example/dir/x")
    fenced.requestheaders(flow)
    assert status(flow) == 451
    fenced.request(flow)
    assert flow.request.host == "partly.example"


def test_cached_targets_follow_a_new_config(tmp_path: Path) -> None:
    """Requests to one name are decided from a cache; a new config or new routes
    must not be answered from the old one."""
    config = write_config(tmp_path, allowed=["127.0.0.0/8"])
    with addon_for(config) as (addon, tctx):
        url = "http://www.internal.test/page"
        for _ in range(2):
            flow = request_flow(url)
            addon.requestheaders(flow)
            assert status(flow) == 403
        tctx.configure(addon, netfilter_resolve=["*.internal.test=127.0.0.1"])
        routed = request_flow(url)
        addon.requestheaders(routed)
        assert routed.response is None
        tctx.configure(addon, netfilter_resolve=[])
        again = request_flow(url)
        addon.requestheaders(again)
        assert status(again) == 403
        other = write_config(tmp_path, allowed=["*.internal.test"], name="other.yaml")
        tctx.configure(addon, netfilter_config=str(other))
        now = request_flow(url)
        addon.requestheaders(now)
        assert now.response is None


@pytest.mark.parametrize(("spec", "message"), [
    ("", "empty"),
    ("10.0.0.0/33", "not a valid CIDR"),
    ("300.1.2.3", "not a valid CIDR"),
    ("exa mple.test", "neither a CIDR nor a host name"),
    ("*", "neither a CIDR nor a host name"),
    ("a.*.test", "neither a CIDR nor a host name"),
])
def test_parse_destination_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_destination(spec)


def test_destination_policy() -> None:
    policy = DestinationPolicy.parse(["127.0.0.0/8", "2001:db8::/32", "*.test", "localhost"])
    assert policy.restricted
    for host in ("127.0.0.1", "127.9.9.9", "2001:db8::1", "[2001:db8::2]", "a.test",
                 "A.B.Test.", "localhost"):
        assert policy.allows(host), host
    for host in ("128.0.0.1", "::1", "test", "a.test.example", "localhost.example"):
        assert not policy.allows(host), host
    assert DestinationPolicy.parse([]).allows("anything.example")


def test_routes() -> None:
    routes = Routes.parse(["*.example=127.0.0.1", "exact.test=::1"])
    assert routes.lookup("A.Partly.Example.") == "127.0.0.1"
    assert routes.lookup("example") is None
    assert routes.lookup("exact.test") == "::1"
    assert routes.lookup("sub.exact.test") is None
    with pytest.raises(ValueError, match="not NAME=ADDRESS"):
        parse_route("partly.example")
    with pytest.raises(ValueError, match="not an IP address"):
        parse_route("partly.example=localhost")
    assert normalize_host("[::1]") == "::1"


# ---------------------------------------------------------------- configuration


def test_configure_requires_lazy_connections_and_uses_the_configured_ca(
        config: Path, tmp_path: Path) -> None:
    addon = NetfilterAddon()
    with taddons.context(Proxyserver(), addon) as tctx:
        tctx.configure(addon, netfilter_config=str(config))
        assert tctx.options.connection_strategy == "lazy"
        assert os.path.abspath(tctx.options.confdir) == str(tmp_path / "ca")
        tctx.options.update(connection_strategy="eager")
        assert tctx.options.connection_strategy == "lazy"
        addon.done()


@pytest.mark.parametrize(("text", "message"), [
    ("proxy: {intercept: sometimes}\n", "proxy.intercept"),
    ("proxy: {allowed_destinations: ['10.0.0.0/33']}\n", "allowed_destinations"),
    ("lists: [{path: missing.nfl, trust: [missing.pub]}]\n", "missing"),
    ("proxy: {listen: nowhere}\n", "proxy.listen"),
    ("[1, 2]\n", "expected a mapping"),
])
def test_bad_config_is_an_options_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    addon = NetfilterAddon()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="netfilter_config") as info:
            tctx.configure(addon, netfilter_config=str(path))
        assert message in str(info.value)
        assert addon.runtime is None
        # fail closed: nothing passes, nothing is connected
        flow = request_flow("http://clean.test/")
        addon.requestheaders(flow)
        assert status(flow) == 503
        connect = connect_flow("clean.test")
        addon.http_connect(connect)
        assert status(connect) == 503
        data = server_data(client_conn(), ("127.0.0.1", 80))
        addon.server_connect(data)
        assert data.server.error


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    addon = NetfilterAddon()
    with taddons.context(addon) as tctx, pytest.raises(exceptions.OptionsError,
                                                       match="netfilter_config: .*nope.yaml"):
        tctx.configure(addon, netfilter_config=str(tmp_path / "nope.yaml"))


def test_bad_resolve_option(config: Path) -> None:
    addon = NetfilterAddon()
    with taddons.context(addon) as tctx, pytest.raises(exceptions.OptionsError,
                                                       match="netfilter_resolve"):
        tctx.configure(addon, netfilter_resolve=["partly.example=nowhere"])


def test_a_bad_new_config_keeps_the_one_in_force(config: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("proxy: {intercept: sometimes}\n", encoding="utf-8")
    with addon_for(config) as (addon, tctx):
        before = addon.runtime
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, netfilter_config=str(bad))
        assert tctx.options.netfilter_config == str(config)
        assert addon.runtime is not None and addon.runtime.path == str(config)
        assert addon.runtime.engine is before.engine  # type: ignore[union-attr]
        flow = request_flow("http://blocked.example/")
        addon.requestheaders(flow)
        assert status(flow) == 451


def test_reload_without_restart(tmp_path: Path) -> None:
    """Setting the option again reloads when a list file changed; the command (and
    SIGHUP) always reloads; checks keep working throughout."""
    bundle = tmp_path / "demo.nfl"
    shutil.copy(DEMO_LIST, bundle)
    config = write_config(tmp_path, allowed=[])
    text = config.read_text(encoding="utf-8").replace(str(DEMO_LIST), str(bundle))
    config.write_text(text, encoding="utf-8")
    assert str(DEMO_PUB) in text

    def loads() -> int:
        return [e["type"] for e in events(addon, tmp_path)].count("list-loaded")

    with addon_for(config) as (addon, tctx):
        engine = addon.runtime.engine  # type: ignore[union-attr]
        assert loads() == 1
        tctx.configure(addon, netfilter_config=str(config))  # nothing changed on disk
        assert loads() == 1
        os.utime(bundle, ns=(1, 1))
        tctx.configure(addon, netfilter_config=str(config))
        assert loads() == 2
        addon.reload_lists()  # what SIGHUP and `netfilter.reload` run
        assert loads() == 3
        assert addon.runtime.engine is engine  # type: ignore[union-attr]
        flow = request_flow("http://partly.example/dir/x")
        addon.requestheaders(flow)
        assert status(flow) == 451
        # the audit log changes only with a restart: the engine in force stays
        config.write_text(text.replace("client: truncated", "client: none"), encoding="utf-8")
        addon.reload_lists()
        assert addon.runtime is not None and addon.runtime.engine is engine
        # a changed config (not only the lists) builds a new engine
        config.write_text(text.replace("Test School IT", "Other School IT"), encoding="utf-8")
        addon.reload_lists()
        assert addon.runtime is not None and addon.runtime.engine is not engine


def test_a_reload_asked_for_during_a_reload_is_not_dropped(tmp_path: Path) -> None:
    """SIGHUP twice in a row (an update installed while the last reload ran): the
    second may come after the first read the files, so a second reload follows."""
    config = write_config(tmp_path, allowed=[])

    def loads(proxy: NetfilterAddon) -> int:
        return [e["type"] for e in events(proxy, tmp_path)].count("list-loaded")

    async def twice(proxy: NetfilterAddon) -> None:
        proxy._loop = asyncio.get_running_loop()  # as running() sets it under mitmdump
        proxy.reload_lists()  # off the loop, in the executor
        proxy.reload_lists()  # while the first has not reported back
        for _ in range(200):  # bounded: 10 s
            if loads(proxy) == 3 and proxy._reloading is not None and proxy._reloading.done():
                break
            await asyncio.sleep(0.05)

    with addon_for(config) as (proxy, _):
        assert loads(proxy) == 1
        asyncio.run(twice(proxy))
        assert loads(proxy) == 3  # the start, then both reloads


def test_what_a_reload_froze_is_collected_at_the_next(tmp_path: Path) -> None:
    """A reload freezes what is alive (gc.freeze); a flow in flight then, in a
    reference cycle, must still be collected once it is dead: the next reload
    collects what earlier freezes kept (the soak saw memory grow per update)."""
    config = write_config(tmp_path, allowed=[])

    class InFlight:
        """Stands for a flow: cyclic, as mitmproxy's flows and connections are."""

        def __init__(self) -> None:
            self.me = self

    async def reload_once(proxy: NetfilterAddon) -> None:
        proxy._loop = asyncio.get_running_loop()
        proxy.reload_lists()
        for _ in range(200):  # bounded: 10 s
            await asyncio.sleep(0.05)
            if proxy._reloading is not None and proxy._reloading.done():
                await asyncio.sleep(0.05)  # its done callback (the freeze) has run
                return

    try:
        with addon_for(config) as (proxy, _):
            flow = InFlight()
            alive = weakref.ref(flow)
            asyncio.run(reload_once(proxy))  # frozen while in flight
            del flow  # the flow ends; only its own cycle holds it
            asyncio.run(reload_once(proxy))
            assert alive() is None, "a dead cycle frozen at a reload is never collected"
    finally:
        gc.unfreeze()  # leave the test process's collector as it was


def test_unset_config_refuses_everything(config: Path) -> None:
    with addon_for(config) as (addon, tctx):
        tctx.configure(addon, netfilter_config="")
        assert addon.runtime is None
        flow = request_flow("http://clean.test/")
        addon.requestheaders(flow)
        assert status(flow) == 503


def test_script_file_loads_the_addon(config: Path) -> None:
    """`mitmdump -s addons/netfilter_proxy.py` finds one NetfilterAddon with the option."""
    from tests.proxy_support import ADDON

    with taddons.context() as tctx:
        script = tctx.script(str(ADDON))
        (addon,) = script.addons
        assert type(addon).__name__ == "NetfilterAddon"
        assert "netfilter_config" in tctx.options
        # a script's addons are configured through mitmproxy's script loader
        tctx.options.update(netfilter_config=str(config))
        addon.configure({"netfilter_config"})
        flow = request_flow("http://blocked.example/")
        addon.requestheaders(flow)
        assert status(flow) == 451
        addon.done()


@pytest.mark.parametrize("name", ["netfilter.proxy", "netfilter.proxy.addon",
                                  "netfilter.proxy.decisions", "netfilter.proxy.destinations",
                                  "netfilter.proxy.replies", "netfilter.proxy.early"])
def test_all_names_exist(name: str) -> None:
    import importlib

    module = importlib.import_module(name)
    assert module.__all__
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.{attr}"


def test_request_hook_only_while_there_are_routes(tmp_path: Path,
                                                   fenced: NetfilterAddon) -> None:
    """mitmproxy calls every hook an addon has on every request: without
    netfilter_resolve routes the addon has no `request` hook at all."""
    with addon_for(write_config(tmp_path)) as (plain, _):
        assert plain.request is None
    assert callable(fenced.request)


def test_running_and_a_new_config_freeze_what_is_loaded(config: Path, tmp_path: Path) -> None:
    """Once running, and after a config set while running, the loaded engine and lists
    are out of the cyclic collector's way (its full collections would walk them again
    and again under load)."""
    import asyncio
    import gc

    with addon_for(config) as (addon, tctx):

        async def start() -> None:
            addon.running()

        gc.unfreeze()
        try:
            asyncio.run(start())
            assert gc.get_freeze_count() > 0
            gc.unfreeze()
            other = write_config(tmp_path, allowed=["*.internal.test"], name="other.yaml")
            tctx.configure(addon, netfilter_config=str(other))
            assert gc.get_freeze_count() > 0
        finally:
            gc.unfreeze()
            addon._loop = None
