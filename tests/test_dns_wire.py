"""Unit tests of the DNS wire parser (dns/wire.py) and answer builder (dns/answers.py),
on real packets built with dnspython and dnslib, plus hand-made malformed ones."""

from __future__ import annotations

import contextlib
import json
import random
import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from dnslib import QTYPE, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netfilter.config import DnsSettings
from netfilter.dns.answers import block_answer, error_answer, extra_text, route_answer
from netfilter.dns.wire import FormError, Query, cname_targets, parse_query, read_name
from netfilter.engine import Action, Answer, Verdict
from netfilter.listfile import Transparency
from netfilter.matcher import Match
from tests.dns_support import mutate

HEADER = struct.Struct("!HHHHHH")


def query_wire(name: str = "blocked.example", rdtype: str | int = "A", **kwargs: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()


def raw_query(name_wire: bytes, *, qdcount: int = 1, ancount: int = 0, nscount: int = 0,
              arcount: int = 0, tail: bytes = b"\x00\x01\x00\x01", qid: int = 0x1234,
              flags: int = 0x0100) -> bytes:
    return HEADER.pack(qid, flags, qdcount, ancount, nscount, arcount) + name_wire + tail


def labels(*parts: bytes) -> bytes:
    return b"".join(bytes([len(p)]) + p for p in parts) + b"\x00"


def opt_rr(udp: int = 1232, ttl: int = 0, rdata: bytes = b"") -> bytes:
    return b"\x00" + struct.pack("!HHIH", 41, udp, ttl, len(rdata)) + rdata


# ---------------------------------------------------------------- parse_query: good input


def test_plain_query_fields() -> None:
    message = dns.message.make_query("www.Blocked.Example", "A", use_edns=False)
    message.id = 4242
    wire = message.to_wire()
    q = parse_query(wire)
    assert q == Query(id=4242, flags=message.flags, name="www.blocked.example", qtype=1,
                      qclass=1, question_end=len(wire), edns=False, udp_size=512,
                      dnssec_ok=False, wants_structured_error=False)
    assert wire[12 : q.question_end] == message.question[0].name.to_wire() + b"\x00\x01\x00\x01"


@pytest.mark.parametrize(("rdtype", "number"), [("A", 1), ("AAAA", 28), ("TXT", 16),
                                                 ("HTTPS", 65), ("SVCB", 64), ("ANY", 255),
                                                 (65280, 65280)])
def test_qtypes(rdtype: str | int, number: int) -> None:
    assert parse_query(query_wire("x.example", rdtype)).qtype == number


def test_qclass_and_root_name() -> None:
    q = parse_query(dns.message.make_query(".", "NS", rdclass=dns.rdataclass.CH).to_wire())
    assert (q.name, q.qtype, q.qclass) == ("", 2, 3)


def test_dnslib_built_query() -> None:
    wire = DNSRecord.question("Sub.Blocked.Test", "AAAA").pack()
    q = parse_query(bytes(wire))
    assert (q.name, q.qtype, q.edns) == ("sub.blocked.test", 28, False)


@pytest.mark.parametrize(("payload", "expected"), [(4096, 4096), (1232, 1232), (512, 512),
                                                   (100, 512), (0, 512), (65535, 65535)])
def test_edns_payload(payload: int, expected: int) -> None:
    q = parse_query(query_wire(use_edns=0, payload=payload))
    assert q.edns and q.udp_size == expected
    assert q.question_end < len(query_wire(use_edns=0, payload=payload))


def test_dnssec_ok_bit() -> None:
    assert parse_query(query_wire(want_dnssec=True)).dnssec_ok
    assert not parse_query(query_wire(use_edns=0)).dnssec_ok


def test_ede_option_detection() -> None:
    plain = parse_query(query_wire(use_edns=0))
    assert plain.edns and not plain.wants_structured_error
    cookie = dns.edns.CookieOption(b"\x01" * 8, b"")
    assert not parse_query(query_wire(use_edns=0, options=[cookie])).wants_structured_error
    ede = dns.edns.EDEOption(dns.edns.EDECode.OTHER)
    assert parse_query(query_wire(use_edns=0, options=[ede])).wants_structured_error
    both = parse_query(query_wire(use_edns=0, options=[cookie, ede]))
    assert both.wants_structured_error
    empty = dns.edns.GenericOption(15, b"")
    assert parse_query(query_wire(use_edns=0, options=[empty])).wants_structured_error


def test_unusual_label_bytes_are_escaped_not_dots() -> None:
    name = dns.name.Name([b"a.b", b"c d", b"\xff", b"example", b""])
    q = parse_query(dns.message.make_query(name, "A").to_wire())
    assert q.name == "a\\046b.c\\032d.\\255.example"
    assert q.name.count(".") == 3


def test_non_opt_additional_and_answer_records_are_skipped() -> None:
    message = dns.message.make_query("blocked.example", "A", use_edns=0)
    message.answer.append(dns.rrset.from_text("blocked.example.", 60, "IN", "A", "192.0.2.1"))
    message.additional.append(dns.rrset.from_text("x.example.", 60, "IN", "TXT", '"hi"'))
    q = parse_query(message.to_wire())
    assert q.edns and q.name == "blocked.example"


def test_longest_legal_name() -> None:
    wire_name = labels(b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61)
    assert len(wire_name) == 255
    assert parse_query(raw_query(wire_name)).name.endswith("d" * 61)


# ---------------------------------------------------------------- parse_query: FormError


def _cases() -> dict[str, tuple[bytes, str]]:
    """Malformed queries, each with what is wrong with it."""
    good = query_wire("blocked.example", "A", use_edns=False)
    edns = query_wire("blocked.example", "A", use_edns=0)
    name = labels(b"blocked", b"example")
    root_question = HEADER.pack(1, 0x100, 1, 0, 0, 0) + b"\x00\x00\x01\x00\x01"
    fixed = struct.Struct("!HHIH")
    return {
        "empty": (b"", "shorter than a DNS header"),
        "short header": (good[:11], "shorter than a DNS header"),
        "header only": (good[:12], "past the end"),
        "no questions": (raw_query(b"", qdcount=0, tail=b""), "0 questions"),
        "two questions": (raw_query(name + b"\x00\x01\x00\x01" + name, qdcount=2),
                          "2 questions"),
        "cut in name": (good[:16], "past the end"),
        "cut before qtype": (good[: len(good) - 4], "truncated question"),
        "cut in qclass": (good[:-1], "truncated question"),
        "label 64": (raw_query(bytes([64]) + b"a" * 64 + b"\x00"), "label type"),
        "label type 0x80": (raw_query(b"\x80abc\x00"), "label type"),
        "name 300 octets": (raw_query(b"".join(labels(b"x" * 59)[:-1] for _ in range(5))
                                      + b"\x00"), "longer than 255"),
        "pointer in question": (raw_query(b"\x07blocked\xc0\x0c"), "pointer"),
        "pointer to header": (raw_query(b"\xc0\x00"), "pointer"),
        "trailing byte": (good + b"\x00", "trailing bytes"),
        "trailing garbage": (edns + b"junk", "trailing bytes"),
        "trailing after root question": (root_question + b"\x00", "trailing bytes"),
        "arcount without record": (good[:10] + b"\x00\x01" + good[12:], "past the end"),
        "ancount without record": (raw_query(name, ancount=1), "past the end"),
        "nscount without record": (raw_query(name, nscount=3), "past the end"),
        "two OPT records": (raw_query(name, arcount=2) + opt_rr() + opt_rr(), "more than one"),
        "OPT with owner": (raw_query(name, arcount=1) + b"\x01a\x00"
                           + fixed.pack(41, 1232, 0, 0), "non-root owner"),
        "OPT option truncated": (raw_query(name, arcount=1) + opt_rr(rdata=b"\x00\x0f\x00"),
                                 "truncated EDNS option"),
        "OPT option past rdata": (raw_query(name, arcount=1)
                                  + opt_rr(rdata=b"\x00\x0f\x00\x09ab"),
                                  "runs past the OPT"),
        "RR rdata past end": (raw_query(name, arcount=1) + b"\x00" + fixed.pack(1, 1, 0, 4)
                              + b"\x01\x02", "data runs past the end"),
        "RR fixed part cut": (raw_query(name, arcount=1) + b"\x00\x00\x01\x00",
                              "truncated resource record"),
        "all ones": (b"\xff" * 40, "65535 questions"),
    }


@pytest.mark.parametrize(("data", "reason"), list(_cases().values()), ids=list(_cases()))
def test_malformed_queries(data: bytes, reason: str) -> None:
    try:
        parse_query(data)
    except FormError:  # the wording may change; the refusal may not
        return
    pytest.fail(f"accepted, should be refused for: {reason}")


NAME_256 = labels(b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 62)


def test_question_name_of_256_octets_is_refused() -> None:
    assert len(NAME_256) == 256
    with pytest.raises(FormError):
        parse_query(raw_query(NAME_256))
    with pytest.raises(FormError):  # the escaping path too
        parse_query(raw_query(NAME_256.replace(b"d" * 62, b"d d" + b"d" * 59)))


def test_read_name_refuses_256_octets() -> None:
    with pytest.raises(FormError):
        read_name(NAME_256, 0)


# ---------------------------------------------------------------- read_name


def test_read_name_follows_a_backward_pointer() -> None:
    data = labels(b"blocked", b"example") + b"\x03www\xc0\x00" + b"rest"
    name, after = read_name(data, 17)
    assert name == "www.blocked.example"
    assert after == 17 + 4 + 2  # just past the pointer, not past the target


def test_read_name_without_pointers() -> None:
    assert read_name(b"\x01A\x00", 0, allow_pointers=False) == ("a", 3)
    with pytest.raises(FormError, match="pointer"):
        read_name(b"\x00\x01a\xc0\x00", 1, allow_pointers=False)


@pytest.mark.parametrize(("data", "offset"), [
    (b"\xc0\x00", 0),  # points at itself
    (b"\xc0\x02\x00", 0),  # forward
    (b"\x01a\xc0\x00", 0),  # a loop through an earlier label
    (b"\x01a\xc0", 0),  # truncated pointer
    (b"\x05ab", 0),  # label past the end
    (b"", 0),
    (b"\x01a", 0),  # no terminating root label
    (b"\x00", 1),
])
def test_read_name_refuses(data: bytes, offset: int) -> None:
    with pytest.raises(FormError):
        read_name(data, offset)


def test_pointer_chain_is_bounded() -> None:
    def chain(links: int) -> bytes:
        data = b"\x00"
        for i in range(links):
            target = 0 if i == 0 else 1 + 2 * (i - 1)
            data += struct.pack("!H", 0xC000 | target)
        return data

    assert read_name(chain(32), len(chain(32)) - 2) == ("", len(chain(32)))
    with pytest.raises(FormError, match="loop"):
        read_name(chain(33), len(chain(33)) - 2)


# ---------------------------------------------------------------- cname_targets


def _response(qname: str, *records: tuple[str, str, str]) -> bytes:
    query = dns.message.make_query(qname, "A")
    response = dns.message.make_response(query)
    for owner, rdtype, rdata in records:
        response.answer.append(dns.rrset.from_text(owner, 300, "IN", rdtype, rdata))
    return response.to_wire()


def test_cname_targets_in_order_with_compression() -> None:
    wire = _response("alias.clean.example",
                     ("alias.clean.example.", "CNAME", "Hop.Clean.Example."),
                     ("hop.clean.example.", "CNAME", "target.BLOCKED.example."),
                     ("target.blocked.example.", "A", "192.0.2.66"))
    assert b"\xc0" in wire[40:]  # dnspython compressed the names
    assert cname_targets(wire) == ["hop.clean.example", "target.blocked.example"]


def test_cname_targets_with_known_question_end() -> None:
    wire = _response("alias.clean.example",
                     ("alias.clean.example.", "CNAME", "target.blocked.example."))
    question_end = parse_query(query_wire("alias.clean.example", "A", use_edns=False)).question_end
    assert cname_targets(wire, question_end) == ["target.blocked.example"]


def test_cname_targets_none() -> None:
    assert cname_targets(_response("clean.example", ("clean.example.", "A", "192.0.2.1"))) == []
    assert cname_targets(_response("clean.example")) == []


def _cname_answer(rdata: bytes, *, ancount: int = 1) -> bytes:
    question = labels(b"alias", b"example") + b"\x00\x01\x00\x01"
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 300, len(rdata)) + rdata
    return HEADER.pack(7, 0x8180, 1, ancount, 0, 0) + question + rr


