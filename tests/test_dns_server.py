"""`netfilter serve dns` as a real process, in front of a real unbound, asked by real
clients (dig, dnspython) over UDP and TCP on 127.0.0.1.

Servers (module scope, started together): `main` (the demo list as nxdomain, a
stoppage list and a refused list, EDE 17, block TTL 123, client addresses truncated,
on 127.0.0.1 and ::1), `routed` (the same, URL hosts routed to a proxy address),
`fuzz` (same lists, for the malformed-packet tests), and four with broken upstreams:
`dead` (nothing listens on the upstream port), `silent` (the upstream swallows
queries), `failover` (silent, then unbound) and `failover_dead` (dead, then unbound).

Every test runs twice: with the C relay serving UDP (`relay`, the default where the
extension is built) and with the Python listener (`python`, NETFILTER_DNS_PYTHON=1,
what runs where it is not); `routed` always uses the Python listener.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from dnslib import DNSRecord

from netfilter.dns.udp import relay_built
from netfilter.keys import generate_keypair, load_private_key
from tests.dns_support import (
    BIG_TXT,
    DEMO_ALLOW,
    DEMO_LIST,
    DEMO_PUB,
    HOST,
    HUGE_TXT,
    Netfilter,
    Unbound,
    build_list,
    dig,
    free_port,
    read_events,
    require_tools,
    start_all,
    tcp,
    udp,
    wait_for,
)

TTL = 123
EDE = 17
STOP4, STOP6 = "192.0.2.99", "2001:db8::99"
PROXY4 = "192.0.2.80"
BROKEN_TIMEOUT = 1.0  # the upstream timeout of the servers with broken upstreams
DEMO_ISSUER = "Demo Blocking Authority (not a real authority)"
DEMO_CONTACTS = ["https://appeals.authority.example/", "mailto:appeals@authority.example"]
TYPES = ["A", "AAAA", "TXT", "HTTPS"]
Send = Callable[..., dns.message.Message]
TRANSPORTS: dict[str, Send] = {"udp": udp, "tcp": tcp}


@dataclass
class Servers:
    unbound: Unbound
    main: Netfilter
    routed: Netfilter
    fuzz: Netfilter
    dead: Netfilter
    silent: Netfilter
    failover: Netfilter
    failover_dead: Netfilter

    def all(self) -> list[Unbound | Netfilter]:
        return [self.unbound, self.main, self.routed, self.fuzz, self.dead, self.silent,
                self.failover, self.failover_dead]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6 = _ipv6_loopback()


@pytest.fixture(scope="module", params=["relay", "python"])
def servers(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    require_tools("unbound", "dig")
    if request.param == "relay" and not relay_built():
        pytest.skip("the C extension netfilter.dns._hotpath was not built (no C compiler at "
                    "install): only the Python listener runs")
    env = {"NETFILTER_DNS_PYTHON": "1"} if request.param == "python" else {}
    base = tmp_path_factory.mktemp(f"dns-{request.param}")
    key_path, pub = generate_keypair(base / "authority")
    key = load_private_key(key_path)
    stop = build_list(base, key, "stoplist",
                      [{"domain": "stop.example", "ref": "S-1", "category": "test"}])
    refuse = build_list(base, key, "refuselist",
                        [{"domain": "refuse.example", "ref": "R-1", "category": "test"}])
    lists = [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)], "action": "nxdomain"},
             {"path": str(stop), "trust": [str(pub)], "action": "stoppage"},
             {"path": str(refuse), "trust": [str(pub)], "action": "refused"}]
    local = {"allow": str(DEMO_ALLOW)}
    dead = f"{HOST}:{free_port()}"  # nothing listens there: ICMP port unreachable
    swallow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # receives, never answers
    swallow.bind((HOST, 0))
    silent = f"{HOST}:{swallow.getsockname()[1]}"

    (base / "unbound").mkdir()
    unbound = Unbound(base / "unbound")
    started: list[Unbound | Netfilter] = [unbound]
    try:
        unbound.start()
        up = unbound.address
        blocking = {"lists": lists, "local": local, "ede": EDE, "block_ttl": TTL,
                    "stoppage_ipv4": STOP4, "stoppage_ipv6": STOP6}
        broken = {"timeout": BROKEN_TIMEOUT, "env": env}
        group = Servers(
            unbound=unbound,
            # every block its own event: the tests below read each one's detail
            main=Netfilter(base / "main", upstreams=[up], env=env, ipv6=IPV6,
                           audit={"aggregate_window": 0}, **blocking),
            routed=Netfilter(base / "routed", upstreams=[up], route_url_hosts_to_proxy=True,
                             proxy_ipv4=PROXY4, env=env, **blocking),
            fuzz=Netfilter(base / "fuzz", upstreams=[up], timeout=BROKEN_TIMEOUT, env=env,
                           **blocking),
            dead=Netfilter(base / "dead", upstreams=[dead], **broken),
            silent=Netfilter(base / "silent", upstreams=[silent], **broken),
            failover=Netfilter(base / "failover", upstreams=[silent, up], **broken),
            failover_dead=Netfilter(base / "failover-dead", upstreams=[dead, up], **broken),
        )
        started = group.all()
        start_all(started[1:])
        way = "by the C relay" if request.param == "relay" else "(udp, tcp)"
        for server in started[1:]:
            expected = "(udp, tcp)" if server is group.routed else way
            assert expected in server.log(), f"{server.name} serves UDP another way:\n" \
                                             f"{server.log()}"
        yield group
    finally:
        for server in reversed(started):
            server.stop()
        swallow.close()


@pytest.fixture(autouse=True)
def _server_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """On a failure, show the servers' stderr; and the main server must log no traceback."""
    if "servers" not in request.fixturenames:
        yield
        return
    group: Servers = request.getfixturevalue("servers")
    failed = request.session.testsfailed
    seen = len(group.main.log())
    yield
    if request.session.testsfailed > failed:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            for server in group.all():
                reporter.write_line(f"\n----- {server.name} {server.directory} stderr -----")
                reporter.write_line(server.log()[-6000:])
    new = group.main.log()[seen:]
    assert "Traceback" not in new, f"the main server logged an internal error:\n{new}"


