"""A block answer and a canary answer, written: answers.py against dnslib (the baseline).

answers.py writes one `Reply` for the resolver (wire) and the Unbound plugin (records);
the design keeps dnslib off the hot path, and this shows what that buys per answer:
the same NXDOMAIN + SOA + EDE answer to an EDNS query, built by dnslib from the parsed
query, in the same run. Times are reported, never asserted; the bytes are checked
equal in meaning (dnspython reads both).
"""

from __future__ import annotations

import struct

import dns.message
import dns.rcode
from dnslib import EDNS0, QTYPE, RR, SOA, DNSRecord, EDNSOption

from netfilter.config import DnsSettings
from netfilter.dns.answers import block_answer, to_wire
from netfilter.dns.canaries import Canaries
from netfilter.dns.wire import parse_query
from netfilter.engine import Action, Answer, Verdict
from netfilter.lists import Match
from support import Figures, timed

TABLE = "DNS: a block answer to an EDNS query, written (NXDOMAIN, SOA, EDE)"
OPS = 20_000
SETTINGS = DnsSettings(canaries=True)
VERDICT = Verdict(Action.BLOCK, Match(list_id="bench", list_version=1, ref="B-1",
                                      category="c", kind="domain", source="authority",
                                      expression="blocked.example/"), Answer.NXDOMAIN, None)
RAW = dns.message.make_query("www.blocked.example", "A", use_edns=0).to_wire()


def _dnslib(raw: bytes) -> bytes:
    """What building the answer with dnslib costs: parse, reply, SOA, EDNS with EDE."""
    request = DNSRecord.parse(raw)
    reply = request.reply()
    reply.header.rcode = 3
    reply.add_auth(RR("blocked.example", QTYPE.SOA, ttl=300,
                      rdata=SOA("localhost", "nobody.invalid", (1, 3600, 600, 86400, 300))))
    text = b"Blocked by bench: list bench v1, entry B-1"
    reply.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(15, struct.pack("!H", 16) + text)]))
    return bytes(reply.pack())


def _ours(raw: bytes) -> bytes:
    return block_answer(raw, parse_query(raw), VERDICT, SETTINGS)


def test_block_answer_vs_dnslib(figures: Figures) -> None:
    for build in (_dnslib, _ours):
        answer = dns.message.from_wire(build(RAW))
        assert answer.rcode() == dns.rcode.NXDOMAIN and answer.authority
        assert [e.code for e in answer.extended_errors()] == [16]

    def run(build: object) -> None:
        for _ in range(OPS):
            build(RAW)  # type: ignore[operator]

    figures.time(TABLE, "dnslib: parse + reply + SOA + EDE, packed", timed(
        lambda: run(_dnslib), 5) / OPS, baseline=True, unit="answer")
    figures.time(TABLE, "answers.py: parse_query + block_answer", timed(
        lambda: run(_ours), 5) / OPS, unit="answer")
    canaries = Canaries(SETTINGS)
    canary = dns.message.make_query("use-application-dns.net", "A", use_edns=0).to_wire()
    query = parse_query(canary)
    assert dns.message.from_wire(to_wire(canary, query, canaries.reply(
        query.name, query.qtype))).rcode() == dns.rcode.NXDOMAIN

    def canary_run() -> None:
        for _ in range(OPS):
            q = parse_query(canary)
            if canaries.label(q.name) is not None:
                to_wire(canary, q, canaries.reply(q.name, q.qtype))

    figures.time(TABLE, "a canary answer (parse, look up, write)", timed(canary_run, 5) / OPS,
                 unit="answer")
