"""The C relay's two caches (dns/_hotpath.c): block answers the full path built, and
upstream answers (`dns.cache_size`).

First against the relay itself, with a fake upstream on loopback (exact bytes, bounds,
mutated packets); then through `netfilter serve dns` with a real unbound upstream and
real clients (dnspython, dig): block answers from the cache are the Python-built ones
with the id, flags and question case patched, a list swap empties both caches, TTLs
age, negative answers are cached for the SOA minimum, and the audit log's block counts
equal the blocks answered under a flood.
"""

from __future__ import annotations

import contextlib
import random
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
import yaml

from tests.dns_support import (
    DEMO_ALLOW,
    HOST,
    Netfilter,
    Unbound,
    dig,
    mutate,
    read_events,
    require_tools,
    udp,
    wait_for,
)

_hotpath = pytest.importorskip(
    "netfilter.dns._hotpath",
    reason="the C extension netfilter.dns._hotpath was not built: no relay, no caches")

BOUND = 2.0  # seconds any one packet may take on loopback


def query(name: str, rdtype: str = "A", **kwargs: Any) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()


def answer_to(wire: bytes, *records: tuple[str, int, str, str], rcode: int = 0,
              authority: tuple[tuple[str, int, str, str], ...] = ()) -> bytes:
    """An upstream's answer to the query `wire` (its id and question, as sent)."""
    request = dns.message.from_wire(wire)
    message = dns.message.make_response(request)
    message.set_rcode(rcode)
    for owner, ttl, kind, rdata in records:
        message.answer.append(dns.rrset.from_text(owner, ttl, "IN", kind, rdata))
    for owner, ttl, kind, rdata in authority:
        message.authority.append(dns.rrset.from_text(owner, ttl, "IN", kind, rdata))
    return message.to_wire()  # dnspython keeps the question's letter case


def ttls(wire: bytes) -> list[int]:
    message = dns.message.from_wire(wire, one_rr_per_rrset=True)
    return [rrset.ttl for section in (message.answer, message.authority) for rrset in section]


class Rig:
    """A client, the relay's two sockets and a fake upstream on 127.0.0.1; no sleeps:
    each step waits (bounded) for its packet to be readable."""

    def __init__(self, cache_size: int = 64, block_cache_size: int = 64,
                 max_block_counts: int = 64) -> None:
        self.client = self._socket()
        self.listen = self._socket()
        self.upstream = self._socket()
        self.to_upstream = self._socket()
        self.to_upstream.connect(self.upstream.getsockname())
        self.relay = _hotpath.Relay(self.listen.fileno(), self.to_upstream.fileno(), 5.0,
                                    cache_size=cache_size, block_cache_size=block_cache_size,
                                    max_block_counts=max_block_counts)
        self.state: dict[str, object] = {}
        assert self.relay.from_clients(self.state) == []  # the lists in force: this one

    @staticmethod
    def _socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HOST, 0))
        sock.settimeout(BOUND)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        return sock

    @staticmethod
    def _readable(sock: socket.socket) -> bool:
        return bool(select.select([sock], [], [], BOUND)[0])

    def ask(self, *wires: bytes) -> list[tuple[bytes, Any]]:
        """Send queries; the relay reads them all; what it hands to Python."""
        for wire in wires:
            self.client.sendto(wire, self.listen.getsockname())
        assert self._readable(self.listen)
        handed: list[tuple[bytes, Any]] = []
        for _ in range(len(wires)):  # bounded: one read per query at most
            handed += self.relay.from_clients(self.state)
            if not select.select([self.listen], [], [], 0)[0]:
                break
        return handed

    def upstream_gets(self) -> bytes:
        return self.upstream.recvfrom(65536)[0]

    def upstream_idle(self) -> bool:
        return not select.select([self.upstream], [], [], 0.2)[0]

    def reply(self, wire: bytes) -> list[tuple[bytes, bytes, Any]]:
        self.upstream.sendto(wire, self.to_upstream.getsockname())
        assert self._readable(self.to_upstream)
        handed, refused = self.relay.from_upstream()
        assert not refused
        return handed

    def client_gets(self) -> bytes:
        return self.client.recvfrom(65536)[0]

    def forward(self, wire: bytes, answer: bytes) -> bytes:
        """A query the relay forwards; the upstream's `answer` (made for the query as
        sent upstream) relayed back: what the client gets."""
        assert self.ask(wire) == []
        sent = self.upstream_gets()
        assert self.reply(sent[:2] + answer[2:]) == []
        return self.client_gets()

    def close(self) -> None:
        for sock in (self.client, self.listen, self.upstream, self.to_upstream):
            sock.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    rig = Rig()
    yield rig
    rig.close()