def query(name: str, rdtype: str | int = "A", **kwargs: Any) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kwargs)


def soa_of(response: dns.message.Message) -> dns.rrset.RRset:
    (soa,) = response.authority
    assert soa.rdtype == dns.rdatatype.SOA
    return soa


def the_ede(response: dns.message.Message) -> dns.edns.EDEOption:
    (ede,) = response.extended_errors()
    return ede


# ---------------------------------------------------------------- clean names pass


@pytest.mark.parametrize("edns", [False, 0])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("rdtype", [*TYPES, "MX"])
def test_clean_name_answer_equals_unbound(servers: Servers, rdtype: str, transport: str,
                                          edns: int | bool) -> None:
    send = TRANSPORTS[transport]
    message = query("clean.example", rdtype, use_edns=edns)
    via = send(message, servers.main.port)
    direct = send(message, servers.unbound.port)
    assert message.is_response(via)
    assert via.rcode() == direct.rcode() == dns.rcode.NOERROR
    assert via.flags == direct.flags
    assert via.answer == direct.answer
    assert via.authority == direct.authority
    assert via.extended_errors() == []
    if rdtype != "MX":
        assert via.answer, "unbound has data for this type"


def test_clean_values(servers: Servers) -> None:
    port = servers.main.port
    assert udp(query("clean.example", "A"), port).answer[0][0].address == "192.0.2.10"
    assert udp(query("clean.example", "AAAA"), port).answer[0][0].address == "2001:db8::10"
    assert udp(query("clean.test", "A"), port).answer[0][0].address == "192.0.2.40"
    https = udp(query("clean.example", "HTTPS"), port).answer[0]
    assert https.rdtype == dns.rdatatype.HTTPS and https[0].priority == 1


def test_clean_nxdomain_from_upstream_has_no_ede(servers: Servers) -> None:
    # Only deep.sub.blocked.invalid is listed, not its parent.
    response = udp(query("sub.blocked.invalid", use_edns=0), servers.main.port)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.extended_errors() == []


def test_local_exception_passes(servers: Servers) -> None:
    message = query("cleared.blocked.example", use_edns=0)
    via = udp(message, servers.main.port)
    assert via.rcode() == dns.rcode.NOERROR
    assert via.answer == udp(message, servers.unbound.port).answer
    assert via.answer[0][0].address == "192.0.2.30"


def test_url_host_routed_to_proxy(servers: Servers) -> None:
    routed = udp(query("partly.example", "A"), servers.routed.port)
    assert [r.address for r in routed.answer[0]] == [PROXY4]
    assert routed.answer[0].ttl == TTL
    # No proxy IPv6 address configured: AAAA is forwarded as it is.
    message = query("partly.example", "AAAA")
    assert (udp(message, servers.main.port).answer
            == udp(message, servers.unbound.port).answer == [])


# ---------------------------------------------------------------- the three actions


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("rdtype", TYPES)
@pytest.mark.parametrize(("name", "ref"), [("blocked.example", "DEMO-0001"),
                                           ("www.sub.Blocked.example", "DEMO-0001"),
                                           ("blocked.test", "DEMO-0002"),
                                           ("deep.sub.blocked.invalid", "DEMO-0008")])
def test_nxdomain_action(servers: Servers, name: str, ref: str, rdtype: str,
                         transport: str) -> None:
    message = query(name, rdtype, use_edns=0)
    response = TRANSPORTS[transport](message, servers.main.port)
    assert message.is_response(response)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.answer == []
    soa = soa_of(response)
    assert soa.ttl == TTL and soa[0].minimum == TTL
    assert dns.name.from_text(name).is_subdomain(soa.name)
    ede = the_ede(response)
    assert ede.code == EDE
    assert ede.text == f"Blocked by {DEMO_ISSUER}: list demo v1, entry {ref}"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("rdtype", "address"), [("A", STOP4), ("AAAA", STOP6),
                                                 ("TXT", None), ("HTTPS", None)])