def test_cname_targets_hand_made() -> None:
    assert cname_targets(_cname_answer(b"\x01x\xc0\x0c")) == ["x.alias.example"]


@pytest.mark.parametrize(("case", "data"), [
    ("loop in rdata", _cname_answer(b"\x01x\xc0\x2b")),  # points back at its own label
    ("self pointer", _cname_answer(b"\xc0\x2b")),
    ("forward pointer", _cname_answer(b"\xc0\x30\x00\x00")),
    ("more answers than present", _cname_answer(b"\x01x\x00", ancount=2)),
    ("rdata cut", _cname_answer(b"\x01x\x00")[:-1]),
    ("short", b"\x00" * 11),
    ("question cut", HEADER.pack(7, 0x8180, 1, 0, 0, 0) + b"\x05alias"),
])
def test_cname_targets_malformed(case: str, data: bytes) -> None:
    with pytest.raises(FormError):
        cname_targets(data)


# ---------------------------------------------------------------- robustness (hypothesis)


def _seed_queries() -> list[bytes]:
    return [
        query_wire("blocked.example", "A", use_edns=False),
        query_wire("www.clean.example", "HTTPS", use_edns=0,
                   options=[dns.edns.EDEOption(dns.edns.EDECode.OTHER)]),
        query_wire("a.b.c.d.e.f.example", "TXT", want_dnssec=True),
        _response("alias.clean.example", ("alias.clean.example.", "CNAME", "t.example.")),
    ]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600))
