"""DNS over HTTPS (RFC 8484): `netfilter serve dns` with a DoH listener, in front of a
real unbound, asked by real clients on loopback: kdig +https (HTTP/2, POST and GET),
httpx (HTTP/1.1 and HTTP/2, GET and POST), dnspython's own DoH client (dns.query.https,
in a venv of its own: its httpx2 cannot live beside mitmproxy 11.0), h2 and http.client
for the requests a DNS client would not send.

Blocked names get the answer UDP gives, Extended DNS Error included; a bad request gets
a plain HTTP error (400, 404, 405, 413, 415) and the connection and server go on; the
TCP listener's limits hold per client; HTTP/2 advertises its stream cap.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import re
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
import yaml

from tests.dns_support import HOST, Unbound, free_port, udp
from tests.dns_tls_support import (
    EncryptedNetfilter,
    certificate,
    client_context,
    closed_by_server,
    ede_of,
    kdig,
    running_unbound,
    serving,
    tls_connect,
)

OTHER = "127.0.0.2"
H1, H2 = "HTTP/1.1", "HTTP/2"
DNS_MESSAGE = "application/dns-message"


@pytest.fixture(scope="module")
def unbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    with running_unbound(tmp_path_factory.mktemp("doh-unbound")) as server:
        yield server


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return certificate(tmp_path_factory.mktemp("doh-cert"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, unbound: Unbound,
           pair: tuple[Path, Path]) -> Iterator[EncryptedNetfilter]:
    with serving(tmp_path_factory.mktemp("doh"), unbound, pair, doh_max_streams=7) as running:
        yield running


def doh(server: EncryptedNetfilter, message: dns.message.Message, *, post: bool,
        version: str, source: str | None = None) -> dns.message.Message:
    """One query by httpx (HTTP/1.1 or HTTP/2), as RFC 8484 section 4.1 asks it:
    GET with ?dns= or POST."""
    wire = message.to_wire()
    transport = httpx.HTTPTransport(local_address=source, http1=version == H1,
                                    http2=version == H2, verify=client_context(server.cert))
    with httpx.Client(transport=transport, timeout=5) as session:
        headers = {"accept": DNS_MESSAGE}
        if post:
            response = session.post(server.doh_url, content=wire,
                                    headers={**headers, "content-type": DNS_MESSAGE})
        else:
            response = session.get(server.doh_url, params={"dns": _b64(wire)},
                                   headers=headers)
    assert response.status_code == 200, response.text
    assert response.http_version == ("HTTP/2" if version == H2 else "HTTP/1.1")
    assert response.headers["content-type"] == DNS_MESSAGE
    answer = dns.message.from_wire(response.content)
    assert message.is_response(answer)
    return answer


def client(server: EncryptedNetfilter, *, http2: bool) -> httpx.Client:
    return httpx.Client(http1=not http2, http2=http2, timeout=5,
                        verify=client_context(server.cert))


def counters(server: EncryptedNetfilter) -> dict[str, int]:
    """The encrypted listeners' counters, as the server logs them when it stops."""
    server.stop()
    found = re.search(r"dns: encrypted listeners stopped; (.*)", server.log())
    assert found, server.log()
    return {k: int(v) for k, v in (item.split() for item in found.group(1).split(", "))}


# ---------------------------------------------------------------- kdig


@pytest.mark.parametrize("method", ["+https", "+https-get"])
def test_kdig_blocked_name_same_answer_as_udp(server: EncryptedNetfilter,
                                              method: str) -> None:
    out = kdig(f"@{HOST}", "-p", str(server.doh_port), method, "blocked.example", "A")
    assert "(HTTP/2-" in out and "(status: 200)" in out, out
    assert "status: NXDOMAIN" in out and "EDE: 16 (Censored)" in out, out
    over_udp = udp(dns.message.make_query("blocked.example", "A", use_edns=0), server.port)
    assert f"'{ede_of(over_udp)[0][1]}'" in out, out


@pytest.mark.parametrize("method", ["+https", "+https-get"])
def test_kdig_clean_name_forwarded(server: EncryptedNetfilter, method: str) -> None:
    out = kdig(f"@{HOST}", "-p", str(server.doh_port), method, f"+tls-ca={server.cert}",
               "+tls-hostname=localhost", "clean.example", "A")
    assert "status: NOERROR" in out and "192.0.2.10" in out, out


def test_kdig_padded_answer(server: EncryptedNetfilter) -> None:
    out = kdig(f"@{HOST}", "-p", str(server.doh_port), "+https", "+padding",
               "clean.example", "A")
    assert "PADDING:" in out and "Received 468 B" in out, out