@pytest.mark.parametrize("name", ["stop.example", "a.b.stop.example"])
def test_stoppage_action(servers: Servers, name: str, rdtype: str, address: str | None,
                         transport: str) -> None:
    response = TRANSPORTS[transport](query(name, rdtype, use_edns=0), servers.main.port)
    assert response.rcode() == dns.rcode.NOERROR
    if address is None:  # NODATA, with a SOA for negative caching
        assert response.answer == []
        soa = soa_of(response)
        assert soa.ttl == TTL and soa.name == dns.name.from_text("stop.example")
    else:
        (rrset,) = response.answer
        assert rrset.name == dns.name.from_text(name)
        assert rrset.ttl == TTL and [r.address for r in rrset] == [address]
    ede = the_ede(response)
    assert ede.code == EDE and "list stoplist v1, entry S-1" in (ede.text or "")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("rdtype", TYPES)
def test_refused_action(servers: Servers, rdtype: str, transport: str) -> None:
    response = TRANSPORTS[transport](query("x.refuse.example", rdtype, use_edns=0),
                                     servers.main.port)
    assert response.rcode() == dns.rcode.REFUSED
    assert response.answer == response.authority == []
    ede = the_ede(response)
    assert ede.code == EDE and ede.text == ("Blocked by Test Authority: "
                                            "list refuselist v1, entry R-1")


# ---------------------------------------------------------------- EDNS details


@pytest.mark.parametrize("option", [dns.edns.EDEOption(dns.edns.EDECode.OTHER),
                                    dns.edns.GenericOption(15, b"")], ids=["ede0", "empty"])
def test_structured_error_when_asked(servers: Servers, option: dns.edns.Option) -> None:
    response = udp(query("www.blocked.example", use_edns=0, options=[option]),
                   servers.main.port)
    ede = the_ede(response)
    assert ede.code == EDE
    data = json.loads(ede.text or "")
    assert set(data) == {"c", "j", "o"}
    assert data == {"c": DEMO_CONTACTS, "j": "list demo v1, entry DEMO-0001", "o": DEMO_ISSUER}


def test_no_opt_without_edns(servers: Servers) -> None:
    for send in TRANSPORTS.values():
        response = send(query("blocked.example", "A", use_edns=False), servers.main.port)
        assert response.rcode() == dns.rcode.NXDOMAIN
        assert response.edns == -1 and response.opt is None
        assert soa_of(response).ttl == TTL
        response = send(query("stop.example", "A", use_edns=False), servers.main.port)
        assert response.edns == -1 and response.answer[0][0].address == STOP4


def test_dnssec_ok_bit_mirrored(servers: Servers) -> None:
    response = udp(query("blocked.example", want_dnssec=True), servers.main.port)
    assert response.ednsflags & dns.flags.DO
    assert response.rcode() == dns.rcode.NXDOMAIN


def test_name_case_is_kept(servers: Servers) -> None:
    message = query("WwW.BlOcKeD.ExAmPlE", "A")
    response = udp(message, servers.main.port)
    assert response.question[0].name.to_text() == "WwW.BlOcKeD.ExAmPlE."
    assert response.rcode() == dns.rcode.NXDOMAIN


def test_responses_are_not_answered(servers: Servers) -> None:
    """A packet with QR set is dropped: no reflection loop between two resolvers."""
    response = dns.message.make_response(query("blocked.example", "A")).to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        sock.sendto(response, (HOST, servers.main.port))
        with pytest.raises(TimeoutError):
            sock.recv(4096)
    assert udp(query("clean.example"), servers.main.port).answer


@pytest.mark.parametrize("opcode", [dns.opcode.NOTIFY, dns.opcode.UPDATE, dns.opcode.STATUS])
def test_other_opcodes_not_implemented(servers: Servers, opcode: dns.opcode.Opcode) -> None:
    message = query("blocked.example", "SOA")
    message.set_opcode(opcode)
    response = udp(message, servers.main.port)
    assert response.rcode() == dns.rcode.NOTIMP
    assert response.opcode() == opcode and response.question == message.question


def test_unknown_edns_version_gets_badvers(servers: Servers) -> None:
    clean = udp(query("clean.example", use_edns=1), servers.main.port)
    assert clean.rcode() == dns.rcode.BADVERS
    blocked = udp(query("blocked.example", use_edns=1), servers.main.port)
    assert blocked.rcode() == dns.rcode.BADVERS


def test_cd_bit_copied_into_block_answers(servers: Servers) -> None:
    message = query("blocked.example", "A", use_edns=0)
    message.flags |= dns.flags.CD
    assert udp(message, servers.main.port).flags & dns.flags.CD


# ---------------------------------------------------------------- CNAME


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cname_to_blocked_target_is_blocked(servers: Servers, transport: str) -> None:
    send = TRANSPORTS[transport]
    direct = send(query("alias.clean.example", "A"), servers.unbound.port)
    assert direct.answer[0].rdtype == dns.rdatatype.CNAME  # what unbound would hand out
    response = send(query("alias.clean.example", "A", use_edns=0), servers.main.port)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.answer == []
    assert the_ede(response).text == f"Blocked by {DEMO_ISSUER}: list demo v1, entry DEMO-0001"
    assert soa_of(response).ttl == TTL