def test_random_bytes_raise_only_formerror(data: bytes) -> None:
    for parse in (parse_query, cname_targets):
        with contextlib.suppress(FormError):
            parse(data)


@settings(max_examples=400, deadline=None)
@given(seed=st.sampled_from(_seed_queries()), edits=st.lists(
    st.tuples(st.integers(0, 700), st.integers(0, 255), st.sampled_from("xdit")),
    min_size=1, max_size=8))
def test_mutated_packets_raise_only_formerror(
        seed: bytes, edits: list[tuple[int, int, str]]) -> None:
    data = mutate(seed, edits)
    for parse in (parse_query, cname_targets):
        try:
            result = parse(data)
        except FormError:
            continue
        if isinstance(result, Query):
            assert 12 < result.question_end <= len(data)
            assert result.udp_size >= 512


def test_seeded_mutator_never_escapes_formerror() -> None:
    rng = random.Random(20260514)
    seeds = _seed_queries()
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            parse_query(bytes(data))
            cname_targets(bytes(data))
        except FormError:
            pass


# ---------------------------------------------------------------- answers.py

TRANSPARENCY = Transparency(issuer="Demo Authority", contact="mailto:a@authority.test",
                            appeal_url="https://appeals.authority.test/")
MATCH = Match(list_id="demo", list_version=3, ref="DEMO-0001", category="csam",
              kind="domain", source="authority", expression="blocked.example/")


