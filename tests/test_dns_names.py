"""DNS names with any octets: a label may hold a dot, NUL, a backslash or bytes that are
no UTF-8 (RFC 2181 11), up to 63 octets, up to 255 per name. Every name the wire parser
accepts gets its answer, with the question echoed byte for byte: checked on answers.py
over arbitrary labels, and against a real `netfilter serve dns` with dnspython and dig."""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from netfilter.config import DnsSettings
from netfilter.dns.answers import block_answer, extra_text, route_answer
from netfilter.dns.udp import relay_built
from netfilter.dns.wire import FormError, parse_query
from netfilter.engine import Action, Answer, Verdict
from netfilter.listfile import Transparency
from netfilter.matcher import Match
from tests.dns_support import (
    DEMO_LIST,
    DEMO_PUB,
    HOST,
    Netfilter,
    Unbound,
    dig,
    require_tools,
    start_all,
)

HEADER = struct.Struct("!HHHHHH")
STOP4, STOP6 = "192.0.2.99", "2001:db8::99"
TTL = 61
SETTINGS = DnsSettings(block_ttl=TTL, stoppage_ipv4=STOP4, stoppage_ipv6=STOP6, ede=16,
                       route_url_hosts_to_proxy=True, proxy_ipv4="192.0.2.80",
                       proxy_ipv6="2001:db8::80")
TRANSPARENCY = Transparency(issuer="Test Authority", contact="mailto:a@authority.test",
                            appeal_url="https://appeals.authority.test/")

# Labels that broke or could break a text round trip: not UTF-8 (dig's '\217ww' and
# '\143ww'), a dot, NUL, backslash, space, '@', a longest label, UTF-8 proper.
ODD_LABELS = [b"\xd9ww", b"\x8fww", b"a.b", b".", b"\x00", b"\x00\x00.", b"\\", b"\\046",
              b" ", b"@", b"\xff" * 63, b"\xc3\xbc", b"\x80" * 7, b"XN--\xff"]


def name_wire(labels: list[bytes]) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def query_wire(labels: list[bytes], qtype: int = 1, *, qid: int = 0x4242, cd: bool = False,
               edns: bool = True, do: bool = False, structured: bool = False) -> bytes:
    flags = 0x0100 | (0x0010 if cd else 0)
    wire = HEADER.pack(qid, flags, 1, 0, 0, int(edns)) + name_wire(labels)
    wire += struct.pack("!HH", qtype, 1)
    if edns:
        option = struct.pack("!HHH", 15, 2, 0) if structured else b""
        wire += b"\x00" + struct.pack("!HHBBHH", 41, 1232, 0, 0, 0x8000 if do else 0,
                                      len(option)) + option
    return wire


def longest_name(tail: list[bytes]) -> list[bytes]:
    """Labels before `tail` that make the name exactly 255 octets on the wire."""
    room = 255 - len(name_wire(tail))
    labels = []
    while room > 1:
        size = min(63, room - 1)
        labels.append(b"\xfe" * size)
        room -= size + 1
    return labels + tail


def _fit(labels: list[bytes]) -> list[bytes]:
    """The longest prefix of labels whose name fits in 255 octets."""
    kept: list[bytes] = []
    for label in labels:
        if len(name_wire([*kept, label])) > 255:
            break
        kept.append(label)
    return kept


labels_strategy = st.lists(
    st.one_of(st.binary(min_size=1, max_size=63), st.sampled_from(ODD_LABELS),
              st.sampled_from([b"www", b"blocked", b"example", b"BlOcKeD"])),
    max_size=12,
).map(_fit)


def _verdict(answer: Answer, zone: str) -> Verdict:
    match = Match(list_id="t", list_version=2, ref="T-1", category="c", kind="domain",
                  source="authority", expression=f"{zone}/")
    return Verdict(Action.BLOCK, match, answer, TRANSPARENCY)