def with_question_of(answer: bytes, wire: bytes) -> bytes:
    """`answer` as it must reach the client that sent `wire`: its id, RD and CD bits,
    and question bytes (letter case)."""
    end = 12 + len(dns.message.from_wire(wire).question[0].name.to_wire()) + 4
    flags2 = (answer[2] & ~0x01) | (wire[2] & 0x01)
    flags3 = (answer[3] & ~0x10) | (wire[3] & 0x10)
    return wire[:2] + bytes([flags2, flags3]) + answer[4:12] + wire[12:end] + answer[end:]


# ---------------------------------------------------------------- block answers


def test_block_answer_is_served_patched_and_counted(rig: Rig) -> None:
    first = query("blocked.example", use_edns=False)
    rig.state["blocked.example"] = "a match"
    assert rig.ask(first) == [(first, rig.client.getsockname())]
    built = answer_to(first, ("blocked.example.", 300, "A", "127.0.0.1"))
    assert rig.relay.remember_block(first, built, rig.state, "token")
    again = bytearray(query("BlOcKeD.ExAmPlE", use_edns=False))
    again[2] &= ~0x01  # RD off this time
    again[3] |= 0x10  # and CD on
    assert rig.ask(bytes(again)) == []
    assert rig.client_gets() == with_question_of(built, bytes(again))
    # Another form (EDNS) is another answer: the full path builds it.
    edns = query("blocked.example", use_edns=0)
    assert rig.ask(edns) == [(edns, rig.client.getsockname())]
    assert rig.relay.block_counts() == [("token", HOST, 1)]
    assert rig.relay.block_counts() == []
    assert rig.relay.counts()["blocks_answered"] == 1


def test_block_answers_by_form(rig: Rig) -> None:
    """EDNS, DO and an EDE option in the query each select their own answer."""
    rig.state["blocked.example"] = "a match"
    forms = {
        "plain": {"use_edns": False},
        "edns": {"use_edns": 0},
        "do": {"want_dnssec": True},
        "ede": {"use_edns": 0, "options": [dns.edns.EDEOption(dns.edns.EDECode.OTHER)]},
    }
    built = {}
    for form, kwargs in forms.items():
        wire = query("blocked.example", **kwargs)
        built[form] = answer_to(wire, ("blocked.example.", 300, "TXT", f'"{form}"'))
        assert rig.relay.remember_block(wire, built[form], rig.state, form)
    for form, kwargs in forms.items():
        wire = query("Blocked.Example", **kwargs)
        assert rig.ask(wire) == []
        assert rig.client_gets() == with_question_of(built[form], wire)
    assert sorted(token for token, _, _ in rig.relay.block_counts()) == sorted(forms)


def test_remember_block_refuses_what_it_cannot_serve(rig: Rig) -> None:
    wire = query("blocked.example", use_edns=False)
    good = answer_to(wire, ("blocked.example.", 300, "A", "127.0.0.1"))
    assert not rig.relay.remember_block(wire, good, {}, "token")  # not the lists in force
    assert not rig.relay.remember_block(b"\x00" * 5, good, rig.state, "token")
    other = answer_to(query("other.example"), ("other.example.", 300, "A", "127.0.0.1"))
    assert not rig.relay.remember_block(wire, other, rig.state, "token")  # another question
    assert not rig.relay.remember_block(wire, good + b"x" * 1300, rig.state, "token")
    with pytest.raises(TypeError):
        rig.relay.remember_block(wire, good, rig.state)  # type: ignore[call-arg]