def verdict(answer: Answer, transparency: Transparency | None = TRANSPARENCY) -> Verdict:
    return Verdict(Action.BLOCK, MATCH, answer, transparency)


def answer_for(message: dns.message.Message, answer: Answer,
               dns_settings: DnsSettings | None = None,
               transparency: Transparency | None = TRANSPARENCY) -> dns.message.Message:
    wire = message.to_wire()
    out = block_answer(wire, parse_query(wire), verdict(answer, transparency),
                       dns_settings or DnsSettings(block_ttl=77))
    return dns.message.from_wire(out)


def test_nxdomain_answer() -> None:
    query = dns.message.make_query("www.blocked.example", "A", use_edns=0)
    response = answer_for(query, Answer.NXDOMAIN)
    assert query.is_response(response)
    assert response.id == query.id
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.QR and response.flags & dns.flags.RA
    assert response.flags & dns.flags.RD
    assert response.answer == []
    (soa,) = response.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl == 77
    assert soa.name == dns.name.from_text("blocked.example")
    assert soa[0].minimum == 77
    (ede,) = response.extended_errors()
    assert ede.code == 16
    assert ede.text == "Blocked by Demo Authority: list demo v3, entry DEMO-0001"


@pytest.mark.parametrize(("rdtype", "address"), [("A", "192.0.2.99"), ("AAAA", "2001:db8::99")])
def test_stoppage_address(rdtype: str, address: str) -> None:
    configured = DnsSettings(block_ttl=55, stoppage_ipv4="192.0.2.99",
                             stoppage_ipv6="2001:db8::99", ede=17)
    query = dns.message.make_query("blocked.example", rdtype, use_edns=0)
    response = answer_for(query, Answer.STOPPAGE, configured)
    assert response.rcode() == dns.rcode.NOERROR
    (rrset,) = response.answer
    assert rrset.ttl == 55 and [r.address for r in rrset] == [address]
    assert response.authority == []
    assert response.extended_errors()[0].code == 17


