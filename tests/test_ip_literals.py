"""IP literals: every spelling of one address is one host, and an IPv4 address in IPv6
clothes (IPv4-mapped, NAT64 well-known prefix) is that IPv4 host, for matching and for
`proxy.allowed_destinations`. Checked against Python's own `ipaddress` module."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netfilter.canonical import (
    canonical_host,
    canonical_parts,
    embedded_ipv4,
    expressions,
    host_expressions,
    is_ip_literal,
)
from netfilter.config import load_config
from netfilter.engine import Engine
from netfilter.proxy.destinations import DestinationPolicy

_NAT64 = 0x64FF9B << 96
_MAPPED = 0xFFFF << 32

_GROUP = st.one_of(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0x64, 0xFF9B, 0xFE80]),
                   st.integers(0, 0xFFFF))
addresses = st.one_of(
    st.integers(0, 2**128 - 1),
    st.lists(_GROUP, min_size=8, max_size=8).map(
        lambda gs: sum(g << (112 - 16 * i) for i, g in enumerate(gs))),
    st.integers(0, 2**32 - 1).map(lambda v: _MAPPED | v),
    st.integers(0, 2**32 - 1).map(lambda v: _NAT64 | v),
    st.integers(0, 2**32 - 1),  # IPv4-compatible (deprecated): stays IPv6
    st.integers(0, 2**32 - 1).map(lambda v: 0xFFFF << 48 | v),  # SIIT: stays IPv6
)
# Zone ids as interface names; the first letter is no hex digit, so '%' + zone is
# never read as a percent escape.
zones = st.one_of(st.none(), st.from_regex(r"[g-z][a-z0-9]{0,5}", fullmatch=True))


def _mixed_case(text: str, mask: int) -> str:
    return "".join(c.upper() if mask >> i & 1 else c for i, c in enumerate(text))


@st.composite
def spelling(draw: st.DrawFn, value: int) -> str:
    """Any text `ipaddress` reads as `value`: leading zeros, either case, '::' over any
    run of zero groups (or none), the last 32 bits as a dotted quad or not."""
    groups = [value >> (112 - 16 * i) & 0xFFFF for i in range(8)]
    items = []
    for group in groups:
        digits = f"{group:x}"
        digits = digits.rjust(draw(st.integers(len(digits), 4)), "0")
        items.append(_mixed_case(digits, draw(st.integers(0, 15))))
    hex_count = 8
    if draw(st.booleans()):
        items[6:] = [str(ipaddress.IPv4Address(value & 0xFFFFFFFF))]
        hex_count = 6
    runs = [(start, end) for start in range(hex_count) for end in range(start + 1, hex_count + 1)
            if all(g == 0 for g in groups[start:end])]
    if not runs or draw(st.booleans()):
        return ":".join(items)
    start, end = draw(st.sampled_from(runs))
    return ":".join(items[:start]) + "::" + ":".join(items[end:])


def expected_host(value: int, zone: str | None) -> str:
    """The one canonical spelling, by `ipaddress`: the IPv4 host for a mapped or NAT64
    address, else the compressed (RFC 5952) form and zone in brackets, '%' escaped."""
    address = ipaddress.IPv6Address(value)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if value >> 32 == _NAT64 >> 32:
        return str(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    return f"[{address.compressed}{'%25' + zone if zone else ''}]"


@given(st.data(), addresses, zones)
def test_every_spelling_is_one_host(data: st.DataObject, value: int, zone: str | None) -> None:
    text = data.draw(spelling(value))
    assert ipaddress.IPv6Address(text) == ipaddress.IPv6Address(value)  # the generator
    spelled_zone = _mixed_case(zone, data.draw(st.integers(0, 63))) if zone else None
    at = f"%{spelled_zone}" if spelled_zone else ""
    port = data.draw(st.sampled_from(["", ":80", ":8443"]))
    want = expected_host(value, zone)
    assert canonical_parts(f"http://[{text}{at.replace('%', '%25')}]{port}/a/b?c")[0] == want
    assert canonical_parts(f"HTTP://[{text}{at}]{port}/")[0] == want
    assert canonical_host(f"{text}{at}") == want  # CONNECT, resolver: unbracketed
    assert canonical_host(f"[{text}{at}]{port}") == want  # Host header, SNI
    assert canonical_host(want) == want
    assert is_ip_literal(want)


@given(st.data(), addresses)
def test_two_spellings_give_the_same_expressions(data: st.DataObject, value: int) -> None:
    first, second = data.draw(spelling(value)), data.draw(spelling(value))
    want = expected_host(value, None)
    url = "/dir/sub/page.html?q=1"
    assert expressions(f"http://[{first}]{url}") == expressions(f"http://[{second}]{url}")
    assert expressions(f"http://[{first}]{url}") == expressions(f"http://{want}{url}")
    assert host_expressions(first) == host_expressions(second) == [f"{want}/"]


@pytest.mark.parametrize(
    ("address", "ipv4"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:7f00:1", "127.0.0.1"),
        ("64:ff9b::192.0.2.1", "192.0.2.1"),
        ("::127.0.0.1", None),  # IPv4-compatible, deprecated (RFC 4291 2.5.5.1)
        ("::ffff:0:127.0.0.1", None),  # SIIT (RFC 2765), obsolete
        ("64:ff9b:1::7f00:1", None),  # local-use prefix (RFC 8215), length unknown
        ("2001:db8::1", None),
    ],
)
def test_embedded_ipv4(address: str, ipv4: str | None) -> None:
    found = embedded_ipv4(ipaddress.IPv6Address(address))
    assert (str(found) if found else None) == ipv4


def test_an_ipv4_entry_blocks_its_ipv6_forms(tmp_path: Path) -> None:
    block = tmp_path / "block.yaml"
    block.write_text('entries: ["127.0.0.1", {url: "http://192.0.2.5/dir/", ref: X-2}]\n',
                     encoding="utf-8")
    config = tmp_path / "netfilter.yaml"
    config.write_text(f"node: {{id: t, key: {tmp_path / 'node.key'}}}\nlists: []\n"
                      f"local: {{block: {block}}}\n", encoding="utf-8")
    engine = Engine(load_config(config))
    for url in ["http://[::ffff:127.0.0.1]/", "http://[::FFFF:7F00:1]:8080/x",
                "http://[0:0:0:0:0:ffff:127.0.0.1]/", "http://[64:ff9b::7f00:1]/",
                "https://[::ffff:127.0.0.1%25lo]/"]:
        assert engine.check_url(url).blocked, url
    for host in ["::ffff:127.0.0.1", "[::ffff:7f00:1]:443", "64:ff9b::127.0.0.1"]:
        assert engine.check_host(host, frontend="proxy").blocked, host
    assert engine.check_url("http://[::ffff:c000:205]/dir/page").blocked
    assert not engine.check_url("http://[::ffff:c000:205]/other/").blocked
    assert not engine.check_url("http://[::127.0.0.1]/").blocked
    assert not engine.check_url("http://[::1]/").blocked


@pytest.mark.parametrize(
    ("networks", "host", "allowed"),
    [
        (["127.0.0.0/8"], "::ffff:127.0.0.1", True),
        (["127.0.0.0/8"], "[::FFFF:7f00:1]", True),
        (["127.0.0.0/8"], "::ffff:10.0.0.1", False),
        (["::/0"], "::ffff:10.0.0.1", False),  # the socket speaks IPv4 to 10.0.0.1
        (["::ffff:0:0/96"], "::ffff:10.0.0.1", False),
        (["127.0.0.0/8"], "64:ff9b::7f00:1", False),  # the translator is not allowed
        (["64:ff9b::/96"], "64:ff9b::a00:1", False),  # 10.0.0.1 is not allowed
        (["64:ff9b::/96", "10.0.0.0/8"], "64:ff9b::a00:1", True),
        (["::1/128"], "::1", True),
        (["127.0.0.0/8"], "::127.0.0.1", False),
    ],
)
def test_allowed_destinations_judge_the_embedded_ipv4(networks: list[str], host: str,
                                                      allowed: bool) -> None:
    assert DestinationPolicy.parse(networks).allows(host) is allowed