def test_cname_to_stoppage_target_gets_the_stop_address(servers: Servers) -> None:
    response = udp(query("alias3.clean.example", "A"), servers.main.port)
    assert response.rcode() == dns.rcode.NOERROR
    (rrset,) = response.answer
    assert rrset.name == dns.name.from_text("alias3.clean.example")
    assert [r.address for r in rrset] == [STOP4]


def test_clean_cname_passes(servers: Servers) -> None:
    message = query("alias2.clean.example", "A", use_edns=0)
    via = udp(message, servers.main.port)
    assert via.rcode() == dns.rcode.NOERROR
    assert via.answer == udp(message, servers.unbound.port).answer
    assert dns.rdatatype.CNAME in {r.rdtype for r in via.answer}


# ---------------------------------------------------------------- dig

DIG_NAMES = {"blocked": "blocked.example", "subdomain": "a.b.blocked.example",
             "clean": "clean.example"}


def _status(output: str) -> str:
    found = re.search(r"status: ([A-Z]+)", output)
    assert found, output
    return found.group(1)


def _ede_line(output: str) -> str:
    found = re.search(r"^; EDE: (.*)$", output, re.MULTILINE)
    assert found, output
    return found.group(1)


@pytest.mark.parametrize("tcp_flag", ["+notcp", "+tcp"])
@pytest.mark.parametrize("rdtype", ["A", "AAAA", "TXT", "TYPE65"])
@pytest.mark.parametrize("kind", DIG_NAMES)
def test_dig(servers: Servers, kind: str, rdtype: str, tcp_flag: str) -> None:
    name = DIG_NAMES[kind]
    out = dig(servers.main.port, name, rdtype, tcp_flag)
    if kind == "clean":
        assert _status(out) == "NOERROR"
        short = dig(servers.main.port, name, rdtype, tcp_flag, "+short")
        assert short.strip()
        assert short == dig(servers.unbound.port, name, rdtype, tcp_flag, "+short")
        assert "EDE" not in out
        return
    assert _status(out) == "NXDOMAIN"
    assert _ede_line(out) == (f"{EDE} (Filtered): (Blocked by {DEMO_ISSUER}: "
                              "list demo v1, entry DEMO-0001)")
    assert re.search(rf"^blocked\.example\.\s+{TTL}\s+IN\s+SOA\s", out, re.MULTILINE), out
    assert ("(TCP)" in out) == (tcp_flag == "+tcp")


def test_dig_structured_error(servers: Servers) -> None:
    out = dig(servers.main.port, "blocked.test", "AAAA", "+ednsopt=15")
    line = _ede_line(out)
    assert line.startswith(f"{EDE} (Filtered): (")
    data = json.loads(line[len(f"{EDE} (Filtered): (") : -1])
    assert data["j"] == "list demo v1, entry DEMO-0002" and data["o"] == DEMO_ISSUER
    assert data["c"] == DEMO_CONTACTS


def test_dig_without_edns(servers: Servers) -> None:
    out = dig(servers.main.port, "blocked.example", "A", "+noedns")
    assert _status(out) == "NXDOMAIN"
    assert "OPT PSEUDOSECTION" not in out and "EDE" not in out


def test_dig_stoppage_and_refused(servers: Servers) -> None:
    port = servers.main.port
    assert dig(port, "stop.example", "A", "+short").strip() == STOP4
    assert dig(port, "www.stop.example", "AAAA", "+short").strip() == STOP6
    out = dig(port, "refuse.example", "A")
    assert _status(out) == "REFUSED" and "entry R-1" in _ede_line(out)
    assert _status(dig(port, "alias.clean.example", "A")) == "NXDOMAIN"


# ---------------------------------------------------------------- TCP


def _receive(sock: socket.socket, count: int) -> dict[int, dns.message.Message]:
    answers: dict[int, dns.message.Message] = {}
    for _ in range(count):
        response, _ = dns.query.receive_tcp(sock, expiration=time.time() + 5)
        answers[response.id] = response
    return answers


def test_several_queries_on_one_tcp_connection(servers: Servers) -> None:
    asked = [("clean.example", "A", "192.0.2.10"), ("blocked.example", "A", None),
             ("stop.example", "A", STOP4), ("www.clean.example", "A", "192.0.2.11"),
             ("alias.clean.example", "A", None), ("big.clean.example", "TXT", "txt"),
             ("refuse.example", "A", None), ("clean.example", "AAAA", "2001:db8::10")]
    messages = []
    for number, (name, rdtype, _) in enumerate(asked):
        message = query(name, rdtype)
        message.id = 1000 + number
        messages.append(message)
    with socket.create_connection((HOST, servers.main.port), timeout=5) as sock:
        # One after the other, then all at once (pipelined; answers may come in any order).
        for message in messages[:3]:
            dns.query.send_tcp(sock, message)
            assert _receive(sock, 1)[message.id].id == message.id
        for message in messages:
            dns.query.send_tcp(sock, message)
        answers = _receive(sock, len(messages))
    assert sorted(answers) == [m.id for m in messages]
    for message, (_, _, expected) in zip(messages, asked, strict=True):
        response = answers[message.id]
        assert message.is_response(response)
        if expected is None:
            assert response.rcode() in (dns.rcode.NXDOMAIN, dns.rcode.REFUSED)
        elif expected == "txt":
            assert len(response.answer[0]) == len(BIG_TXT)
        else:
            assert response.answer[-1][0].address == expected