def test_a_new_host_cache_empties_both_caches(rig: Rig) -> None:
    """A list swap makes a new host cache: nothing decided before it is served after."""
    rig.state["clean.example"] = None
    rig.state["blocked.example"] = "a match"
    clean = query("clean.example", use_edns=False)
    rig.forward(clean, answer_to(clean, ("clean.example.", 300, "A", "192.0.2.1")))
    assert rig.ask(clean) == [] and rig.client_gets()  # from the cache
    blocked = query("blocked.example", use_edns=False)
    assert rig.relay.remember_block(
        blocked, answer_to(blocked, ("blocked.example.", 300, "A", "127.0.0.1")), rig.state, 1)
    assert rig.ask(blocked) == [] and rig.client_gets()
    rig.state = {"clean.example": "now blocked", "blocked.example": None}
    assert rig.ask(clean) == [(clean, rig.client.getsockname())]
    assert rig.ask(blocked) == []  # forwarded now, not answered from the block cache
    assert rig.upstream_gets()[2:] == blocked[2:]
    assert rig.relay.counts()["cache_flushes"] == 1
    assert rig.relay.block_counts() == [(1, HOST, 1)]  # counted under the old lists


def test_block_counts_full_hands_over() -> None:
    """Past max_block_counts (block answer, client) pairs, blocks take the full path:
    none is answered uncounted."""
    rig = Rig(max_block_counts=2)
    try:
        rig.state.update({f"b{i}.example": "a match" for i in range(3)})
        wires = [query(f"b{i}.example", use_edns=False) for i in range(3)]
        for i, wire in enumerate(wires):
            built = answer_to(wire, (f"b{i}.example.", 300, "A", "127.0.0.1"))
            assert rig.relay.remember_block(wire, built, rig.state, i)
        assert rig.ask(wires[0]) == [] and rig.client_gets()
        assert rig.ask(wires[1]) == [] and rig.client_gets()
        assert rig.ask(wires[2]) == [(wires[2], rig.client.getsockname())]
        assert rig.relay.counts()["block_counts_full"] == 1
        assert sorted(rig.relay.block_counts()) == [(0, HOST, 1), (1, HOST, 1)]
        assert rig.ask(wires[2]) == [] and rig.client_gets()  # room again
    finally:
        rig.close()


# ---------------------------------------------------------------- upstream answers


def test_answers_are_cached_with_ttls_aging(rig: Rig) -> None:
    rig.state["clean.example"] = None
    wire = query("clean.example", use_edns=False)
    answer = answer_to(wire, ("clean.example.", 300, "A", "192.0.2.1"),
                       ("clean.example.", 100, "A", "192.0.2.2"))
    assert rig.forward(wire, answer)[2:] == answer[2:]
    asked = query("CLEAN.example", use_edns=False)
    assert rig.ask(asked) == []
    cached = rig.client_gets()
    assert rig.upstream_idle()  # answered from the cache, not asked upstream
    assert cached[:2] == asked[:2] and cached[12:27] == asked[12:27]
    assert not cached[2] & 0x04  # AA cleared: a cached answer is not authoritative
    assert ttls(cached) in ([300, 100], [299, 99])
    time.sleep(1.2)  # the clock must move a whole second for TTLs to age
    assert rig.ask(asked) == []
    assert max(ttls(rig.client_gets())) < 300
    # Another form of the same question (EDNS) is another entry.
    edns = query("clean.example", use_edns=0)
    assert rig.ask(edns) == [] and rig.upstream_gets()[12:] == edns[12:]


def test_an_entry_expires_with_its_least_ttl(rig: Rig) -> None:
    rig.state["short.example"] = None
    wire = query("short.example", use_edns=False)
    rig.forward(wire, answer_to(wire, ("short.example.", 1, "A", "192.0.2.1"),
                                ("short.example.", 300, "A", "192.0.2.2")))
    time.sleep(1.2)
    assert rig.ask(wire) == []
    assert rig.upstream_gets()[2:] == wire[2:]  # expired: asked upstream again
    assert rig.relay.counts()["cache_expired"] == 1


SOA = ("example.", 3600, "SOA", "ns.example. host.example. 1 3600 600 86400 60")


