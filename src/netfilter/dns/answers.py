"""Block answers: the Verdict translated into DNS (RCODE, records, Extended DNS Error).

One mapping, in one place: nxdomain -> NXDOMAIN, refused -> REFUSED, stoppage -> the
stop page's A/AAAA (other types: NODATA). Negative answers carry a synthetic SOA so
resolvers cache them for `block_ttl`. When the client sent EDNS, an RFC 8914 Extended
DNS Error names the issuer and the entry reference; when it also sent an EDE option
(draft-ietf-dnsop-structured-dns-error), EXTRA-TEXT is the draft's I-JSON instead.
"""

from __future__ import annotations

import json
import struct

from dnslib import AAAA, EDNS0, QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSRecord, EDNSOption

from netfilter.config import DnsSettings
from netfilter.dns.wire import EDE_OPTION, HEADER, Query
from netfilter.engine import Answer, Verdict

__all__ = ["badvers_answer", "block_answer", "error_answer", "extra_text", "route_answer"]

MAX_EXTRA_TEXT = 400
_RCODE = {Answer.NXDOMAIN: RCODE.NXDOMAIN, Answer.REFUSED: RCODE.REFUSED,
          Answer.STOPPAGE: RCODE.NOERROR}
EDNS_UDP = 1232


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


def _with_edns(reply: DNSRecord, query: Query, ede: int | None, text: str) -> None:
    if not query.edns:
        return
    options = []
    if ede is not None:
        options.append(EDNSOption(EDE_OPTION, struct.pack("!H", ede) + text.encode()))
    flags = "do" if query.dnssec_ok else ""
    reply.add_ar(EDNS0(udp_len=EDNS_UDP, flags=flags, opts=options))


def _reply(raw: bytes, query: Query, rcode: int) -> DNSRecord:
    """A reply to the question alone: the query's other records (TSIG, odd options)
    are never re-parsed, so whatever wire.py accepted can be answered."""
    question_only = raw[:4] + b"\x00\x01\x00\x00\x00\x00\x00\x00" + raw[12 : query.question_end]
    request = DNSRecord.parse(question_only)
    header = DNSHeader(id=query.id, qr=1, rd=request.header.rd, ra=1, rcode=rcode)
    header.cd = (query.flags >> 4) & 1  # RFC 4035 3.2.2: copy CD
    return DNSRecord(header, q=request.q)


def _soa(zone: str, ttl: int) -> RR:
    return RR(zone or ".", QTYPE.SOA, ttl=ttl,
              rdata=SOA("localhost.", "nobody.invalid.", (1, 3600, 600, 86400, ttl)))


def block_answer(raw: bytes, query: Query, verdict: Verdict, settings: DnsSettings) -> bytes:
    """The wire answer for a blocked name."""
    assert verdict.match is not None and verdict.answer is not None
    answer = verdict.answer
    reply = _reply(raw, query, _RCODE[answer])
    ttl = settings.block_ttl
    zone = verdict.match.expression.rstrip("/")
    qname = query.name
    if qname != zone and not qname.endswith("." + zone):
        zone = qname  # blocked through a CNAME: the SOA must own the name asked for
    if answer is Answer.STOPPAGE and query.qtype == QTYPE.A:
        reply.add_answer(RR(reply.q.qname, QTYPE.A, ttl=ttl, rdata=A(str(settings.stoppage_ipv4))))
    elif answer is Answer.STOPPAGE and query.qtype == QTYPE.AAAA:
        reply.add_answer(RR(reply.q.qname, QTYPE.AAAA, ttl=ttl,
                            rdata=AAAA(str(settings.stoppage_ipv6))))
    elif answer is not Answer.REFUSED:
        reply.add_auth(_soa(zone, ttl))
    _with_edns(reply, query, settings.ede, extra_text(verdict, query.wants_structured_error))
    return bytes(reply.pack())


def route_answer(raw: bytes, query: Query, settings: DnsSettings) -> bytes | None:
    """A/AAAA of the proxy for a host that carries URL-level entries; None: forward."""
    address = {QTYPE.A: settings.proxy_ipv4, QTYPE.AAAA: settings.proxy_ipv6}.get(query.qtype)
    if address is None:
        return None
    reply = _reply(raw, query, RCODE.NOERROR)
    rdata = A(str(address)) if query.qtype == QTYPE.A else AAAA(str(address))
    reply.add_answer(RR(reply.q.qname, query.qtype, ttl=settings.block_ttl, rdata=rdata))
    _with_edns(reply, query, None, "")
    return bytes(reply.pack())


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
