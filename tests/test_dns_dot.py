"""DNS over TLS (RFC 7858): `netfilter serve dns` with a DoT listener, in front of a
real unbound, asked by real clients (kdig +tls, dnspython's dns.query.tls) on loopback.

Blocked names get the answer UDP gives, Extended DNS Error included; clean names are
forwarded; answers to padded queries are padded to a multiple of 468 octets (RFC 8467);
and the TCP listener's limits hold: a client's connections past its cap cost it its own
idle ones, a connection that never finishes its handshake is closed, and junk never
stops the server. A second client is a socket bound to 127.0.0.2.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest

from netfilter.dns.tlsconfig import generate_self_signed
from tests.dns_support import HOST, Unbound, udp, wait_for
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
PADDING = 12


@pytest.fixture(scope="module")
def unbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    with running_unbound(tmp_path_factory.mktemp("dot-unbound")) as server:
        yield server


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return certificate(tmp_path_factory.mktemp("dot-cert"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, unbound: Unbound,
           pair: tuple[Path, Path]) -> Iterator[EncryptedNetfilter]:
    with serving(tmp_path_factory.mktemp("dot"), unbound, pair) as running:
        yield running


def dot(server: EncryptedNetfilter, message: dns.message.Message) -> dns.message.Message:
    return dns.query.tls(message, HOST, port=server.dot_port, timeout=5,
                         ssl_context=client_context(server.cert), server_hostname=HOST)


def ask(sock: socket.socket, message: dns.message.Message) -> dns.message.Message:
    dns.query.send_tcp(sock, message)
    response, _ = dns.query.receive_tcp(sock)
    return response


# ---------------------------------------------------------------- kdig


def test_kdig_blocked_name_same_answer_as_udp(server: EncryptedNetfilter) -> None:
    """kdig +tls: NXDOMAIN with EDE 16 and the authority's text, as over UDP."""
    out = kdig(f"@{HOST}", "-p", str(server.dot_port), "+tls", "blocked.example", "A")
    assert "status: NXDOMAIN" in out, out
    assert "EDE: 16 (Censored)" in out, out
    over_udp = udp(dns.message.make_query("blocked.example", "A", use_edns=0), server.port)
    code, text = ede_of(over_udp)[0]
    assert code == 16 and f"'{text}'" in out, out


def test_kdig_clean_name_forwarded(server: EncryptedNetfilter) -> None:
    out = kdig(f"@{HOST}", "-p", str(server.dot_port), f"+tls-ca={server.cert}",
               "+tls-hostname=localhost", "clean.example", "A")
    assert "status: NOERROR" in out, out
    assert "192.0.2.10" in out, out


def test_kdig_pads_and_is_padded(server: EncryptedNetfilter) -> None:
    """kdig pads its TLS queries (RFC 8467 says clients do); the answer is padded to a
    multiple of 468 octets."""
    out = kdig(f"@{HOST}", "-p", str(server.dot_port), "+tls", "+padding",
               "blocked.example", "A")
    assert "PADDING:" in out and "Received 468 B" in out, out


# ---------------------------------------------------------------- dnspython


@pytest.mark.parametrize("name", ["blocked.example", "target.blocked.example"])
def test_dnspython_blocked_same_ede_as_udp(server: EncryptedNetfilter, name: str) -> None:
    query = dns.message.make_query(name, "A", use_edns=0)
    over_tls = dot(server, query)
    over_udp = udp(query, server.port)
    assert over_tls.rcode() == over_udp.rcode() == dns.rcode.NXDOMAIN
    assert ede_of(over_tls) == ede_of(over_udp) and ede_of(over_tls)[0][0] == 16


def test_dnspython_clean_and_cname_to_blocked(server: EncryptedNetfilter) -> None:
    clean = dot(server, dns.message.make_query("clean.example", "AAAA"))
    assert clean.rcode() == dns.rcode.NOERROR
    assert str(clean.answer[0][0]) == "2001:db8::10"
    alias = dot(server, dns.message.make_query("alias.clean.example", "A", use_edns=0))
    assert alias.rcode() == dns.rcode.NXDOMAIN and ede_of(alias)