def test_negative_answers_cached_for_the_soa_minimum(rig: Rig) -> None:
    rig.state["missing.example"] = None
    wire = query("missing.example", use_edns=False)
    nx = answer_to(wire, rcode=dns.rcode.NXDOMAIN, authority=(SOA,))
    rig.forward(wire, nx)
    assert rig.ask(wire) == []
    cached = dns.message.from_wire(rig.client_gets())
    assert rig.upstream_idle()
    assert cached.rcode() == dns.rcode.NXDOMAIN
    assert cached.authority[0].ttl in (60, 59)  # min(SOA TTL, SOA minimum), RFC 2308
    # NODATA with a SOA too
    rig.state["clean.example"] = None
    nodata_q = query("clean.example", "TXT", use_edns=False)
    rig.forward(nodata_q, answer_to(nodata_q, authority=(SOA,)))
    assert rig.ask(nodata_q) == [] and rig.upstream_idle()
    assert dns.message.from_wire(rig.client_gets()).authority[0].ttl in (60, 59)


@pytest.mark.parametrize("case", ["nxdomain without soa", "servfail", "truncated", "ttl 0",
                                  "refused"])
def test_what_is_not_cached(rig: Rig, case: str) -> None:
    rig.state["x.example"] = None
    wire = query("x.example", use_edns=False)
    answer = {
        "nxdomain without soa": answer_to(wire, rcode=dns.rcode.NXDOMAIN),
        "servfail": answer_to(wire, rcode=dns.rcode.SERVFAIL),
        "refused": answer_to(wire, rcode=dns.rcode.REFUSED),
        "truncated": (lambda a: a[:2] + bytes([a[2] | 0x02]) + a[3:])(
            answer_to(wire, ("x.example.", 300, "A", "192.0.2.1"))),
        "ttl 0": answer_to(wire, ("x.example.", 0, "A", "192.0.2.1")),
    }[case]
    assert rig.ask(wire) == []
    sent = rig.upstream_gets()
    rig.upstream.sendto(sent[:2] + answer[2:], rig.to_upstream.getsockname())
    assert rig._readable(rig.to_upstream)
    rig.relay.from_upstream()
    rig.client.settimeout(0.5)
    with contextlib.suppress(TimeoutError):  # relayed, or handed to Python: either way
        rig.client_gets()
    assert rig.ask(wire) == []
    assert rig.upstream_gets()[2:] == wire[2:]  # asked upstream again
    assert rig.relay.counts()["cache_inserted"] == 0


def test_per_exchange_edns_options_are_not_cached(rig: Rig) -> None:
    """A COOKIE (or padding) in the upstream's OPT belongs to one exchange: left out."""
    rig.state["clean.example"] = None
    wire = query("clean.example", use_edns=0)
    message = dns.message.make_response(dns.message.from_wire(wire))
    message.answer.append(dns.rrset.from_text("clean.example.", 300, "IN", "A", "192.0.2.1"))
    message.use_edns(0, options=[dns.edns.GenericOption(10, b"c" * 16),
                                 dns.edns.EDEOption(dns.edns.EDECode.STALE_ANSWER)])
    rig.forward(wire, message.to_wire())
    assert rig.ask(wire) == []
    cached = dns.message.from_wire(rig.client_gets())
    assert [o.otype for o in cached.options] == [dns.edns.OptionType.EDE]


def test_client_subnet_queries_bypass_the_cache(rig: Rig) -> None:
    """An answer to a query with an EDNS client subnet may be that subnet's own: such
    queries are neither answered from the cache nor stored in it."""
    rig.state["clean.example"] = None
    wire = query("clean.example", use_edns=0,
                 options=[dns.edns.ECSOption("192.0.2.0", 24)])
    for _ in range(2):
        message = dns.message.make_response(dns.message.from_wire(wire))
        message.answer.append(dns.rrset.from_text("clean.example.", 300, "IN", "A",
                                                  "192.0.2.1"))
        assert rig.forward(wire, message.to_wire())
    assert rig.relay.counts()["cache_inserted"] == 0