@pytest.mark.parametrize("rdtype", ["TXT", "HTTPS", "MX"])
def test_stoppage_other_types_nodata(rdtype: str) -> None:
    response = answer_for(dns.message.make_query("blocked.example", rdtype), Answer.STOPPAGE)
    assert response.rcode() == dns.rcode.NOERROR and response.answer == []
    assert response.authority[0].rdtype == dns.rdatatype.SOA
    assert response.authority[0].ttl == 77


def test_refused_answer() -> None:
    response = answer_for(dns.message.make_query("blocked.example", "A", use_edns=0),
                          Answer.REFUSED, DnsSettings(ede=15))
    assert response.rcode() == dns.rcode.REFUSED
    assert response.answer == response.authority == []
    assert response.extended_errors()[0].code == 15


def test_no_opt_without_edns() -> None:
    query = dns.message.make_query("blocked.example", "A", use_edns=False)
    response = answer_for(query, Answer.NXDOMAIN)
    assert response.edns == -1 and response.extended_errors() == []
    assert response.authority[0].ttl == 77


def test_do_bit_mirrored() -> None:
    query = dns.message.make_query("blocked.example", "A", want_dnssec=True)
    assert answer_for(query, Answer.NXDOMAIN).ednsflags & dns.flags.DO
    query = dns.message.make_query("blocked.example", "A", use_edns=0)
    assert not answer_for(query, Answer.NXDOMAIN).ednsflags & dns.flags.DO


def test_structured_error_json() -> None:
    query = dns.message.make_query("blocked.example", "A", use_edns=0,
                                   options=[dns.edns.EDEOption(dns.edns.EDECode.OTHER)])
    (ede,) = answer_for(query, Answer.NXDOMAIN).extended_errors()
    data = json.loads(ede.text)
    assert data == {"c": ["https://appeals.authority.test/", "mailto:a@authority.test"],
                    "j": "list demo v3, entry DEMO-0001", "o": "Demo Authority"}