# ---------------------------------------------------------------- truncation


def test_big_answer_truncated_over_udp_without_edns(servers: Servers) -> None:
    message = query("big.clean.example", "TXT", use_edns=False)
    response = udp(message, servers.main.port)
    assert response.flags & dns.flags.TC
    assert message.is_response(response)
    assert response.answer == []


def test_big_answer_whole_with_edns_or_tcp(servers: Servers) -> None:
    port = servers.main.port
    with_edns = udp(query("big.clean.example", "TXT", use_edns=0, payload=1232), port)
    over_tcp = tcp(query("big.clean.example", "TXT", use_edns=False), port)
    for response in (with_edns, over_tcp):
        assert not response.flags & dns.flags.TC
        texts = sorted(b"".join(r.strings).decode() for r in response.answer[0])
        assert texts == sorted(BIG_TXT)


def test_huge_answer_over_tcp_comes_whole(servers: Servers) -> None:
    port = servers.main.port
    assert udp(query("huge.clean.example", "TXT", use_edns=0), port).flags & dns.flags.TC
    for edns in (False, 0):
        response = tcp(query("huge.clean.example", "TXT", use_edns=edns), port)
        assert not response.flags & dns.flags.TC
        assert len(response.to_wire()) > 1232
        texts = sorted(b"".join(r.strings).decode() for r in response.answer[0])
        assert texts == sorted(HUGE_TXT)


def test_dig_truncation(servers: Servers) -> None:
    port = servers.main.port
    out = dig(port, "big.clean.example", "TXT", "+noedns", "+ignore")
    flags = re.search(r"flags: ([a-z ]+);", out)
    assert flags and "tc" in flags.group(1).split(), out
    out = dig(port, "huge.clean.example", "TXT", "+tcp")
    assert out.count("huge-") == len(HUGE_TXT)


# ---------------------------------------------------------------- upstream trouble


def _timed(send: Send, message: dns.message.Message, port: int) -> tuple[dns.message.Message,
                                                                          float]:
    start = time.monotonic()
    response = send(message, port, timeout=BROKEN_TIMEOUT + 4)
    return response, time.monotonic() - start


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("which", ["dead", "silent"])
def test_servfail_when_upstream_down(servers: Servers, which: str, transport: str) -> None:
    server: Netfilter = getattr(servers, which)
    message = query("clean.example", "A", use_edns=0)
    response, elapsed = _timed(TRANSPORTS[transport], message, server.port)
    assert response.rcode() == dns.rcode.SERVFAIL
    assert message.is_response(response)
    assert elapsed < BROKEN_TIMEOUT + 1  # a bound on a hang, not a performance figure
    if which == "silent":
        assert elapsed > BROKEN_TIMEOUT / 3  # it did wait for the upstream


def test_servfail_for_many_queries_at_once(servers: Servers) -> None:
    port = servers.silent.port
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(BROKEN_TIMEOUT + 2)
        ids = set()
        start = time.monotonic()
        for number in range(50):
            message = query(f"n{number}.clean.example", "A")
            message.id = 2000 + number
            ids.add(message.id)
            sock.sendto(message.to_wire(), (HOST, port))
        seen = set()
        while seen != ids:
            response = dns.message.from_wire(sock.recv(4096))
            assert response.rcode() == dns.rcode.SERVFAIL
            seen.add(response.id)
        assert time.monotonic() - start < BROKEN_TIMEOUT + 1


def test_blocked_names_need_no_upstream(servers: Servers) -> None:
    response, elapsed = _timed(udp, query("blocked.example", "A"), servers.dead.port)
    assert response.rcode() == dns.rcode.NXDOMAIN and elapsed < 1


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("which", ["failover", "failover_dead"])
def test_second_upstream_answers(servers: Servers, which: str, transport: str) -> None:
    server: Netfilter = getattr(servers, which)
    response, elapsed = _timed(TRANSPORTS[transport], query("clean.example", "A"), server.port)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer[0][0].address == "192.0.2.10"
    assert elapsed < BROKEN_TIMEOUT + 1


def test_dig_servfail(servers: Servers) -> None:
    assert _status(dig(servers.dead.port, "clean.example", "A")) == "SERVFAIL"


# ---------------------------------------------------------------- events


def _events_matching(server: Netfilter, **fields: object) -> list[dict[str, Any]]:
    return [e for e in read_events(server.events_path)
            if all(e.get(k) == v for k, v in fields.items())]