def test_bounded_under_unique_names_and_the_hot_set_stays() -> None:
    """20,000 names asked once each (random subdomains) through a cache of 256: it
    never holds more than 256, and names asked twice before the flood (promoted out of
    probation) are still served from it after."""
    rig = Rig(cache_size=256)
    try:
        hot = [f"hot{i}.example" for i in range(32)]
        for name in hot:
            rig.state[name] = None
            wire = query(name, use_edns=False)
            rig.forward(wire, answer_to(wire, (f"{name}.", 3600, "A", "192.0.2.1")))
            assert rig.ask(wire) == [] and rig.client_gets()  # a hit: promoted
        for start in range(0, 20_000, 32):
            names = [f"r{start + i}.flood.example" for i in range(32)]
            rig.state.update(dict.fromkeys(names))
            wires = [query(name, use_edns=False) for name in names]
            assert rig.ask(*wires) == []
            for _ in wires:
                sent = rig.upstream_gets()
                name = dns.message.from_wire(sent).question[0].name.to_text()
                rig.upstream.sendto(answer_to(sent, (name, 3600, "A", "192.0.2.2")),
                                    rig.to_upstream.getsockname())
            got = 0
            while got < len(wires):  # bounded: each read takes at least one answer
                assert rig._readable(rig.to_upstream)
                rig.relay.from_upstream()
                while select.select([rig.client], [], [], 0)[0] and got < len(wires):
                    rig.client_gets()
                    got += 1
            rig.state.clear()
            rig.state.update(dict.fromkeys(hot))
            assert rig.relay.cache_stats()["cache_entries"] <= 256
        assert rig.relay.counts()["cache_inserted"] >= 20_000
        assert rig.relay.counts()["cache_evicted"] >= 20_000 - 256
        for name in hot:
            wire = query(name, use_edns=False)
            assert rig.ask(wire) == [] and rig.client_gets()
        assert rig.upstream_idle()  # every hot name still from the cache
    finally:
        rig.close()


def _answer_seeds() -> list[tuple[bytes, bytes]]:
    out = []
    for name, kwargs in (("a.example", {"use_edns": False}), ("b.example", {"use_edns": 0})):
        wire = query(name, **kwargs)
        out.append((wire, answer_to(wire, (f"{name}.", 300, "A", "192.0.2.1"),
                                    authority=(SOA,))))
        out.append((wire, answer_to(wire, rcode=dns.rcode.NXDOMAIN, authority=(SOA,))))
    return out


def test_mutated_upstream_answers_never_break_the_cache() -> None:
    """Mutated answers (header and question kept, so the relay takes them) are cached
    or not, never crash it; whatever it then serves parses as far as it was given."""
    rig = Rig(cache_size=8)
    rng = random.Random(15)
    try:
        for round_ in range(600):
            wire, answer = rng.choice(_answer_seeds())
            name = dns.message.from_wire(wire).question[0].name.to_text().rstrip(".")
            rig.state.clear()
            rig.state[name] = None
            rig.relay.flush()
            end = 12 + len(name) + 2 + 4
            edits = [(rng.randrange(256), rng.randrange(256), rng.choice("xsdi."))
                     for _ in range(rng.randint(1, 4))]
            body = mutate(answer[end:], edits) if round_ % 10 else b""
            mutated = answer[:12] + answer[12:end] + body
            assert rig.ask(wire) == []
            sent = rig.upstream_gets()
            rig.upstream.sendto(sent[:2] + mutated[2:], rig.to_upstream.getsockname())
            assert rig._readable(rig.to_upstream)
            handed, _ = rig.relay.from_upstream()
            if not handed:
                rig.client_gets()
            if rig.relay.cache_stats()["cache_entries"]:
                assert rig.ask(wire) == []
                served = rig.client_gets()
                assert served[:2] == wire[:2] and served[12:end] == wire[12:end]
                assert len(served) <= len(mutated)
    finally:
        rig.close()


def test_mutated_block_answers_and_queries_never_break_it() -> None:
    """remember_block with mutated queries and answers keeps or refuses them; a kept
    one is served with the asking query's id and question, never past its length."""
    rig = Rig()
    rng = random.Random(8914)
    try:
        seed = query("blocked.example", use_edns=0)
        built = answer_to(seed, ("blocked.example.", 300, "A", "127.0.0.1"))
        rig.state["blocked.example"] = "a match"
        for _ in range(1500):
            edits = [(rng.randrange(256), rng.randrange(256), rng.choice("xsdi."))
                     for _ in range(rng.randint(1, 3))]
            wire = mutate(seed, edits) if rng.random() < 0.5 else seed
            answer = mutate(built, edits) if rng.random() < 0.7 else built
            kept = rig.relay.remember_block(wire, answer, rig.state, "token")
            if kept:
                asking = query("BLOCKED.example", use_edns=0)
                if _hotpath.question(wire) is not None and wire[12:] == seed[12:]:
                    assert rig.ask(asking) == []
                    served = rig.client_gets()
                    assert served[:2] == asking[:2] and len(served) == len(answer)
            rig.relay.flush()
            rig.relay.from_clients(rig.state)
        rig.relay.block_counts()
    finally:
        rig.close()


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    require_tools("unbound", "dig")
    directory = tmp_path_factory.mktemp("cache-unbound")
    server = Unbound(directory)
    text = server.conf.read_text(encoding="utf-8")  # a SOA, for negative answers
    server.conf.write_text(text.replace(
        '  local-zone: "example." static\n',
        '  local-zone: "example." static\n'
        '  local-data: "example. 3600 IN SOA ns.example. host.example. 1 3600 600 86400 60"\n'),
        encoding="utf-8")
    with server:
        yield server