def _check_answer(raw: bytes, out: bytes, labels: list[bytes], rcode: int,
                  edns: bool) -> dns.message.Message:
    """What every answer to `raw` must be: its id, the question as sent, parseable."""
    end = parse_query(raw).question_end
    assert out[:2] == raw[:2]
    assert out[12:end] == raw[12:end]  # the question, byte for byte
    response = dns.message.from_wire(out)
    assert response.question[0].name.labels == (*labels, b"")
    assert response.rcode() == rcode
    assert response.flags & dns.flags.QR and response.flags & dns.flags.RA
    assert (response.edns == 0) is edns
    return response


@given(labels_strategy, st.sampled_from([1, 28, 16, 65, 255]), st.integers(0, 12),
       st.sampled_from(["none", "plain", "structured", "dnssec"]), st.booleans())
@example([b"\xd9ww", b"blocked", b"example"], 1, 1, "plain", False)
@example(longest_name([b"blocked", b"example"]), 16, 4, "structured", True)
def test_block_answer_for_any_label_bytes(labels: list[bytes], qtype: int, cut: int,
                                          opt: str, cd: bool) -> None:
    edns, structured, do = opt != "none", opt == "structured", opt == "dnssec"
    raw = query_wire(labels, qtype, edns=edns, do=do, structured=structured, cd=cd)
    query = parse_query(raw)
    # The blocked domain: the name itself or one of its suffixes, or (blocked through
    # a CNAME) a name it is not below.
    parts = query.name.split(".") if labels else []
    cut = min(cut, len(parts))
    zone = ".".join(parts[cut:]) if cut < len(parts) else "cname-target.example"
    owner = dns.name.Name((*labels[cut:], b"")) if cut < len(parts) else dns.name.Name(
        (*labels, b""))
    for answer, rcode in [(Answer.NXDOMAIN, dns.rcode.NXDOMAIN),
                          (Answer.REFUSED, dns.rcode.REFUSED),
                          (Answer.STOPPAGE, dns.rcode.NOERROR)]:
        verdict = _verdict(answer, zone)
        out = block_answer(raw, query, verdict, SETTINGS)
        response = _check_answer(raw, out, labels, rcode, edns)
        assert bool(response.flags & dns.flags.CD) is cd
        if answer is Answer.STOPPAGE and qtype in (1, 28):
            (rrset,) = response.answer
            assert rrset.name.labels == (*labels, b"") and rrset.ttl == TTL
            assert [r.address for r in rrset] == [STOP4 if qtype == 1 else STOP6]
            assert response.authority == []
        elif answer is Answer.REFUSED:
            assert response.answer == response.authority == []
        else:
            (soa,) = response.authority
            assert soa.rdtype == dns.rdatatype.SOA and soa.name == owner
            assert soa.ttl == TTL and soa[0].minimum == TTL
        if edns:
            (ede,) = response.extended_errors()
            assert ede.code == 16 and ede.text == extra_text(verdict, structured)
            assert bool(response.ednsflags & dns.flags.DO) is do
    routed = route_answer(raw, query, SETTINGS)
    assert (routed is None) is (qtype not in (1, 28))
    if routed is not None:
        response = _check_answer(raw, routed, labels, dns.rcode.NOERROR, edns)
        assert response.answer[0].name.labels == (*labels, b"")
        assert response.extended_errors() == []


@given(st.binary(max_size=300), st.binary(max_size=16))
def test_whatever_the_parser_accepts_is_answered(name: bytes, tail: bytes) -> None:
    raw = HEADER.pack(1, 0x0100, 1, 0, 0, 0) + name + tail
    try:
        query = parse_query(raw)
    except FormError:
        return
    parts = query.name.split(".")
    for zone in (query.name, parts[-1], "elsewhere.example"):
        for answer in Answer:
            out = block_answer(raw, query, _verdict(answer, zone), SETTINGS)
            assert out[12 : query.question_end] == raw[12 : query.question_end]
            dns.message.from_wire(out)


# ---------------------------------------------------------------- a real server


@dataclass
class Rig:
    unbound: Unbound
    server: Netfilter