# ---------------------------------------------------------------- httpx


@pytest.mark.parametrize("version", [H1, H2], ids=["http1.1", "http2"])
@pytest.mark.parametrize("post", [True, False], ids=["post", "get"])
def test_httpx_blocked_and_clean(server: EncryptedNetfilter, post: bool,
                                     version: str) -> None:
    blocked = dns.message.make_query("blocked.example", "A", use_edns=0)
    over_https = doh(server, blocked, post=post, version=version)
    over_udp = udp(blocked, server.port)
    assert over_https.rcode() == over_udp.rcode() == dns.rcode.NXDOMAIN
    assert ede_of(over_https) == ede_of(over_udp) and ede_of(over_https)[0][0] == 16
    clean = doh(server, dns.message.make_query("clean.example", "A"), post=post,
                version=version)
    assert clean.rcode() == dns.rcode.NOERROR and str(clean.answer[0][0]) == "192.0.2.10"
    alias = doh(server, dns.message.make_query("alias.clean.example", "A"), post=post,
                version=version)
    assert alias.rcode() == dns.rcode.NXDOMAIN


def test_big_answer_is_not_truncated(server: EncryptedNetfilter) -> None:
    """As over TCP: no UDP size applies (the HUGE_TXT answer does not fit 1232)."""
    response = doh(server, dns.message.make_query("huge.clean.example", "TXT"), post=True,
                   version=H2)
    assert not response.flags & dns.flags.TC and len(response.answer[0]) == 12


# ---------------------------------------------------------------- dnspython's DoH client


def test_dnspython_doh_client(server: EncryptedNetfilter, dohclient_python: Path) -> None:
    """dns.query.https from dnspython[doh] (its own venv, tests/dohclient_script.py):
    GET and POST over HTTP/2 and HTTP/1.1; a blocked name gets UDP's answer, EDE
    included; a clean name gets unbound's data."""
    blocked = dns.message.make_query("blocked.example", "A", use_edns=0)
    clean = dns.message.make_query("clean.example", "A", use_edns=0)
    ways = [(post, version) for post in (True, False) for version in ("h2", "h1")]
    cases = [{"query": base64.b64encode(q.to_wire()).decode(), "post": post, "http": version}
             for q in (blocked, clean) for post, version in ways]
    job = json.dumps({"port": server.doh_port, "cafile": str(server.cert), "cases": cases})
    script = Path(__file__).with_name("dohclient_script.py")
    done = subprocess.run([str(dohclient_python), str(script)], input=job,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    assert len(results) == len(cases)
    over_udp = udp(blocked, server.port)
    assert ede_of(over_udp)[0][0] == 16
    for (post, version), got in zip(ways, results[:len(ways)], strict=True):
        assert got["http_version"] == ("HTTP/2" if version == "h2" else "HTTP/1.1"), got
        assert got["rcode"] == "NXDOMAIN" and got["answer"] == [], (post, version, got)
        assert [tuple(e) for e in got["ede"]] == ede_of(over_udp), (post, version, got)
        answer = dns.message.from_wire(base64.b64decode(got["wire"]))
        assert blocked.is_response(answer) and answer.rcode() == over_udp.rcode()
    for (post, version), got in zip(ways, results[len(ways):], strict=True):
        assert got["http_version"] == ("HTTP/2" if version == "h2" else "HTTP/1.1"), got
        assert got["rcode"] == "NOERROR" and got["ede"] == [], (post, version, got)
        assert got["answer"] == ["192.0.2.10"], (post, version, got)


# ---------------------------------------------------------------- bad requests


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
def test_bad_requests_get_http_errors(server: EncryptedNetfilter, http2: bool) -> None:
    """Each on the same connection, which goes on to answer a good query."""
    query = dns.message.make_query("clean.example", "A").to_wire()
    url = server.doh_url
    response_bit = query[:2] + bytes([query[2] | 0x80]) + query[3:]
    with client(server, http2=http2) as session:
        cases = [
            (session.post(url, content=query, headers={"content-type": "text/plain"}), 415),
            (session.post(url, content=query), 415),  # no content type at all
            (session.post(url, content=b"\0" * 70000,
                          headers={"content-type": DNS_MESSAGE}), 413),
            (session.get(url, params={"dns": "***"}), 400),
            (session.get(url), 400),
            (session.get(url, params={"dns": "AAAA"}), 400),  # 3 octets: no header
            (session.post(url, content=response_bit,
                          headers={"content-type": DNS_MESSAGE}), 400),
            (session.get(url.replace("/dns-query", "/other"),
                         params={"dns": _b64(query)}), 404),
            (session.put(url, content=query, headers={"content-type": DNS_MESSAGE}), 405),
        ]
        for response, status in cases:
            assert response.status_code == status, (response.request, response.text)
            assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        good = session.get(url, params={"dns": _b64(query)},
                           headers={"accept": DNS_MESSAGE})
        assert good.status_code == 200
        assert good.headers["content-type"] == DNS_MESSAGE
        assert dns.message.from_wire(good.content).rcode() == dns.rcode.NOERROR


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_malformed_http1_gets_400_and_close(server: EncryptedNetfilter) -> None:
    with tls_connect(server.doh_port, server.cert, alpn=["http/1.1"]) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 400")
        assert closed_by_server(sock)
    connection = http.client.HTTPSConnection(HOST, server.doh_port, timeout=5,
                                             context=client_context(server.cert))
    connection.request("GET", f"/dns-query?dns={_b64(_query())}")
    assert connection.getresponse().status == 200
    connection.close()


def _query() -> bytes:
    return dns.message.make_query("clean.example", "A").to_wire()


def test_http2_advertises_its_stream_cap_and_answers_many_streams(
        server: EncryptedNetfilter) -> None:
    """SETTINGS carries MAX_CONCURRENT_STREAMS = dns.doh_max_streams (7 here); seven
    streams at once are all answered on one connection."""
    sock = tls_connect(server.doh_port, server.cert, alpn=["h2"])
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    cap = None
    answered: dict[int, int] = {}
    sent = False
    for _ in range(200):  # bounded: frames until every stream ended
        data = sock.recv(65536)
        assert data, "closed"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RemoteSettingsChanged):
                changed = event.changed_settings.get(
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                if changed is not None:
                    cap = changed.new_value
            elif isinstance(event, h2.events.ResponseReceived):
                answered[event.stream_id] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length,
                                               event.stream_id)
        if cap is not None and not sent:
            for _ in range(cap):
                stream = conn.get_next_available_stream_id()
                conn.send_headers(stream, [(":method", "GET"), (":scheme", "https"),
                                           (":authority", HOST),
                                           (":path", f"/dns-query?dns={_b64(_query())}")],
                                  end_stream=True)
            sent = True
        sock.sendall(conn.data_to_send())
        if sent and len(answered) == cap:
            break
    sock.close()
    assert cap == 7
    assert sorted(answered.values()) == [200] * 7


