"""The resolver's fast-path reads: the C extension (netfilter.dns._hotpath) against its
pure-Python twins in wire.py, and both against the full parser (parse_query,
cname_targets), on real packets from dnspython and on thousands of mutated ones."""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Callable, Iterator

import dns.edns
import dns.message
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netfilter.dns.wire import (
    FormError,
    cname_targets,
    parse_query,
    py_answer_is_plain,
    py_scan_question,
)
from tests.dns_support import mutate

_hotpath = pytest.importorskip(
    "netfilter.dns._hotpath",
    reason="the C extension netfilter.dns._hotpath was not built (no C compiler at install); "
           "the resolver then uses the Python twins, tested below against the full parser")

HEADER = struct.Struct("!HHHHHH")
FIXED = struct.Struct("!HHIH")


def query(name: str, rdtype: str = "A", **kwargs: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()


def response(qname: str, *records: tuple[str, str, str], rdtype: str = "A") -> bytes:
    message = dns.message.make_response(dns.message.make_query(qname, rdtype))
    for owner, kind, rdata in records:
        message.answer.append(dns.rrset.from_text(owner, 300, "IN", kind, rdata))
    return message.to_wire()


def labels(*parts: bytes) -> bytes:
    return b"".join(bytes([len(p)]) + p for p in parts) + b"\x00"


# ---------------------------------------------------------------- question()


@pytest.mark.parametrize(("wire", "expected"), [
    (query("www.clean.example", use_edns=False), ("www.clean.example", 1, 35, 512)),
    (query("WwW.Clean.EXAMPLE", "AAAA", use_edns=0, payload=1232),
     ("www.clean.example", 28, 35, 1232)),
    (query("a-b_c.example", "HTTPS", use_edns=0, payload=100), ("a-b_c.example", 65, 31, 512)),
    (query("x.example", "TXT", want_dnssec=True, payload=4096), ("x.example", 16, 27, 4096)),
    (query("x.example", "A", use_edns=0,
           options=[dns.edns.EDEOption(dns.edns.EDECode.OTHER)]), ("x.example", 1, 27, 1232)),
])
def test_question_of_common_queries(wire: bytes, expected: tuple[str, int, int, int]) -> None:
    assert _hotpath.question(wire) == expected
    assert py_scan_question(wire) == expected


def _not_fast() -> dict[str, bytes]:
    """Well-formed or not, each of these must take the full path."""
    name = labels(b"clean", b"example")
    plain = query("clean.example", use_edns=False)
    edns = query("clean.example", use_edns=0)
    return {
        "response": plain[:2] + bytes([plain[2] | 0x80]) + plain[3:],
        "notify opcode": plain[:2] + bytes([plain[2] | 0x20]) + plain[3:],
        "class CH": HEADER.pack(1, 0x100, 1, 0, 0, 0) + name + b"\x00\x10\x00\x03",
        "class ANY": HEADER.pack(1, 0x100, 1, 0, 0, 0) + name + b"\x00\x01\x00\xff",
        "root name": HEADER.pack(1, 0x100, 1, 0, 0, 0) + b"\x00\x00\x02\x00\x01",
        "star label": query("*.clean.example", use_edns=False),
        "escaped byte": HEADER.pack(1, 0x100, 1, 0, 0, 0) + labels(b"a.b", b"example")
                        + b"\x00\x01\x00\x01",
        "pointer": HEADER.pack(1, 0x100, 1, 0, 0, 0) + b"\x05clean\xc0\x0c\x00\x01\x00\x01",
        "edns version 1": query("clean.example", use_edns=1),
        "trailing byte": plain + b"\x00",
        "cut": plain[:-1],
        "two questions": HEADER.pack(1, 0x100, 2, 0, 0, 0) + (name + b"\x00\x01\x00\x01") * 2,
        "answer record": HEADER.pack(1, 0x100, 1, 1, 0, 0) + name + b"\x00\x01\x00\x01"
                         + b"\xc0\x0c" + FIXED.pack(1, 1, 0, 4) + b"\x01\x02\x03\x04",
        "non-OPT additional": HEADER.pack(1, 0x100, 1, 0, 0, 1) + name + b"\x00\x01\x00\x01"
                              + b"\x00" + FIXED.pack(1, 1, 0, 0),
        "OPT length wrong": edns[:-1] + b"\x01",
        "OPT option cut": edns[:-2] + b"\x00\x03" + b"\x00\x0f\x00",
        "name of 256 octets": HEADER.pack(1, 0x100, 1, 0, 0, 0)
                              + b"".join(bytes([63]) + b"x" * 63 for _ in range(4))
                              + b"\x00\x00\x01\x00\x01",
    }


@pytest.mark.parametrize("case", list(_not_fast()))
def test_question_refuses_what_needs_the_full_path(case: str) -> None:
    wire = _not_fast()[case]
    assert _hotpath.question(wire) is None
    assert py_scan_question(wire) is None


def test_longest_name_is_fast() -> None:
    parts = [b"x" * 63, b"y" * 63, b"z" * 63, b"w" * 61]  # 255 octets on the wire
    wire = HEADER.pack(1, 0x100, 1, 0, 0, 0) + labels(*parts) + b"\x00\x01\x00\x01"
    assert _hotpath.question(wire) == py_scan_question(wire) == (
        ".".join(p.decode() for p in parts), 1, 12 + 255 + 4, 512)


def test_question_takes_bytes_only() -> None:
    with pytest.raises(TypeError):
        _hotpath.question(bytearray(query("x.example")))  # type: ignore[arg-type]


# ---------------------------------------------------------------- answer_is_plain()


def _end(wire: bytes) -> int:
    """Offset after the (single) question of a response."""
    at = 12
    while wire[at]:
        at += 1 + wire[at]
    return at + 5


@pytest.mark.parametrize(("wire", "plain"), [
    (response("clean.example", ("clean.example.", "A", "192.0.2.1")), True),
    (response("clean.example"), True),
    (response("clean.example", ("clean.example.", "A", "192.0.2.1"),
              ("clean.example.", "A", "192.0.2.2")), True),
    (response("alias.example", ("alias.example.", "CNAME", "target.example.")), False),
    (response("alias.example", ("alias.example.", "CNAME", "target.example."),
              ("target.example.", "A", "192.0.2.1")), False),
])
def test_answer_is_plain(wire: bytes, plain: bool) -> None:
    end = _end(wire)
    assert _hotpath.answer_is_plain(wire, end) is plain
    assert py_answer_is_plain(wire, end) is plain
    assert (cname_targets(wire, end) == []) is plain


@pytest.mark.parametrize("case", ["ancount past the end", "rdata cut", "forward pointer",
                                  "label type 0x40", "offset past the end"])
def test_answer_is_plain_refuses_malformed(case: str) -> None:
    wire = response("clean.example", ("clean.example.", "A", "192.0.2.1"))
    end = _end(wire)
    if case == "ancount past the end":
        wire = wire[:6] + b"\x00\x02" + wire[8:]
    elif case == "rdata cut":
        wire = wire[:-1]
    elif case == "forward pointer":
        wire = wire[:end] + b"\xc0\xff" + wire[end + 2 :]
    elif case == "label type 0x40":
        wire = wire[:end] + b"\x40" + wire[end + 1 :]
    else:
        end = len(wire) + 1
    assert _hotpath.answer_is_plain(wire, end) is False
    assert py_answer_is_plain(wire, end) is False


# ---------------------------------------------------------------- C == Python == parser


def _seeds() -> list[bytes]:
    return [
        query("www.clean.example", use_edns=False),
        query("Mixed.Case.example", "AAAA", use_edns=0, payload=1232),
        query("x.example", "HTTPS", use_edns=0,
              options=[dns.edns.EDEOption(dns.edns.EDECode.OTHER)]),
        query("a.b.c.d.e.f.example", "TXT", want_dnssec=True),
        response("clean.example", ("clean.example.", "A", "192.0.2.1")),
        response("alias.example", ("alias.example.", "CNAME", "t.example."),
                 ("t.example.", "A", "192.0.2.1")),
        *_not_fast().values(),
    ]


def _agree(wire: bytes) -> None:
    """C and Python twins give the same; what they accept, the full parser reads alike."""
    fast = _hotpath.question(wire)
    assert fast == py_scan_question(wire)
    if fast is not None:
        full = parse_query(wire)
        assert (full.name, full.qtype, full.question_end, full.udp_size) == fast
    for end in (12, 17, 27, 31, 35, len(wire)):
        plain = _hotpath.answer_is_plain(wire, end)
        assert plain is py_answer_is_plain(wire, end)
        if plain and len(wire) >= 12:
            try:
                targets = cname_targets(wire, end)
            except FormError:
                continue  # the full parser also follows pointers, which the scan skips
            assert targets == []


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(_seeds()), edits=st.lists(
    st.tuples(st.integers(0, 700), st.integers(0, 255), st.sampled_from("xsdit")),
    min_size=0, max_size=6))