def test_block_event(servers: Servers) -> None:
    server = servers.main
    label = "evt-7f3a9c"
    response = udp(query(f"{label}.blocked.test", "SRV", use_edns=0), server.port)
    assert response.rcode() == dns.rcode.NXDOMAIN
    wanted = {"type": "block", "ref": "DEMO-0002", "detail": "SRV"}
    assert wait_for(lambda: _events_matching(server, **wanted)), read_events(server.events_path)
    (event,) = _events_matching(server, **wanted)
    assert event["frontend"] == "dns"
    assert event["list"] == "demo" and event["version"] == 1
    assert event["client"] == "127.0.0.0/24"
    assert event["action"] == "block" and event["node"] == "dns-test"
    text = server.events_path.read_text(encoding="utf-8")
    assert label not in text and "blocked.test" not in text and "127.0.0.1" not in text


def test_cname_block_and_override_events(servers: Servers) -> None:
    server = servers.main
    udp(query("alias.clean.example", "NAPTR"), server.port)
    wanted = {"type": "block", "ref": "DEMO-0001", "detail": "NAPTR via CNAME"}
    assert wait_for(lambda: _events_matching(server, **wanted))
    assert "alias" not in server.events_path.read_text(encoding="utf-8")
    udp(query("cleared.blocked.example", "A"), server.port)
    wanted = {"type": "override", "ref": "DEMO-0001", "detail": "exception=APPEAL-2026-001"}
    assert wait_for(lambda: _events_matching(server, **wanted))
    assert all(e["client"] == "127.0.0.0/24" for e in _events_matching(server, **wanted))


def test_list_loaded_events(servers: Servers) -> None:
    loaded = {e["list"] for e in _events_matching(servers.main, type="list-loaded")}
    assert loaded == {"demo", "stoplist", "refuselist"}


# ---------------------------------------------------------------- malformed input


def _seeds() -> list[bytes]:
    seeds = []
    for name in ("blocked.example", "www.clean.example", "stop.example", "refuse.example",
                 "alias.clean.example", "big.clean.example", "x.y.z.example", "."):
        for rdtype in ("A", "AAAA", "TXT", "HTTPS", "ANY"):
            seeds.append(query(name, rdtype).to_wire())
        seeds.append(query(name, "A", use_edns=0, payload=4096).to_wire())
        seeds.append(query(name, "AAAA", want_dnssec=True,
                           options=[dns.edns.EDEOption(dns.edns.EDECode.OTHER)]).to_wire())
    seeds.append(bytes(DNSRecord.question("blocked.test", "MX").pack()))
    return seeds


def _labels(rng: random.Random) -> bytes:
    out = b""
    for _ in range(rng.randint(1, 6)):
        label = rng.randbytes(rng.randint(1, 80 if rng.random() < 0.1 else 63))
        out += bytes([len(label)]) + label
    return out + b"\x00"


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    """One fuzzed message from a real query: flips, cuts, random labels, pointers, ..."""
    data = bytearray(rng.choice(seeds))
    kind = rng.randrange(11)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        del data[rng.randrange(len(data)) :]
    elif kind == 2:  # random bytes of a random length
        data = bytearray(rng.randbytes(rng.randrange(0, 700)))
    elif kind == 3:  # random label bytes and lengths in the question
        data = data[:12] + bytearray(_labels(rng) + struct.pack("!HH", rng.randrange(65536),
                                                                rng.choice([1, 3, 255])))
        data[4:12] = struct.pack("!HHHH", 1, 0, 0, 0)
    elif kind == 4:  # a compression pointer somewhere after the header
        at = rng.randrange(12, len(data) - 1)
        data[at : at + 2] = struct.pack("!H", 0xC000 | rng.randrange(len(data) + 32))
    elif kind == 5:  # wrong counts
        data[4:12] = struct.pack("!HHHH", *(rng.choice([0, 1, 2, 7, 255, 65535])
                                            for _ in range(4)))
    elif kind == 6:  # trailing bytes
        data += rng.randbytes(rng.randint(1, 64))
    elif kind == 7:  # header flags: opcode, QR, Z, rcode
        data[2], data[3] = rng.randrange(256), rng.randrange(256)
    elif kind == 8:  # one more (possibly broken) OPT record
        arcount = struct.unpack_from("!H", data, 10)[0]
        option = struct.pack("!HH", rng.choice([10, 15, 8, 65001]), rng.randrange(12))
        data[10:12] = struct.pack("!H", arcount + 1)
        data += b"\x00" + struct.pack("!HHIH", 41, rng.randrange(65536), 0, len(option) + 2)
        data += option + rng.randbytes(2)
    elif kind == 9:  # random bytes overwritten
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    else:  # a label length byte changed
        data[12] = rng.randrange(256)
    return bytes(data)


def malformed(rng: random.Random, seeds: list[bytes]) -> bytes:
    """A query with a readable header that is malformed by construction (QR clear)."""
    data = bytearray(rng.choice(seeds))
    question_end = data.index(0, 12) + 5  # the seeds have no pointers in the question
    kind = rng.randrange(6)
    if kind == 0:  # question count not one
        data[4:6] = struct.pack("!H", rng.choice([0, 2, 3, 65535]))
    elif kind == 1:  # cut inside the question
        del data[rng.randrange(13, question_end) :]
    elif kind == 2:  # a pointer in the question name
        data[12 : question_end - 4] = b"\x03abc\xc0\x0c"
    elif kind == 3:  # a label length that is no length
        data[12] = rng.randrange(64, 192)
    elif kind == 4:  # junk after the last record
        data += rng.randbytes(rng.randint(1, 64))
    else:  # an answer record announced, none there
        data[6:8] = b"\x00\x01"
    data[2] &= 0x7F  # a query
    return bytes(data)