# ---------------------------------------------------------------- limits


def test_one_client_cannot_take_every_connection(unbound: Unbound, pair: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    with serving(tmp_path, unbound, pair, tcp_per_client=2) as server:
        first = tls_connect(server.doh_port, server.cert, alpn=["http/1.1"])
        second = tls_connect(server.doh_port, server.cert, alpn=["http/1.1"])
        third = tls_connect(server.doh_port, server.cert, alpn=["http/1.1"])
        assert closed_by_server(first)
        other = doh(server, dns.message.make_query("clean.example", "A"), post=True,
                    version=H2, source=OTHER)
        assert other.rcode() == dns.rcode.NOERROR
        for sock in (first, second, third):
            sock.close()
        assert counters(server)["doh_closed_for_new"] >= 1


def test_slow_handshake_is_closed(unbound: Unbound, pair: tuple[Path, Path],
                                  tmp_path: Path) -> None:
    with serving(tmp_path, unbound, pair, tls_handshake_timeout=0.5) as server:
        slow = socket.create_connection((HOST, server.doh_port), timeout=5)
        slow.sendall(b"\x16\x03\x01")  # the start of a ClientHello, never the rest
        assert closed_by_server(slow)
        slow.close()
        response = doh(server, dns.message.make_query("clean.example", "A"), post=True,
                       version=H1)
        assert response.rcode() == dns.rcode.NOERROR
        assert counters(server)["doh_handshake_failed"] >= 1


def test_metrics_count_each_transport(unbound: Unbound, pair: tuple[Path, Path],
                                      tmp_path: Path) -> None:
    """/metrics carries the encrypted listeners' counters, per transport."""
    port = free_port()
    server = EncryptedNetfilter(tmp_path, *pair, upstreams=[unbound.address])
    server.config["metrics"] = {"listen": f"{HOST}:{port}"}
    server.conf.write_text(yaml.safe_dump(server.config), encoding="utf-8")
    server.start()
    try:
        doh(server, dns.message.make_query("blocked.example", "A"), post=True, version=H2)
        with client(server, http2=False) as session:
            assert session.post(server.doh_url, content=b"x").status_code == 415
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
    finally:
        server.stop()
    assert "netfilter_dns_encrypted_doh_queries_total 1.0" in text, text
    assert "netfilter_dns_encrypted_doh_http_415_total 1.0" in text
    assert "netfilter_dns_encrypted_doh_connections_h2_total 1.0" in text


def test_more_streams_than_advertised_end_the_connection(server: EncryptedNetfilter) -> None:
    """A client that opens more streams than SETTINGS allow (7 here) gets GOAWAY and its
    connection closes; the server answers the next connection. The frames are written by
    hand: h2 as a client would refuse to send them."""
    import hpack
    import hyperframe.frame

    sock = tls_connect(server.doh_port, server.cert, alpn=["h2"])
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                 + hyperframe.frame.SettingsFrame(0).serialize())
    encoder = hpack.Encoder()
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", HOST),
               (":path", f"/dns-query?dns={_b64(_query())}")]
    frames = b""
    for n in range(8):  # open, never ended: each holds its stream
        frame = hyperframe.frame.HeadersFrame(1 + 2 * n)
        frame.data = encoder.encode(headers)
        frame.flags.add("END_HEADERS")
        frames += frame.serialize()
    sock.sendall(frames)
    pieces: list[bytes] = []
    assert closed_by_server_collecting(sock, pieces)
    received = b"".join(pieces)
    goaway = hyperframe.frame.GoAwayFrame.type
    assert _frame_types(received).count(goaway) == 1, received
    sock.close()
    assert doh(server, dns.message.make_query("clean.example", "A"), post=False,
               version=H2).rcode() == dns.rcode.NOERROR