def _raw(wire: bytes, port: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(BOUND)
        sock.sendto(wire, (HOST, port))
        return sock.recvfrom(65536)[0]


def _counts(server: Netfilter) -> dict[str, int]:
    """The counters `dns: stopped; ...` logs at exit."""
    line = next(line for line in server.log().splitlines() if "dns: stopped; " in line)
    items = line.split("dns: stopped; ", 1)[1].split(", ")
    return {key: int(value) for key, value in (item.split() for item in items)}


FORMS: dict[str, dict[str, Any]] = {
    "no edns": {"use_edns": False},
    "edns": {"use_edns": 0},
    "dnssec ok": {"want_dnssec": True},
    "ede option": {"use_edns": 0, "options": [dns.edns.EDEOption(dns.edns.EDECode.OTHER)]},
}


@pytest.mark.parametrize("action", ["nxdomain", "stoppage"])
def test_cached_block_answers_equal_the_python_built_ones(upstream: Unbound, tmp_path: Path,
                                                          action: str) -> None:
    """For each form and type: the first query's answer is built in Python, the next
    ones come from the relay's block cache; byte for byte the same but for the id,
    RD/CD and the question's letter case, which are the asking query's."""
    from tests.support import DEMO_LIST, DEMO_PUB

    server = Netfilter(tmp_path, upstreams=[upstream.address],
                       lists=[{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)],
                               "action": action}])
    with server:
        for form, kwargs in FORMS.items():
            for rdtype in ("A", "AAAA", "TXT"):
                first = query("www.blocked.example", rdtype, **kwargs)
                built = _raw(first, server.port)
                for name in ("WWW.Blocked.Example", "www.blocked.example"):
                    again = bytearray(query(name, rdtype, **kwargs))
                    again[3] |= 0x10  # CD
                    got = _raw(bytes(again), server.port)
                    assert got == with_question_of(built, bytes(again)), (form, rdtype)
                parsed = dns.message.from_wire(built)
                if parsed.edns >= 0:
                    assert parsed.extended_errors()[0].code == 16, form
        out = dig(server.port, "www.blocked.example", "A")
        assert "EDE: 16 (Censored)" in out and "DEMO-0001" in out, out
        server.stop()
    counts = _counts(server)
    assert counts["blocks_answered"] == len(FORMS) * 3 * 2 + 1  # the dig included
    assert counts["blocked"] == len(FORMS) * 3 * 3 + 1


def test_a_name_that_turns_blocked_is_blocked_at_once(upstream: Unbound,
                                                      tmp_path: Path) -> None:
    """A clean answer in the cache (TTL 300), then a SIGHUP with a local list that blocks
    the name: once the reload is in force the name is blocked, not served from the
    cache (test_a_new_host_cache_empties_both_caches covers the relay's side)."""
    block = tmp_path / "block.yaml"
    block.write_text("entries: []\n", encoding="utf-8")
    server = Netfilter(tmp_path, upstreams=[upstream.address],
                       local={"block": str(block), "action": "nxdomain",
                              "allow": str(DEMO_ALLOW)})
    with server:
        ask = dns.message.make_query("www.clean.example", "A")
        for _ in range(4):  # the second is relayed, the rest from the cache
            assert udp(ask, server.port).answer
        for _ in range(3):
            assert udp(dns.message.make_query("blocked.example", "A"),
                       server.port).rcode() == dns.rcode.NXDOMAIN
        block.write_text("entries:\n  - www.clean.example\n", encoding="utf-8")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        # The reload runs off the loop: poll (bounded) until it is in force. The cached
        # clean answer has 300 s left, so only an emptied cache lets this pass.
        assert wait_for(lambda: udp(ask, server.port).rcode() == dns.rcode.NXDOMAIN, 20)
        for _ in range(3):
            assert udp(ask, server.port).rcode() == dns.rcode.NXDOMAIN
        server.stop()
    counts = _counts(server)
    assert counts["cache_flushes"] >= 1
    assert counts["cache_hits"] >= 2


