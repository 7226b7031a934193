"""Block answers: the Verdict translated into DNS (RCODE, records, Extended DNS Error).

One mapping, in one place: nxdomain -> NXDOMAIN, refused -> REFUSED, stoppage -> the
stop page's A/AAAA (other types: NODATA). Negative answers carry a synthetic SOA so
resolvers cache them for `block_ttl`. When the client sent EDNS, an RFC 8914 Extended
DNS Error names the issuer and the entry reference; when it also sent an EDE option
(draft-ietf-dnsop-structured-dns-error), EXTRA-TEXT is the draft's I-JSON instead.

Every answer is written on the wire by hand: the question is echoed byte for byte as
sent, and the records' owner names are compression pointers into it. A DNS label may
hold any octet (a dot, NUL, bytes that are not UTF-8), and no such name may cost an
answer, so names are never decoded to text and encoded again.
"""

from __future__ import annotations

import ipaddress
import json
import struct

from netfilter.config import DnsSettings
from netfilter.dns.wire import EDE_OPTION, HEADER, Query
from netfilter.engine import Answer, Verdict

__all__ = ["badvers_answer", "block_answer", "error_answer", "extra_text", "route_answer"]

MAX_EXTRA_TEXT = 400
NOERROR, NXDOMAIN, REFUSED = 0, 3, 5
TYPE_A, TYPE_SOA, TYPE_AAAA, TYPE_OPT = 1, 6, 28, 41
CLASS_IN = 1
_RCODE = {Answer.NXDOMAIN: NXDOMAIN, Answer.REFUSED: REFUSED, Answer.STOPPAGE: NOERROR}
EDNS_UDP = 1232
_KEPT_FLAGS = 0x0110  # RD, and CD (RFC 4035 3.2.2), copied from the query
_QR_RA = 0x8080
_RECORD = struct.Struct("!HHHIH")  # owner (a pointer), type, class, ttl, rdlength
_OPT = struct.Struct("!BHHBBHH")  # root owner, type, udp size, ext-rcode, version, flags, rdlen
_SOA_NAMES = b"\x09localhost\x00\x06nobody\x07invalid\x00"  # localhost. nobody.invalid.
_SOA_TIMES = struct.Struct("!IIIII")  # serial, refresh, retry, expire, minimum
_QUESTION_AT = 12


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


def _message(raw: bytes, query: Query, rcode: int, answers: list[bytes],
             authority: list[bytes], ede: int | None, text: str) -> bytes:
    """Header, the question exactly as the client sent it, the records, and an OPT
    record (with the EDE option, if any) when the query had EDNS."""
    additional = []
    if query.edns:
        option = b""
        if ede is not None:
            data = struct.pack("!H", ede) + text.encode("utf-8", "replace")
            option = struct.pack("!HH", EDE_OPTION, len(data)) + data
        flags = 0x8000 if query.dnssec_ok else 0  # DO mirrored
        additional.append(_OPT.pack(0, TYPE_OPT, EDNS_UDP, 0, 0, flags, len(option)) + option)
    flags = _QR_RA | (query.flags & _KEPT_FLAGS) | rcode
    header = HEADER.pack(query.id, flags, 1, len(answers), len(authority), len(additional))
    return b"".join([header, raw[_QUESTION_AT : query.question_end], *answers, *authority,
                     *additional])


def _record(owner: int, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return _RECORD.pack(0xC000 | owner, rtype, CLASS_IN, ttl, len(rdata)) + rdata


def _address(owner: int, qtype: int, ttl: int,
             address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The A or AAAA record of `address` for the name at `owner`."""
    return _record(owner, qtype, ttl, address.packed)


def _zone_at(raw: bytes, query: Query, zone: str) -> int:
    """Where in the question the SOA's owner starts: the blocked domain `zone` when the
    name asked for is it or below it, else the name asked for (blocked through a
    CNAME: the SOA must own that name). A '.' in `query.name` is always a label
    boundary (dots inside labels are escaped), so a text suffix is a label suffix."""
    name = query.name
    if name == zone or not name.endswith("." + zone):
        return _QUESTION_AT
    offset = _QUESTION_AT
    for _ in range(name[: len(name) - len(zone) - 1].count(".") + 1):
        offset += raw[offset] + 1
    return offset


def block_answer(raw: bytes, query: Query, verdict: Verdict, settings: DnsSettings) -> bytes:
    """The wire answer for a blocked name."""
    assert verdict.match is not None and verdict.answer is not None
    answer = verdict.answer
    ttl = settings.block_ttl
    answers: list[bytes] = []
    authority: list[bytes] = []
    if answer is Answer.STOPPAGE and query.qtype == TYPE_A:
        answers.append(_address(_QUESTION_AT, TYPE_A, ttl, settings.stoppage_ipv4))
    elif answer is Answer.STOPPAGE and query.qtype == TYPE_AAAA:
        answers.append(_address(_QUESTION_AT, TYPE_AAAA, ttl, settings.stoppage_ipv6))
    elif answer is not Answer.REFUSED:
        zone = _zone_at(raw, query, verdict.match.expression.rstrip("/"))
        authority.append(_record(zone, TYPE_SOA, ttl,
                                 _SOA_NAMES + _SOA_TIMES.pack(1, 3600, 600, 86400, ttl)))
    return _message(raw, query, _RCODE[answer], answers, authority, settings.ede,
                    extra_text(verdict, query.wants_structured_error))


def route_answer(raw: bytes, query: Query, settings: DnsSettings) -> bytes | None:
    """A/AAAA of the proxy for a host that carries URL-level entries; None: forward."""
    address = {TYPE_A: settings.proxy_ipv4, TYPE_AAAA: settings.proxy_ipv6}.get(query.qtype)
    if address is None:
        return None
    record = _address(_QUESTION_AT, query.qtype, settings.block_ttl, address)
    return _message(raw, query, NOERROR, [record], [], None, "")


def badvers_answer(raw: bytes, query: Query) -> bytes:
    """BADVERS (extended rcode 16) with our OPT, version 0 (RFC 6891 6.1.3)."""
    qid, flags = struct.unpack_from("!HH", raw)
    flags = 0x8000 | (flags & 0x7910) | 0x0080
    opt = b"\x00" + struct.pack("!HHBBHH", 41, EDNS_UDP, 16 >> 4, 0, 0, 0)
    return HEADER.pack(qid, flags, 1, 0, 0, 1) + raw[12 : query.question_end] + opt


def error_answer(raw: bytes, rcode: int, query: Query | None = None) -> bytes:
    """SERVFAIL/FORMERR/NOTIMP without dnslib: the header, and the question if it parsed."""
    qid, flags = struct.unpack_from("!HH", raw)
    flags = 0x8000 | (flags & 0x7910) | 0x0080 | rcode  # QR, opcode, RD, CD kept, RA set
    if query is None:
        return HEADER.pack(qid, flags, 0, 0, 0, 0)
    return HEADER.pack(qid, flags, 1, 0, 0, 0) + raw[12 : query.question_end]