@pytest.fixture(scope="module", params=["relay", "python"])
def rig(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_tools("unbound", "dig")
    if request.param == "relay" and not relay_built():
        pytest.skip("the C extension netfilter.dns._hotpath was not built: only the "
                    "Python listener runs")
    env = {"NETFILTER_DNS_PYTHON": "1"} if request.param == "python" else {}
    base = tmp_path_factory.mktemp(f"dns-names-{request.param}")
    (base / "unbound").mkdir()
    unbound = Unbound(base / "unbound")
    unbound.start()
    server = Netfilter(base / "netfilter", upstreams=[unbound.address], env=env,
                       lists=[{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)],
                               "action": "stoppage"}],
                       block_ttl=TTL, stoppage_ipv4=STOP4, stoppage_ipv6=STOP6)
    try:
        start_all([server])
        yield Rig(unbound, server)
    finally:
        server.stop()
        unbound.stop()
        log = server.log()
        assert "Traceback" not in log, log


def _exchange(raw: bytes, port: int, tcp: bool) -> bytes:
    if tcp:
        with socket.create_connection((HOST, port), timeout=3) as sock:
            sock.sendall(struct.pack("!H", len(raw)) + raw)
            head = sock.recv(2, socket.MSG_WAITALL)
            (length,) = struct.unpack("!H", head)
            return sock.recv(length, socket.MSG_WAITALL)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(raw, (HOST, port))
        return sock.recv(65535)


SERVER_NAMES = [[label, b"blocked", b"example"] for label in ODD_LABELS] + [
    [b"w\xffw", b"sub\x00", b"blocked", b"test"],
    longest_name([b"blocked", b"example"]),
]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("labels", SERVER_NAMES, ids=lambda ls: repr(b".".join(ls))[:40])
def test_server_blocks_any_label_bytes(rig: Rig, labels: list[bytes], tcp: bool) -> None:
    ref = "DEMO-0002" if labels[-1] == b"test" else "DEMO-0001"
    zone = dns.name.Name((*labels[-2:], b""))
    for qtype, structured in [(1, False), (28, True), (16, False)]:
        raw = query_wire(labels, qtype, structured=structured, do=structured)
        out = _exchange(raw, rig.server.port, tcp)
        response = _check_answer(raw, out, labels, dns.rcode.NOERROR, True)
        if qtype == 16:
            (soa,) = response.authority
            assert soa.name == zone and soa.ttl == TTL
        else:
            (rrset,) = response.answer
            assert [r.address for r in rrset] == [STOP4 if qtype == 1 else STOP6]
        (ede,) = response.extended_errors()
        assert ede.code == 16 and ref in (ede.text or "")


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_server_forwards_clean_odd_names(rig: Rig, tcp: bool) -> None:
    labels = [b"\xd9w.w", b"Clean", b"example"]
    raw = query_wire(labels, 1)
    out = _exchange(raw, rig.server.port, tcp)
    response = _check_answer(raw, out, labels, dns.rcode.NXDOMAIN, True)  # unbound's
    assert response.extended_errors() == []


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_dig_with_a_label_that_is_no_utf8(rig: Rig, transport: str) -> None:
    out = dig(rig.server.port, r"\217ww.blocked.example", "A", transport)
    assert re.search(r"status: NOERROR", out), out
    assert re.search(rf"^\\217ww\.blocked\.example\.\s+{TTL}\s+IN\s+A\s+{STOP4}$", out,
                     re.MULTILINE), out
    assert re.search(r"^; EDE: 16 \(Censored\): \(.*DEMO-0001\)$", out, re.MULTILINE), out
    assert "WARNING" not in out and "bad packet" not in out
    out = dig(rig.server.port, r"a\.b\000.blocked.example", "TXT", transport)
    assert re.search(r"status: NOERROR", out), out
    assert re.search(rf"^blocked\.example\.\s+{TTL}\s+IN\s+SOA\s", out, re.MULTILINE), out
    assert re.search(r"^;a\\\.b\\000\.blocked\.example\.\s+IN\s+TXT$", out, re.MULTILINE), out