def test_ttls_age_and_negative_answers_are_cached(upstream: Unbound, tmp_path: Path) -> None:
    server = Netfilter(tmp_path, upstreams=[upstream.address])
    with server:
        ask = dns.message.make_query("clean.example", "A")
        first = [udp(ask, server.port) for _ in range(3)]  # full path, relayed, cached
        assert all(r.answer[0].ttl == 300 for r in first[:2])
        time.sleep(2.1)  # whole seconds must pass for a TTL to age
        later = udp(ask, server.port)
        assert later.answer[0].ttl <= 298
        assert later.answer[0].items == first[0].answer[0].items
        missing = dns.message.make_query("nothing-here.example", "A")
        answers = [udp(missing, server.port) for _ in range(4)]
        assert all(r.rcode() == dns.rcode.NXDOMAIN for r in answers)
        assert all(r.authority and r.authority[0].ttl <= 60 for r in answers[2:])
        server.stop()
    counts = _counts(server)
    assert counts["cache_hits"] >= 3  # 1 aged + 2 negative
    assert counts["relayed"] == 2  # each name's second query; the rest from the cache


def test_cache_size_0_switches_it_off(upstream: Unbound, tmp_path: Path) -> None:
    server = Netfilter(tmp_path, upstreams=[upstream.address], cache_size=0)
    with server:
        ask = dns.message.make_query("clean.example", "A")
        for _ in range(5):
            assert udp(ask, server.port).answer
        server.stop()
    counts = _counts(server)
    assert counts["relayed"] == 4 and counts.get("cache_hits", 0) == 0


def test_audit_counts_exact_under_a_block_flood(upstream: Unbound, tmp_path: Path) -> None:
    """3 blocked names x 2 client addresses x 400 queries, as fast as the clients send:
    every block answered is in the log's counts, and each (entry, client) pair costs
    the log its first event and one summary (one window: aggregate_window 3600)."""
    server = Netfilter(tmp_path, upstreams=[upstream.address], audit_client="full",
                       audit={"aggregate_window": 3600})
    names = ["blocked.example", "a.blocked.example", "blocked.test"]
    clients = []
    for address in ("127.0.0.1", "127.0.0.2"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, 0))
        sock.settimeout(BOUND)
        clients.append(sock)
    answered = 0
    with server:
        try:
            for _ in range(400):
                for sock in clients:
                    for name in names:
                        sock.sendto(query(name, use_edns=False), (HOST, server.port))
                for sock in clients:  # keep at most a few in flight per client
                    for _ in names:
                        reply = dns.message.from_wire(sock.recvfrom(65536)[0])
                        assert reply.rcode() == dns.rcode.NXDOMAIN
                        answered += 1
        finally:
            for sock in clients:
                sock.close()
        server.stop()
    assert answered == 2400
    blocks = [e for e in read_events(server.events_path) if e["type"] == "block"]
    assert sum(e.get("count", 1) for e in blocks) == 2400
    keys = {(e["ref"], e["client"]) for e in blocks}
    assert len(keys) == 4  # blocked.example and a.blocked.example: one entry
    assert len(blocks) <= 2 * len(keys)
    assert _counts(server)["blocks_answered"] >= 2400 - 3 * 2 * 2


def test_relay_config_key_round_trips(tmp_path: Path) -> None:
    """dns.cache_size is a documented key: 0 and a size are accepted, negatives not."""
    from netfilter.config import DnsSettings

    assert DnsSettings().cache_size > 0
    assert DnsSettings(cache_size=0).cache_size == 0
    with pytest.raises(ValueError):
        DnsSettings(cache_size=-1)
    assert yaml.safe_dump({"dns": {"cache_size": 0}})
