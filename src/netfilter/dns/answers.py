"""Locally decided answers: a Verdict (or a canary, or a route to the proxy) in DNS.

One mapping, in one place, for the resolver and the Unbound plugin: nxdomain ->
NXDOMAIN, refused -> REFUSED, stoppage -> the stop page's A/AAAA (other types:
NODATA). Negative answers carry a synthetic SOA so resolvers cache them for
`block_ttl`; it is owned by the blocked domain when the name asked is it or below it,
else by the name asked (blocked through a CNAME). When the client sent EDNS, an RFC
8914 Extended DNS Error names the issuer and the entry reference; when it also sent
an EDE option (draft-ietf-dnsop-structured-dns-error), EXTRA-TEXT is the draft's
I-JSON instead.

A `Reply` says what the answer holds; `to_wire` writes it for the resolver and the
Unbound plugin hands it to Unbound as records (unbound.py). On the wire the question
is echoed byte for byte as sent, and the records' owner names are compression
pointers into it. A DNS label may hold any octet (a dot, NUL, bytes that are not
UTF-8), and no such name may cost an answer, so names are never decoded to text and
encoded again.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from typing import NamedTuple

from netfilter.config import DnsSettings
from netfilter.dns.codes import (
    EDE_OPTION,
    EDNS_DO,
    OPCODE_MASK,
    RCODE_MASK,
    Flag,
    Rcode,
    RRClass,
    RRType,
)
from netfilter.dns.wire import HEADER, Query
from netfilter.engine import Answer, Verdict

__all__ = [
    "Record",
    "Reply",
    "badvers_answer",
    "block_answer",
    "block_reply",
    "error_answer",
    "extra_text",
    "route_answer",
    "route_reply",
    "soa_text",
    "to_wire",
]

MAX_EXTRA_TEXT = 400
RCODES = {Answer.NXDOMAIN: Rcode.NXDOMAIN, Answer.REFUSED: Rcode.REFUSED,
          Answer.STOPPAGE: Rcode.NOERROR}
EDNS_UDP = 1232  # the buffer size we announce (DNS Flag Day 2020)
# Plain ints: IntFlag arithmetic costs microseconds per operation.
_KEPT_FLAGS = int(Flag.RD | Flag.CD)  # copied from the query (CD: RFC 4035 3.2.2)
_ERROR_KEPT = _KEPT_FLAGS | OPCODE_MASK  # and the opcode, on error answers
_QR_RA = int(Flag.QR | Flag.RA)
_RECORD = struct.Struct("!HHHIH")  # owner (a pointer), type, class, ttl, rdlength
_OPT = struct.Struct("!BHHBBHH")  # root owner, type, udp size, ext-rcode, version, flags, rdlen
_POINTER = 0xC000
# The synthetic SOA of negative answers: localhost. nobody.invalid. 1 3600 600 86400 <ttl>
SOA_MNAME, SOA_RNAME = "localhost", "nobody.invalid"
SOA_TIMES = (1, 3600, 600, 86400)  # serial, refresh, retry, expire (minimum: the ttl)
_SOA_FIXED = (b"\x09localhost\x00\x06nobody\x07invalid\x00"
              + struct.pack("!IIII", *SOA_TIMES))  # then the minimum (the ttl)
_U32 = struct.Struct("!I")
_QUESTION_AT = 12
# Plain ints for the per-answer code (an enum member costs a lookup and __index__ there).
_A, _AAAA, _SOA, _OPT_TYPE = int(RRType.A), int(RRType.AAAA), int(RRType.SOA), int(RRType.OPT)
_IN = int(RRClass.IN)


class Record(NamedTuple):
    """One answer record, owned by the name asked."""

    rtype: int
    ttl: int
    rdata: bytes


class Reply(NamedTuple):
    """What a locally decided answer holds, before it is written for a transport."""

    rcode: Rcode
    answers: tuple[Record, ...] = ()
    soa_zone: str | None = None  # a negative answer's SOA owner: the name asked or a parent
    ttl: int = 0  # the SOA's TTL and minimum (RFC 2308: how long the answer is cached)
    ede: int | None = None  # RFC 8914 info code, sent when the query had EDNS
    text: str = ""  # its EXTRA-TEXT


def extra_text(verdict: Verdict, structured: bool) -> str:
    """EXTRA-TEXT of the EDE option: plain words, or the draft's I-JSON."""
    match, text = verdict.match, verdict.transparency
    assert match is not None
    issuer = (text.issuer if text else None) or match.list_id
    justification = f"list {match.list_id} v{match.list_version}, entry {match.ref}"
    if not structured:
        return f"Blocked by {issuer}: {justification}"[:MAX_EXTRA_TEXT]
    contacts = [c for c in ((text.appeal_url, text.contact) if text else ()) if c]
    data: dict[str, object] = {"j": justification[:200], "o": issuer[:200]}
    if contacts:
        data["c"] = [c[:200] for c in contacts]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def block_reply(name: str, qtype: int, verdict: Verdict, settings: DnsSettings, *,
                structured: bool = False) -> Reply:
    """The answer for a blocked name (`name` as wire.Query.name: lowercase, no final
    dot). `structured`: the query carried an EDE option."""
    assert verdict.match is not None and verdict.answer is not None
    answer, ttl = verdict.answer, settings.block_ttl
    text = extra_text(verdict, structured)
    if answer is Answer.STOPPAGE and qtype == _A:
        record = Record(_A, ttl, settings.stoppage_ipv4.packed)
        return Reply(Rcode.NOERROR, (record,), None, ttl, settings.ede, text)
    if answer is Answer.STOPPAGE and qtype == _AAAA:
        record = Record(_AAAA, ttl, settings.stoppage_ipv6.packed)
        return Reply(Rcode.NOERROR, (record,), None, ttl, settings.ede, text)
    if answer is Answer.REFUSED:
        return Reply(Rcode.REFUSED, (), None, ttl, settings.ede, text)
    zone = verdict.match.expression.rstrip("/")
    if name != zone and not name.endswith("." + zone):
        zone = name  # blocked through a CNAME: the SOA must own the name asked
    return Reply(RCODES[answer], (), zone, ttl, settings.ede, text)