def _assert_server_healthy(server: Netfilter) -> None:
    assert server.alive(), server.log()
    response = udp(query("clean.example", "A"), server.port)
    assert response.answer[0][0].address == "192.0.2.10"
    response = tcp(query("blocked.example", "A", use_edns=0), server.port)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert the_ede(response).code == EDE


def test_udp_fuzz(servers: Servers) -> None:
    server = servers.fuzz
    rng = random.Random(0x5EED)
    seeds = _seeds()
    sent = answers = formerr = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)

        def drain() -> None:
            nonlocal answers, formerr
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    return
                answers += 1
                if len(data) >= 4 and data[3] & 0xF == dns.rcode.FORMERR:
                    formerr += 1

        for number in range(4000):
            packet = mutate(rng, seeds) if number % 10 else rng.randbytes(rng.randrange(64))
            try:
                sock.sendto(packet, (HOST, server.port))
                sent += 1
            except BlockingIOError:
                pass
            if number % 25 == 24:
                drain()
                time.sleep(0.001)  # leave the server a moment: fuzz it, not the kernel
        for _ in range(50):  # what is still in flight: up to 1 s
            time.sleep(0.02)
            drain()
    print(f"udp fuzz: {sent} sent, {answers} answers, {formerr} FORMERR")
    assert sent > 3900
    assert answers > 0 and formerr > 0
    _assert_server_healthy(server)

    # A sample of queries with readable headers, malformed by construction: each one is
    # answered FORMERR with its own id (one resend allowed: this is UDP).
    sample = [malformed(rng, seeds) for _ in range(200)]
    answered = Counter[str]()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        for packet in sample:
            for _ in range(2):
                sock.sendto(packet, (HOST, server.port))
                try:
                    reply = sock.recv(65535)
                except TimeoutError:
                    continue
                if reply[:2] == packet[:2]:
                    break
            else:
                answered["none"] += 1
                continue
            response = dns.message.from_wire(reply)
            assert response.flags & dns.flags.QR
            answered[dns.rcode.to_text(response.rcode())] += 1
    assert answered == Counter({"FORMERR": len(sample)})
    _assert_server_healthy(server)


async def _tcp_session(port: int, messages: list[bytes]) -> list[bytes]:
    reader, writer = await asyncio.open_connection(HOST, port)
    expected = sum(len(m) >= 12 and not m[2] & 0x80 for m in messages)
    answers: list[bytes] = []
    try:
        for message in messages:
            writer.write(struct.pack("!H", len(message)) + message)
        await writer.drain()
        async with asyncio.timeout(BROKEN_TIMEOUT + 4):
            while len(answers) < expected:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
                answers.append(await reader.readexactly(length))
    finally:
        writer.close()
    return answers


def test_tcp_fuzz(servers: Servers) -> None:
    server = servers.fuzz
    rng = random.Random(0xF00D)
    seeds = _seeds()
    sessions = []
    for number in range(12):
        messages = [mutate(rng, seeds) for _ in range(25)]
        big = bytearray(rng.choice(seeds))
        if number % 3 == 0:  # a real query padded to the largest TCP message
            big += rng.randbytes(65535 - len(big))
        elif number % 3 == 1:  # random bytes behind a query header
            big = big[:12] + rng.randbytes(65535 - 12)
            big[2] &= 0x7F
        else:  # a question with the most records a 64 KiB message holds
            big[10:12] = b"\xff\xff"
            big += b"\x00" * (65535 - len(big))
        messages.insert(rng.randrange(len(messages)), bytes(big))
        messages.append(malformed(rng, seeds))
        sessions.append(messages)

    async def run_all() -> list[list[bytes]]:
        return await asyncio.gather(*(_tcp_session(server.port, m) for m in sessions))

    results = asyncio.run(run_all())
    total = 0
    for messages, answers in zip(sessions, results, strict=True):
        wanted = Counter(m[:2] for m in messages if len(m) >= 12 and not m[2] & 0x80)
        assert Counter(a[:2] for a in answers) == wanted  # one answer each, ids kept
        for answer in answers:
            assert len(answer) >= 12 and answer[2] & 0x80
        total += len(messages)
        big = next(m for m in messages if len(m) == 65535)
        reply = next(a for a in answers if a[:2] == big[:2])
        assert reply[3] & 0xF == dns.rcode.FORMERR
    assert total >= 300
    _assert_server_healthy(server)


def test_tcp_garbage_framing(servers: Servers) -> None:
    server = servers.fuzz
    with socket.create_connection((HOST, server.port), timeout=3) as sock:
        sock.sendall(b"\xff\xff" + b"\x00" * 100)  # announces 65535 bytes, sends 100
    with socket.create_connection((HOST, server.port), timeout=3) as sock:
        sock.sendall(b"\x00")  # half a length prefix
    with socket.create_connection((HOST, server.port), timeout=3) as sock:
        sock.sendall(b"\x00\x00" * 5)  # empty messages: dropped
    _assert_server_healthy(server)