@pytest.mark.parametrize("name", ["blocked.example", "clean.example", "big.clean.example"])
def test_padding_only_when_asked(server: EncryptedNetfilter, name: str) -> None:
    padded_query = dns.message.make_query(name, "TXT", use_edns=0, pad=128)
    with tls_connect(server.dot_port, server.cert) as sock:
        dns.query.send_tcp(sock, padded_query)
        wire, _ = dns.query.receive_tcp(sock, one_rr_per_rrset=False)
        raw = wire.to_wire()  # re-rendered: check the padding option itself too
        assert any(o.otype == PADDING for o in wire.options)
        plain = ask(sock, dns.message.make_query(name, "TXT", use_edns=0))
        assert not any(o.otype == PADDING for o in plain.options)
    # the length on the wire, read by hand
    with tls_connect(server.dot_port, server.cert) as sock:
        data = padded_query.to_wire()
        sock.sendall(struct.pack("!H", len(data)) + data)
        length = struct.unpack("!H", _read(sock, 2))[0]
        assert length % 468 == 0, (length, len(raw))


def _read(sock: socket.socket, count: int) -> bytes:
    data = b""
    for _ in range(count):
        if len(data) == count:
            break
        piece = sock.recv(count - len(data))
        assert piece, "closed"
        data += piece
    return data


def test_many_queries_on_one_connection(server: EncryptedNetfilter) -> None:
    """Pipelined: ten queries sent at once, ten answers (by id) on one connection."""
    queries = [dns.message.make_query(n, "A") for n in
               ["clean.example", "blocked.example", "www.clean.example", "clean.test"] * 3]
    with tls_connect(server.dot_port, server.cert) as sock:
        sock.sendall(b"".join(struct.pack("!H", len(w)) + w
                              for w in (q.to_wire() for q in queries)))
        answers = {}
        for _ in queries:
            response, _ = dns.query.receive_tcp(sock)
            answers[response.id] = response
    for query in queries:
        assert query.is_response(answers[query.id])


def test_junk_is_answered_or_dropped_and_the_server_goes_on(
        server: EncryptedNetfilter) -> None:
    """A short message, a response, a message cut short, a length of zero: the server
    answers FORMERR or says nothing, and answers the next query."""
    good = dns.message.make_query("clean.example", "A")
    seed = dns.message.make_query("clean.example", "A")
    seed.id = (good.id + 1) % 65536  # the junk's answers, if any, are told apart by id
    wire = seed.to_wire()
    for junk in (b"\x00" * 3, wire[:2] + bytes([wire[2] | 0x80]) + wire[3:], wire[:15], b""):
        with tls_connect(server.dot_port, server.cert) as sock:
            sock.sendall(struct.pack("!H", len(junk)) + junk)
            dns.query.send_tcp(sock, good)
            for _ in range(2):  # at most one answer to the junk comes first
                wire_answer = _read(sock, struct.unpack("!H", _read(sock, 2))[0])
                if wire_answer[:2] == good.to_wire()[:2]:
                    break
            assert dns.message.from_wire(wire_answer).rcode() == dns.rcode.NOERROR
    with tls_connect(server.dot_port, server.cert) as sock:  # a length never followed
        sock.sendall(b"\x01\x00garbage")
    assert dot(server, good).rcode() == dns.rcode.NOERROR


# ---------------------------------------------------------------- limits


