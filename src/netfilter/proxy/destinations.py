"""Where the proxy may connect: `proxy.allowed_destinations`, and fixed name routes.

Both are pure: parse functions raise `ValueError` naming the bad item; the addon wraps
that into an `OptionsError` naming the option or the config key.

- `allowed_destinations`: CIDRs (`127.0.0.0/8`, `::1/128`, a bare address) and host
  patterns (`localhost`, `*.test`: every name below `test`, not `test` itself). Empty
  means no restriction. A name is allowed by a pattern, never by what it resolves to,
  so checking it needs no DNS lookup; an IP literal is allowed by a CIDR, an
  IPv4-mapped IPv6 one (`::ffff:10.0.0.1`) by the CIDRs of its IPv4 address, a NAT64
  one (`64:ff9b::a00:1`) only when both its IPv6 and its IPv4 address are allowed.
- routes (`netfilter_resolve`, like curl's `--resolve`): `NAME=ADDRESS` or
  `*.SUFFIX=ADDRESS` sends the proxy's connections for that name to a fixed address
  without a DNS lookup. Host header, SNI and every check keep the name. Meant for test
  rigs and labs whose names resolve nowhere (`*.test`, `*.example`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from netfilter.canonical import embedded_ipv4
from netfilter.http.target import normalize_host

__all__ = [
    "DestinationPolicy",
    "Routes",
    "normalize_host",
    "parse_destination",
    "parse_route",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAME = re.compile(r"(?:\*\.)?(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                   r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_DOTTED = re.compile(r"[0-9.]+")  # meant as an address: an error if not a valid one
MAX_NAME = 253


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def _pattern(text: str, what: str) -> str:
    name = normalize_host(text)
    if len(name) > MAX_NAME or not _NAME.fullmatch(name) or name == "*":
        raise ValueError(f"{what} {text!r} is neither a CIDR nor a host name or *.suffix "
                         "pattern")
    return name


def parse_destination(spec: str) -> Network | str:
    """One `allowed_destinations` item: an IP network, or a host name or `*.` pattern."""
    text = spec.strip()
    if not text:
        raise ValueError("an empty destination")
    if any(c in text for c in ":/") or _ip(text) is not None or _DOTTED.fullmatch(text):
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError as e:
            raise ValueError(f"destination {spec!r} is not a valid CIDR ({e})") from e
    return _pattern(text, "destination")


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


@dataclass(frozen=True)
class DestinationPolicy:
    """The parsed `allowed_destinations`; `allows(host)` for a host or IP literal."""

    networks: tuple[Network, ...] = ()
    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, specs: Iterable[str]) -> DestinationPolicy:
        networks: list[Network] = []
        patterns: list[str] = []
        for spec in specs:
            item = parse_destination(spec)
            if isinstance(item, str):
                patterns.append(item)
            else:
                networks.append(item)
        return cls(tuple(networks), tuple(patterns))

    @property
    def restricted(self) -> bool:
        return bool(self.networks or self.patterns)

    def allows(self, host: str) -> bool:
        if not self.restricted:
            return True
        name = normalize_host(host)
        # Only text with a ':' (IPv6) or made of digits and dots (IPv4) can be an
        # address: a name skips ipaddress, whose ValueError for it costs ~3 us.
        address = _ip(name) if ":" in name or _DOTTED.fullmatch(name) else None
        if address is None:
            return any(_matches(name, p) for p in self.patterns)
        if isinstance(address, ipaddress.IPv6Address):
            ipv4 = embedded_ipv4(address)
            if ipv4 is not None:
                # A mapped address is its IPv4 host (the socket speaks IPv4); a NAT64
                # one is reached through the translator: both must be allowed.
                if not self._covers(ipv4):
                    return False
                if address.ipv4_mapped is not None:
                    return True
        return self._covers(address)

    def _covers(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)

    def __str__(self) -> str:
        items = [str(n) for n in self.networks] + list(self.patterns)
        return ", ".join(items) if items else "(any)"


def parse_route(spec: str) -> tuple[str, str]:
    """`NAME=ADDRESS` (NAME may be `*.suffix`) -> (pattern, address)."""
    name, sep, address = spec.partition("=")
    if not sep:
        raise ValueError(f"route {spec!r} is not NAME=ADDRESS")
    pattern = _pattern(name, "route name")
    ip = _ip(address.strip().strip("[]"))
    if ip is None:
        raise ValueError(f"route {spec!r}: {address.strip()!r} is not an IP address")
    return pattern, str(ip)


@dataclass(frozen=True)
class Routes:
    """Fixed addresses for names (first matching route wins)."""

    routes: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, specs: Sequence[str]) -> Routes:
        return cls(tuple(parse_route(s) for s in specs))

    def lookup(self, host: str) -> str | None:
        name = normalize_host(host)
        for pattern, address in self.routes:
            if _matches(name, pattern):
                return address
        return None