def test_mutated_packets_agree(seed: bytes, edits: list[tuple[int, int, str]]) -> None:
    _agree(mutate(seed, edits))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_agree(data: bytes) -> None:
    _agree(data)


def test_seeded_mutations_agree() -> None:
    rng = random.Random(20261124)
    seeds = _seeds()
    kinds = "xsdit"
    for _ in range(5000):
        edits = [(rng.randrange(700), rng.randrange(256), rng.choice(kinds))
                 for _ in range(rng.randint(1, 4))]
        _agree(mutate(rng.choice(seeds), edits))


@pytest.mark.parametrize("scan", [_hotpath.question, py_scan_question])
def test_question_never_raises_on_garbage(scan: Callable[[bytes], object]) -> None:
    rng = random.Random(7)
    for size in range(0, 64):
        for _ in range(20):
            scan(bytes(rng.randrange(256) for _ in range(size)))


# ---------------------------------------------------------------- Relay (real UDP sockets)


class RelayRig:
    """A client, the relay's two sockets and a fake upstream, all on 127.0.0.1."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.client = self._socket()
        self.listen = self._socket()
        self.upstream = self._socket()  # the fake upstream resolver
        self.to_upstream = self._socket()
        self.to_upstream.connect(self.upstream.getsockname())
        self.relay = _hotpath.Relay(self.listen.fileno(), self.to_upstream.fileno(), timeout)

    @staticmethod
    def _socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2.0)
        return sock

    def ask(self, wire: bytes, cache: dict[str, object]) -> list[tuple[bytes, object]]:
        self.client.sendto(wire, self.listen.getsockname())
        time.sleep(0.05)  # loopback delivery
        return self.relay.from_clients(cache)

    def upstream_receives(self) -> bytes:
        return self.upstream.recvfrom(65536)[0]

    def upstream_answers(self, wire: bytes) -> tuple[list[tuple[bytes, bytes, object]], bool]:
        self.upstream.sendto(wire, self.to_upstream.getsockname())
        time.sleep(0.05)  # loopback delivery
        return self.relay.from_upstream()

    def close(self) -> None:
        for sock in (self.client, self.listen, self.upstream, self.to_upstream):
            sock.close()


@pytest.fixture
def rig() -> Iterator[RelayRig]:
    rig = RelayRig()
    yield rig
    rig.close()


def test_relay_forwards_clean_and_answers_with_the_client_id(rig: RelayRig) -> None:
    wire = query("www.clean.example", use_edns=False)
    assert rig.ask(wire, {"www.clean.example": None}) == []
    sent = rig.upstream_receives()
    assert sent[2:] == wire[2:]  # only the id is new
    answer = response("www.clean.example", ("www.clean.example.", "A", "192.0.2.1"))
    handed, refused = rig.upstream_answers(sent[:2] + answer[2:])
    assert handed == [] and refused is False
    got, _ = rig.client.recvfrom(65536)
    assert got[:2] == wire[:2] and got[2:] == answer[2:]
    counts = rig.relay.counts()
    assert (counts["relayed"], counts["answered"], counts["in_flight"]) == (1, 1, 0)


def test_relay_hands_over_unknown_and_matched_names(rig: RelayRig) -> None:
    first_time = query("new.example", use_edns=False)
    handed = rig.ask(first_time, {})
    assert handed == [(first_time, rig.client.getsockname())]
    blocked = query("blocked.example", use_edns=False)
    assert rig.ask(blocked, {"blocked.example": "a match"}) == [
        (blocked, rig.client.getsockname())]
    odd = query("*.example", use_edns=False)  # not a plain name: the full path decides
    assert rig.ask(odd, {"*.example": None}) == [(odd, rig.client.getsockname())]
    assert rig.relay.counts()["handed_over"] == 3


def test_relay_drops_answers_with_another_question_or_id(rig: RelayRig) -> None:
    wire = query("www.clean.example", use_edns=False)
    rig.ask(wire, {"www.clean.example": None})
    sent = rig.upstream_receives()
    other = response("other.example", ("other.example.", "A", "192.0.2.9"))
    assert rig.upstream_answers(sent[:2] + other[2:]) == ([], False)  # spoofed question
    unknown_id = bytes([sent[0] ^ 0xFF, sent[1]])
    good = response("www.clean.example", ("www.clean.example.", "A", "192.0.2.1"))
    assert rig.upstream_answers(unknown_id + good[2:]) == ([], False)
    assert rig.relay.counts()["upstream_mismatch"] == 2
    assert rig.relay.counts()["in_flight"] == 1  # still waiting for the real answer
    assert rig.upstream_answers(sent[:2] + good[2:]) == ([], False)
    assert rig.client.recvfrom(65536)[0][2:] == good[2:]


def test_relay_hands_over_cname_and_oversize_answers(rig: RelayRig) -> None:
    wire = query("alias.example", use_edns=False)
    rig.ask(wire, {"alias.example": None})
    sent = rig.upstream_receives()
    cname = response("alias.example", ("alias.example.", "CNAME", "target.example."))
    handed, _ = rig.upstream_answers(sent[:2] + cname[2:])
    assert handed == [(wire[:2] + cname[2:], wire, rig.client.getsockname())]
    wire = query("big.example", use_edns=False)  # 512 bytes at most without EDNS
    rig.ask(wire, {"big.example": None})
    sent = rig.upstream_receives()
    big = response("big.example", *[("big.example.", "TXT", f'"{i:03d}{"x" * 200}"')
                                     for i in range(3)])
    assert len(big) > 512
    handed, _ = rig.upstream_answers(sent[:2] + big[2:])
    assert handed == [(wire[:2] + big[2:], wire, rig.client.getsockname())]


def test_relay_gives_back_what_times_out() -> None:
    rig = RelayRig(timeout=0.2)
    try:
        wire = query("slow.example", use_edns=False)
        rig.ask(wire, {"slow.example": None})
        assert rig.relay.expired() == []  # not yet
        time.sleep(0.3)
        assert rig.relay.expired() == [(wire, rig.client.getsockname())]
        assert rig.relay.counts()["in_flight"] == 0
        rig.ask(wire, {"slow.example": None})
        assert rig.relay.expired(all=True) == [(wire, rig.client.getsockname())]
    finally:
        rig.close()


def test_relay_reports_an_unreachable_upstream() -> None:
    rig = RelayRig()
    try:
        rig.upstream.close()  # nothing listens: ICMP port unreachable on the next send
        wire = query("www.clean.example", use_edns=False)
        handed = rig.ask(wire, {"www.clean.example": None})
        time.sleep(0.05)
        later, refused = rig.relay.from_upstream()
        assert handed or refused  # the send failed, or the error came back on reading
        assert later == []
    finally:
        rig.client.close()
        rig.listen.close()
        rig.to_upstream.close()