def route_reply(qtype: int, settings: DnsSettings) -> Reply | None:
    """A/AAAA of the proxy for a host that carries URL-level entries; None: forward."""
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if qtype == RRType.A:
        address = settings.proxy_ipv4
    elif qtype == RRType.AAAA:
        address = settings.proxy_ipv6
    if address is None:
        return None
    return Reply(Rcode.NOERROR, (Record(qtype, settings.block_ttl, address.packed),))


def soa_text(zone: str, ttl: int) -> str:
    """The synthetic SOA in presentation form (for Unbound, which takes text)."""
    times = " ".join(str(t) for t in (*SOA_TIMES, ttl))
    return f"{zone}. {ttl} IN SOA {SOA_MNAME}. {SOA_RNAME}. {times}"


def _soa_owner(raw: bytes, query: Query, zone: str) -> int:
    """Where in the question the SOA's owner `zone` starts. A '.' in `query.name` is
    always a label boundary (dots inside labels are escaped), so a text suffix is a
    label suffix."""
    name = query.name
    if name == zone or not name.endswith("." + zone):
        return _QUESTION_AT
    offset = _QUESTION_AT
    for _ in range(name[: len(name) - len(zone) - 1].count(".") + 1):
        offset += raw[offset] + 1
    return offset


def _record(owner: int, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return _RECORD.pack(_POINTER | owner, rtype, _IN, ttl, len(rdata)) + rdata


def to_wire(raw: bytes, query: Query, reply: Reply) -> bytes:
    """`reply` to the query `raw`: header, the question exactly as the client sent it,
    the records, and an OPT record (with the EDE option, if any) when the query had
    EDNS."""
    answers = []
    for record in reply.answers:
        answers.append(_record(_QUESTION_AT, record.rtype, record.ttl, record.rdata))
    authority = []
    if reply.soa_zone is not None:
        ttl = reply.ttl
        authority.append(_record(_soa_owner(raw, query, reply.soa_zone), _SOA, ttl,
                                 _SOA_FIXED + _U32.pack(ttl)))
    additional = []
    if query.edns:
        option = b""
        if reply.ede is not None:
            data = struct.pack("!H", reply.ede) + reply.text.encode("utf-8", "replace")
            option = struct.pack("!HH", EDE_OPTION, len(data)) + data
        do = EDNS_DO if query.dnssec_ok else 0  # mirrored
        additional.append(_OPT.pack(0, _OPT_TYPE, EDNS_UDP, 0, 0, do, len(option)) + option)
    flags = _QR_RA | (query.flags & _KEPT_FLAGS) | reply.rcode
    header = HEADER.pack(query.id, flags, 1, len(answers), len(authority), len(additional))
    return b"".join([header, raw[_QUESTION_AT : query.question_end], *answers, *authority,
                     *additional])


def block_answer(raw: bytes, query: Query, verdict: Verdict, settings: DnsSettings) -> bytes:
    """The wire answer for a blocked name."""
    return to_wire(raw, query, block_reply(query.name, query.qtype, verdict, settings,
                                           structured=query.wants_structured_error))


def route_answer(raw: bytes, query: Query, settings: DnsSettings) -> bytes | None:
    """The wire answer routing a host to the proxy; None: forward."""
    reply = route_reply(query.qtype, settings)
    return None if reply is None else to_wire(raw, query, reply)


def badvers_answer(raw: bytes, query: Query) -> bytes:
    """BADVERS (extended rcode 16) with our OPT, version 0 (RFC 6891 6.1.3)."""
    qid, flags = struct.unpack_from("!HH", raw)
    flags = _QR_RA | (flags & _ERROR_KEPT)
    opt = _OPT.pack(0, RRType.OPT, EDNS_UDP, Rcode.BADVERS >> 4, 0, 0, 0)
    return HEADER.pack(qid, flags, 1, 0, 0, 1) + raw[_QUESTION_AT : query.question_end] + opt


def error_answer(raw: bytes, rcode: int, query: Query | None = None) -> bytes:
    """SERVFAIL/FORMERR/NOTIMP: the header, and the question if it parsed. QR and RA
    set; opcode, RD and CD kept."""
    qid, flags = struct.unpack_from("!HH", raw)
    flags = _QR_RA | (flags & _ERROR_KEPT) | (rcode & RCODE_MASK)
    if query is None:
        return HEADER.pack(qid, flags, 0, 0, 0, 0)
    return HEADER.pack(qid, flags, 1, 0, 0, 0) + raw[_QUESTION_AT : query.question_end]