def closed_by_server_collecting(sock: socket.socket, into: list[bytes]) -> bool:
    """As closed_by_server, keeping what was received."""
    for _ in range(100):
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:
            return True
        if not data:
            return True
        into.append(data)
    return False


def _frame_types(data: bytes) -> list[int]:
    types, at = [], 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at:at + 3], "big")
        types.append(data[at + 3])
        at += 9 + length
    return types


@pytest.mark.parametrize("alpn", [["h2"], ["http/1.1"], ["dot"]])
def test_random_bytes_never_stop_the_server(server: EncryptedNetfilter,
                                            alpn: list[str]) -> None:
    """Seeded random bytes after the handshake, and a good request cut short and
    mutated, on DoH (HTTP/2, HTTP/1.1) and DoT: the server closes or answers, and
    answers the next client."""
    rng = random.Random(8484)
    port = server.dot_port if alpn == ["dot"] else server.doh_port
    good = (b"POST /dns-query HTTP/1.1\r\nHost: x\r\ncontent-type: application/dns-message"
            b"\r\ncontent-length: %d\r\n\r\n" % len(_query()) + _query())
    if alpn == ["h2"]:
        good = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + good
    for _ in range(20):
        if rng.random() < 0.5:
            junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        else:
            junk = bytearray(good[: rng.randrange(1, len(good) + 1)])
            for _ in range(rng.randrange(1, 6)):
                junk[rng.randrange(len(junk))] = rng.randrange(256)
            junk = bytes(junk)
        with tls_connect(port, server.cert, alpn=alpn) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            closed_by_server(sock)
    assert dot_or_doh_answers(server)


def dot_or_doh_answers(server: EncryptedNetfilter) -> bool:
    query = dns.message.make_query("blocked.example", "A")
    over_doh = doh(server, query, post=True, version=H2)
    with tls_connect(server.dot_port, server.cert) as sock:
        dns.query.send_tcp(sock, query)
        over_dot, _ = dns.query.receive_tcp(sock)
    return over_doh.rcode() == over_dot.rcode() == dns.rcode.NXDOMAIN


def test_unfinished_bodies_are_bounded_per_connection(unbound: Unbound,
                                                      pair: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    """Streams that send parts of bodies and never end them: past dns.tcp_max_buffer
    (4 KiB here) for all of them together, the connection is dropped; each stream alone
    stays under its 65535 octets."""
    with serving(tmp_path, unbound, pair, tcp_max_buffer=4096) as server:
        sock = tls_connect(server.doh_port, server.cert, alpn=["h2"])
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for _ in range(6):
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, [(":method", "POST"), (":scheme", "https"),
                                       (":authority", HOST), (":path", "/dns-query"),
                                       ("content-type", DNS_MESSAGE)])
            conn.send_data(stream, b"\0" * 1000)
        sock.sendall(conn.data_to_send())
        assert closed_by_server(sock)
        sock.close()
        response = doh(server, dns.message.make_query("clean.example", "A"), post=True,
                       version=H2)
        assert response.rcode() == dns.rcode.NOERROR
        assert counters(server)["doh_dropped_unfinished"] == 1