@pytest.mark.parametrize("case", ["additional A, no EDNS", "bad A rdata with EDNS"])
def test_blocked_query_with_extra_records_is_answered(servers: Servers, case: str) -> None:
    if case == "additional A, no EDNS":
        message = query("blocked.example", "A", use_edns=False)
        message.additional.append(dns.rrset.from_text("x.example.", 60, "IN", "A",
                                                      "192.0.2.1"))
        wire = message.to_wire()
    else:
        wire = bytearray(query("blocked.example", "A", use_edns=0).to_wire())
        wire[10:12] = b"\x00\x02"
        wire += b"\x00" + struct.pack("!HHIH", 1, 1, 0, 3) + b"\x01\x02\x03"
        wire = bytes(wire)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        sock.sendto(wire, (HOST, servers.fuzz.port))
        try:
            reply = sock.recv(65535)
        except TimeoutError:
            reply = b""
    assert reply[:2] == wire[:2], "no answer"
    assert reply[3] & 0xF in (dns.rcode.NXDOMAIN, dns.rcode.FORMERR)


def test_tcp_closes_promptly_after_a_dropped_message(servers: Servers) -> None:
    response = dns.message.make_response(query("clean.example", "A")).to_wire()
    good = query("clean.example", "A").to_wire()
    with socket.create_connection((HOST, servers.fuzz.port), timeout=5) as sock:
        sock.sendall(struct.pack("!H", len(response)) + response
                     + struct.pack("!H", len(good)) + good)
        sock.shutdown(socket.SHUT_WR)
        start = time.monotonic()
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        elapsed = time.monotonic() - start
    assert len(received) > 2  # the good query was answered
    assert elapsed < BROKEN_TIMEOUT / 2


# ---------------------------------------------------------------- stopping


def test_sigterm_stops_cleanly(servers: Servers, tmp_path: Path) -> None:
    server = Netfilter(tmp_path / "short-lived", upstreams=[servers.unbound.address])
    server.start()
    try:
        assert udp(query("clean.example", "A"), server.port).answer
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(5) == 0
    finally:
        server.stop()
    assert "Traceback" not in server.log()
    assert "serving dns" in server.log()


def test_clean_names_take_the_fast_path(servers: Servers, tmp_path: Path) -> None:
    """The second query for a clean name is relayed without the full path, and later
    ones are answered from the relay's answer cache; a blocked name's first query takes
    the full path, its repeats are answered from the relay's block cache and still
    counted as blocks. Read from the counters the server logs when it stops."""
    server = Netfilter(tmp_path / "counted", upstreams=[servers.unbound.address],
                       env=servers.main.env)
    server.start()
    try:
        for _ in range(20):
            assert udp(query("clean.example", "A"), server.port).answer
            assert udp(query("blocked.example", "A"), server.port).rcode() == dns.rcode.NXDOMAIN
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(5) == 0
    finally:
        server.stop()
    found = re.search(r"dns: stopped; (.*)", server.log())
    assert found, server.log()
    counts = {k: int(v) for k, v in (item.split() for item in found.group(1).split(", "))}
    probes = counts.get("notimp", 0)  # the readiness probes (STATUS queries)
    if "relayed" in counts:  # the C relay: the first of each name takes the full path,
        assert counts["relayed"] == counts["answered"] == 1  # the second is relayed,
        assert counts["cache_hits"] == 18  # the rest answered from the caches
        assert counts["blocks_answered"] == 19
        assert counts["handed_over"] == counts["queries"] == 2 + probes
        assert counts["forwarded"] == 1
    else:  # the Python listener counts every query, the fast ones too
        assert counts["forwarded"] == 20
        assert counts["queries"] == 40 + probes
    assert counts["blocked"] == 20


@pytest.mark.skipif(not IPV6, reason="no IPv6 loopback (::1) on this machine")
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ipv6_listener(servers: Servers, transport: str) -> None:
    send = dns.query.udp if transport == "udp" else dns.query.tcp
    for _ in range(2):  # the second time from the host cache (the relay, where built)
        clean = send(query("clean.example", "AAAA"), "::1", port=servers.main.port, timeout=5)
        assert clean.answer[0][0].address == "2001:db8::10"
    blocked = send(query("blocked.example", "A"), "::1", port=servers.main.port, timeout=5)
    assert blocked.rcode() == dns.rcode.NXDOMAIN


def test_sigterm_with_an_open_tcp_connection(servers: Servers, tmp_path: Path) -> None:
    server = Netfilter(tmp_path / "short-lived", upstreams=[servers.unbound.address])
    server.start()
    try:
        with socket.create_connection((HOST, server.port), timeout=3):
            assert tcp(query("clean.example", "A"), server.port).answer
            time.sleep(0.1)  # the server has accepted the idle connection
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(5) == 0
    finally:
        server.stop()
    assert "Traceback" not in server.log()