def test_structured_error_without_transparency() -> None:
    text = extra_text(verdict(Answer.NXDOMAIN, None), True)
    assert json.loads(text) == {"j": "list demo v3, entry DEMO-0001", "o": "demo"}
    assert extra_text(verdict(Answer.NXDOMAIN, None), False).startswith("Blocked by demo:")


def test_extra_text_is_bounded() -> None:
    long = Transparency(issuer="I" * 600)
    assert len(extra_text(verdict(Answer.NXDOMAIN, long), False)) <= 400
    data = json.loads(extra_text(verdict(Answer.NXDOMAIN, long), True))
    assert len(data["o"]) == 200


def test_block_answer_keeps_question_case() -> None:
    query = dns.message.make_query("BlOcKeD.ExAmPlE", "A", use_edns=False)
    wire = query.to_wire()
    out = block_answer(wire, parse_query(wire), verdict(Answer.NXDOMAIN), DnsSettings())
    assert out[12 : 12 + 17] == wire[12 : 12 + 17]


def test_route_answer() -> None:
    configured = DnsSettings(route_url_hosts_to_proxy=True,
                             proxy_ipv4="192.0.2.80", block_ttl=9)
    wire = query_wire("partly.example", "A", use_edns=False)
    routed = dns.message.from_wire(route_answer(wire, parse_query(wire), configured) or b"")
    assert routed.answer[0][0].address == "192.0.2.80" and routed.answer[0].ttl == 9
    wire = query_wire("partly.example", "AAAA")
    assert route_answer(wire, parse_query(wire), configured) is None


def test_error_answer_formerr_header_only() -> None:
    message = dns.message.make_query("x.example", "A")
    message.id = 0xBEEF
    wire = message.to_wire()
    out = error_answer(wire, dns.rcode.FORMERR)
    qid, flags, qd, an, ns, ar = HEADER.unpack(out)
    assert len(out) == 12 and (qid, qd, an, ns, ar) == (0xBEEF, 0, 0, 0, 0)
    assert flags & 0x8000 and flags & 0x0100 and flags & 0x0080  # QR, RD kept, RA
    assert flags & 0xF == dns.rcode.FORMERR
    response = dns.message.from_wire(out)
    assert response.rcode() == dns.rcode.FORMERR and response.id == 0xBEEF


def test_error_answer_servfail_with_question() -> None:
    message = dns.message.make_query("x.example", "AAAA", use_edns=0)
    message.set_opcode(dns.opcode.QUERY)
    wire = message.to_wire()
    response = dns.message.from_wire(
        error_answer(wire, dns.rcode.SERVFAIL, parse_query(wire)))
    assert message.is_response(response)
    assert response.rcode() == dns.rcode.SERVFAIL
    assert response.question == message.question


def test_error_answer_keeps_opcode_and_cd_clears_other_bits() -> None:
    message = dns.message.make_query("x.example", "A", use_edns=False)
    message.set_opcode(dns.opcode.STATUS)
    message.flags |= dns.flags.AD | dns.flags.CD
    wire = message.to_wire()
    response = dns.message.from_wire(error_answer(wire, dns.rcode.NOTIMP, parse_query(wire)))
    assert response.opcode() == dns.opcode.STATUS
    assert response.rcode() == dns.rcode.NOTIMP
    assert response.flags & dns.flags.CD  # RFC 4035 3.2.2: CD is copied
    assert not response.flags & (dns.flags.AD | dns.flags.AA | dns.flags.TC)


def test_qtype_constants_agree_with_dnslib() -> None:
    assert (QTYPE.A, QTYPE.AAAA, QTYPE.CNAME, QTYPE.OPT) == (1, 28, 5, 41)