def test_one_client_cannot_take_every_connection(unbound: Unbound, pair: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    """Past its cap a client's new connection closes its own oldest idle one; another
    client is served all along."""
    with serving(tmp_path, unbound, pair, tcp_per_client=2, tcp_max_connections=3) as server:
        first = tls_connect(server.dot_port, server.cert)
        second = tls_connect(server.dot_port, server.cert)
        ask(second, dns.message.make_query("clean.example", "A"))  # first is idle longest
        third = tls_connect(server.dot_port, server.cert)
        assert ask(third, dns.message.make_query("clean.example", "A")).answer
        assert closed_by_server(first)
        other = tls_connect(server.dot_port, server.cert, source=OTHER)
        assert ask(other, dns.message.make_query("blocked.example", "A")).rcode() == \
            dns.rcode.NXDOMAIN
        for sock in (first, second, third, other):
            sock.close()
        assert "dot_closed_for_new" in counters(server)


def test_a_handshake_that_never_comes_is_closed(unbound: Unbound, pair: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    """A connection that sends nothing, or no TLS, is closed at the handshake deadline
    and its slot comes back; the client's next connection is served."""
    with serving(tmp_path, unbound, pair, tcp_per_client=2,
                 tls_handshake_timeout=0.5) as server:
        silent = socket.create_connection((HOST, server.dot_port), timeout=5)
        junk = socket.create_connection((HOST, server.dot_port), timeout=5)
        junk.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert closed_by_server(silent) and closed_by_server(junk)
        silent.close()
        junk.close()
        with tls_connect(server.dot_port, server.cert) as sock:
            assert ask(sock, dns.message.make_query("clean.example", "A")).answer
        assert counters(server).get("dot_handshake_failed", 0) >= 2


def test_idle_connection_is_closed(unbound: Unbound, pair: tuple[Path, Path],
                                   tmp_path: Path) -> None:
    with (serving(tmp_path, unbound, pair, tcp_idle_timeout=0.5) as server,
          tls_connect(server.dot_port, server.cert) as sock):
        ask(sock, dns.message.make_query("clean.example", "A"))
        assert closed_by_server(sock)


def counters(server: EncryptedNetfilter) -> dict[str, int]:
    """The encrypted listeners' counters, as the server logs them when it stops."""
    server.stop()
    found = re.search(r"dns: encrypted listeners stopped; (.*)", server.log())
    assert found, server.log()
    return {k: int(v) for k, v in (item.split() for item in found.group(1).split(", "))}


def test_sighup_loads_a_renewed_certificate(unbound: Unbound, tmp_path: Path) -> None:
    """Certificates are renewed in place (certbot, an operator's CA): SIGHUP, and new
    connections get the new one; the connections and answers go on."""
    cert, key = certificate(tmp_path / "tls")
    with serving(tmp_path / "node", unbound, (cert, key)) as server:
        def presented() -> bytes:
            with tls_connect(server.dot_port, cert) as sock:
                der = sock.getpeercert(binary_form=True)
                assert der is not None
                return der

        old = presented()
        cert.unlink()
        key.unlink()
        generate_self_signed(cert, key)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        new = client_context(cert)  # trusts only the renewed certificate
        assert wait_for(lambda: _verifies(server.dot_port, new))
        assert presented() != old
        assert dot(server, dns.message.make_query("clean.example", "A")).answer


def _verifies(port: int, context: ssl.SSLContext) -> bool:
    try:
        with context.wrap_socket(socket.create_connection((HOST, port), timeout=2),
                                 server_hostname=HOST):
            return True
    except (ssl.SSLError, OSError):
        return False


def test_connections_in_their_handshake_hold_slots_and_lose_them(
        unbound: Unbound, pair: tuple[Path, Path], tmp_path: Path) -> None:
    """A connection takes its slot before its handshake: a client's connections that
    never send a ClientHello count against its cap, and its next connection closes the
    oldest of them (long before the 60 s handshake deadline here)."""
    with serving(tmp_path, unbound, pair, tcp_per_client=2,
                 tls_handshake_timeout=60) as server:
        first = socket.create_connection((HOST, server.dot_port), timeout=5)
        second = socket.create_connection((HOST, server.dot_port), timeout=5)
        with tls_connect(server.dot_port, server.cert) as sock:
            assert ask(sock, dns.message.make_query("clean.example", "A")).answer
        assert closed_by_server(first)
        for raw in (first, second):
            raw.close()
        assert counters(server)["dot_closed_for_new"] >= 1
