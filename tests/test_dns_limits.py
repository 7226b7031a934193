"""Resource limits of the DNS front-end, and what a packet our code fails on costs.

`netfilter serve dns` as a real process in front of a real unbound, asked over real
loopback sockets. A second client is a socket bound to another loopback address
(127.0.0.2 and up: Linux routes all of 127/8 to lo). Each test starts its own server
with small limits, so that each runs in a few seconds.
"""

from __future__ import annotations

import re
import socket
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest

from netfilter.dns.udp import relay_built
from netfilter.slots import client_key as _client_key
from tests.dns_support import HOST, Netfilter, Unbound, dig, require_tools, running, tcp, udp
from tests.dns_tls_support import closed_by_server

OTHER = "127.0.0.2"  # a second client address


@pytest.fixture(scope="module")
def unbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    require_tools("unbound", "dig")
    directory = tmp_path_factory.mktemp("limits-unbound")
    server = Unbound(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def silent() -> Iterator[str]:
    """An upstream that receives queries and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as swallow:
        swallow.bind((HOST, 0))
        yield f"{HOST}:{swallow.getsockname()[1]}"


@contextmanager
def serving(directory: Path, upstream: str, **dns_settings: Any) -> Iterator[Netfilter]:
    with running(Netfilter(directory, upstreams=[upstream], **dns_settings)) as server:
        yield server


def counts(server: Netfilter) -> dict[str, int]:
    """The packet counters the server logs when it stops (SIGTERM)."""
    assert server.stop() == 0
    found = re.search(r"dns: stopped; (.*)", server.log())
    assert found, server.log()
    return {k: int(v) for k, v in (item.split() for item in found.group(1).split(", "))}


def connect(port: int, source: str = HOST, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(3.0)
    sock.bind((source, 0))
    sock.connect((HOST, port))
    return sock


def ask(sock: socket.socket, message: dns.message.Message | None = None
        ) -> dns.message.Message:
    """One query (clean.example A by default) on an open connection, and its answer."""
    message = message or dns.message.make_query("clean.example", "A")
    dns.query.send_tcp(sock, message)
    response, _ = dns.query.receive_tcp(sock, expiration=time.time() + 3)
    assert message.is_response(response)
    return response


def address_of(response: dns.message.Message) -> str:
    return str(response.answer[-1][0].address)


# ---------------------------------------------------------------- connections


def test_one_client_cannot_take_every_connection(unbound: Unbound, tmp_path: Path) -> None:
    """Past its own limit a client's new connections cost it its oldest idle ones,
    while another client (address) still gets answers, by dig and by dnspython."""
    with serving(tmp_path, unbound.address, tcp_per_client=4,
                 tcp_max_connections=64) as server:
        mine = []
        try:
            for _ in range(7):
                sock = connect(server.port)
                mine.append(sock)
                assert address_of(ask(sock)) == "192.0.2.10"
                time.sleep(0.05)
            for sock in mine[:3]:
                assert closed_by_server(sock)
            for sock in mine[3:]:  # the last four are still served
                assert address_of(ask(sock)) == "192.0.2.10"
            out = dig(server.port, "-b", OTHER, "+tcp", "+short", "clean.example")
            assert out.strip() == "192.0.2.10", out
            other = tcp(dns.message.make_query("clean.example", "A"), server.port,
                        source=OTHER)
            assert address_of(other) == "192.0.2.10"
        finally:
            for sock in mine:
                sock.close()
        found = counts(server)
    assert found["tcp_closed_for_new"] == 3


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_ipv6_clients_count_per_64() -> None:
    assert _client_key("2001:db8:1:2::5") == _client_key("2001:db8:1:2:ffff::1%eth0") \
        == "2001:db8:1:2::/64"
    assert _client_key("2001:db8:1:3::5") != _client_key("2001:db8:1:2::5")
    assert _client_key("::ffff:192.0.2.7") == _client_key("192.0.2.7") == "192.0.2.7"


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_client_limit(unbound: Unbound, tmp_path: Path) -> None:
    with serving(tmp_path, unbound.address, ipv6=True, tcp_per_client=2) as server:
        mine = []
        try:
            for _ in range(3):
                sock = socket.create_connection(("::1", server.port), timeout=3)
                mine.append(sock)
                assert address_of(ask(sock)) == "192.0.2.10"
                time.sleep(0.05)
            assert closed_by_server(mine[0])
            assert address_of(ask(mine[2])) == "192.0.2.10"
            assert address_of(tcp(dns.message.make_query("clean.example", "A"),
                                  server.port)) == "192.0.2.10"
        finally:
            for sock in mine:
                sock.close()


def test_a_client_whose_connections_are_all_busy_is_refused(silent: str,
                                                            tmp_path: Path) -> None:
    """Every connection of a client at its limit has a query in flight (the upstream
    never answers): its next one is closed at once; another client is served."""
    with serving(tmp_path, silent, timeout=3.0, tcp_per_client=2) as server:
        busy = [connect(server.port) for _ in range(2)]
        try:
            for sock in busy:
                dns.query.send_tcp(sock, dns.message.make_query("clean.example", "A"))
            time.sleep(0.8)  # read by the server: in flight
            with connect(server.port) as extra:
                assert closed_by_server(extra, bound=1.0)
            out = dig(server.port, "-b", OTHER, "+tcp", "blocked.example")  # no upstream
            assert "status: NXDOMAIN" in out, out
            for sock in busy:
                response, _ = dns.query.receive_tcp(sock, expiration=time.time() + 5)
                assert response.rcode() == dns.rcode.SERVFAIL
        finally:
            for sock in busy:
                sock.close()
        found = counts(server)
    assert found["tcp_refused_client"] == 1
    assert "tcp_closed_for_new" not in found


def test_a_busy_connection_is_closed_at_its_lifetime(unbound: Unbound,
                                                     tmp_path: Path) -> None:
    """A query every half second keeps the idle timer from firing; the lifetime cap
    still closes the connection."""
    with serving(tmp_path, unbound.address, tcp_idle_timeout=1.5,
                 tcp_max_lifetime=2.0) as server:
        with connect(server.port) as sock:
            start = time.monotonic()
            answered = 0
            with suppress(EOFError, ConnectionError, TimeoutError):
                while time.monotonic() - start < 8:
                    assert address_of(ask(sock)) == "192.0.2.10"
                    answered += 1
                    time.sleep(0.5)
            lasted = time.monotonic() - start
        found = counts(server)
    assert 1.9 <= lasted < 5.5, f"closed after {lasted:.1f} s"
    assert answered >= 3
    assert found["tcp_closed_lifetime"] == 1


def test_oldest_idle_connection_makes_room(unbound: Unbound, tmp_path: Path) -> None:
    """All slots held by idle connections from many addresses: a new client is
    admitted, and the connection idle longest is the one closed for it."""
    with serving(tmp_path, unbound.address, tcp_max_connections=6,
                 tcp_per_client=2) as server:
        held = []
        try:
            for number in range(10, 16):
                sock = connect(server.port, source=f"127.0.0.{number}")
                held.append(sock)
                assert address_of(ask(sock)) == "192.0.2.10"
                time.sleep(0.05)
            response = tcp(dns.message.make_query("clean.example", "A"), server.port,
                           source="127.0.0.20")
            assert address_of(response) == "192.0.2.10"
            assert closed_by_server(held[0])
            for sock in held[1:]:
                assert address_of(ask(sock)) == "192.0.2.10"
        finally:
            for sock in held:
                sock.close()
        found = counts(server)
    assert found["tcp_closed_for_new"] == 1
    assert "tcp_refused_full" not in found


def test_queries_per_connection_are_capped(unbound: Unbound, tmp_path: Path) -> None:
    with serving(tmp_path, unbound.address, tcp_max_queries=5) as server:
        with connect(server.port) as sock:
            wires = []
            for number in range(8):  # all at once, in one write: the server may close
                message = dns.message.make_query("clean.example", "A")  # after the 5th
                message.id = 100 + number  # before a later write (a broken pipe)
                wires.append(message.to_wire())
            sock.sendall(b"".join(struct.pack("!H", len(w)) + w for w in wires))
            ids = []
            with suppress(EOFError, ConnectionError):
                while True:
                    response, _ = dns.query.receive_tcp(sock, expiration=time.time() + 3)
                    ids.append(response.id)
        found = counts(server)
    assert sorted(ids) == [100, 101, 102, 103, 104]
    assert found["tcp_closed_max_queries"] == 1


def test_queries_in_flight_per_connection_are_bounded(silent: str, tmp_path: Path) -> None:
    """With an upstream that never answers, each query is in flight for the whole
    timeout: with 3 in flight at most, 9 pipelined queries take three timeouts."""
    with (serving(tmp_path, silent, timeout=1.0, tcp_pipeline=3) as server,
          connect(server.port) as sock):
        for number in range(9):
            message = dns.message.make_query(f"n{number}.clean.example", "A")
            dns.query.send_tcp(sock, message)
        start = time.monotonic()
        arrived: list[float] = []
        while len(arrived) < 9:
            response, _ = dns.query.receive_tcp(sock, expiration=time.time() + 5)
            assert response.rcode() == dns.rcode.SERVFAIL
            arrived.append(time.monotonic() - start)
    assert sum(t < 1.5 for t in arrived) <= 3, f"answers came at {arrived}"
    assert arrived[-1] >= 2.5, f"answers came at {arrived}"


def ended(sock: socket.socket) -> bool:
    """Has the peer closed or reset the connection (read nothing to find out)?"""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    return state in (TCP_CLOSE, TCP_CLOSE_WAIT)


TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # Linux's tcpi_state


def test_a_client_that_does_not_read_is_dropped(unbound: Unbound, tmp_path: Path) -> None:
    """A client sends and never reads: once the kernel's buffers are full and the
    answers we hold for it pass the mark, the connection is reset, instead of our
    buffer growing or the connection holding on to its slot."""
    with serving(tmp_path, unbound.address, tcp_max_buffer=4096,
                 tcp_max_queries=100000) as server:
        query = dns.message.make_query("big.clean.example", "TXT", use_edns=0, payload=1232)
        wire = query.to_wire()
        sent = 0
        with connect(server.port, rcvbuf=4096) as sock:
            sock.settimeout(2.0)
            with suppress(ConnectionError, TimeoutError):
                while sent < 20000:  # ~17 MB of answers: more than any kernel buffer
                    sock.sendall(struct.pack("!H", len(wire)) + wire)
                    sent += 1
            deadline = time.monotonic() + 10
            while not ended(sock):
                assert time.monotonic() < deadline, f"{sent} queries, still connected"
                time.sleep(0.1)
        found = counts(server)
    assert found.get("tcp_dropped_unread") == 1, found


# ---------------------------------------------------------------- internal errors

# A fault injected into a dependency of the server (the block-answer builder) for
# names under fault.blocked.example: the UnicodeDecodeError dnslib once raised on a
# label that is not UTF-8. The rest of the server is the real one.
FAULTY = """
import sys
import netfilter.dns.server as server

real = server.block_answer

def block_answer(raw, query, verdict, settings):
    if query.name.endswith("fault.blocked.example"):
        bytes([0x8F]).decode("utf-8")
    return real(raw, query, verdict, settings)

server.block_answer = block_answer
from netfilter.cli import main
sys.exit(main(sys.argv[1:]))
"""


class FaultyNetfilter(Netfilter):
    def command(self) -> list[str]:
        return [sys.executable, "-c", FAULTY, *super().command()[3:]]


@pytest.mark.parametrize("listener", ["relay", "python"])
def test_failing_packets_are_counted_not_logged(unbound: Unbound, tmp_path: Path,
                                                listener: str) -> None:
    if listener == "relay" and not relay_built():
        pytest.skip("the C extension netfilter.dns._hotpath was not built")
    env = {"NETFILTER_DNS_PYTHON": "1"} if listener == "python" else {}
    server = FaultyNetfilter(tmp_path, upstreams=[unbound.address], env=env)
    server.start()
    total = 3000
    rcodes: dict[int, int] = {}
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((OTHER, 0))
            sock.settimeout(1.0)
            for start in range(0, total, 100):
                for number in range(start, start + 100):
                    message = dns.message.make_query(f"x{number}.fault.blocked.example", "A")
                    sock.sendto(message.to_wire(), (HOST, server.port))
                with suppress(TimeoutError):
                    for _ in range(100):
                        reply = dns.message.from_wire(sock.recv(65535))
                        rcodes[reply.rcode()] = rcodes.get(reply.rcode(), 0) + 1
        over_tcp = tcp(dns.message.make_query("t.fault.blocked.example", "A"), server.port,
                       source=OTHER)
        assert over_tcp.rcode() == dns.rcode.SERVFAIL
        clean = udp(dns.message.make_query("clean.example", "A"), server.port, source=OTHER)
        assert address_of(clean) == "192.0.2.10"
        blocked = udp(dns.message.make_query("blocked.example", "A"), server.port,
                      source=OTHER)
        assert blocked.rcode() == dns.rcode.NXDOMAIN
        found = counts(server)
    finally:
        server.stop()
    log = server.log()
    assert rcodes.get(dns.rcode.SERVFAIL, 0) >= total * 0.9, rcodes
    assert set(rcodes) == {dns.rcode.SERVFAIL}, rcodes
    assert found["internal_errors"] >= rcodes[dns.rcode.SERVFAIL] + 1
    assert "Traceback" not in log
    assert OTHER not in log
    lines = [line for line in log.splitlines() if "internal error" in line]
    assert 1 <= len(lines) <= 3, log
    assert "UnicodeDecodeError" in lines[0]
    assert len(log) < 4000, log
