"""A request's target from its parts: scheme, Host/:authority, dialled host and port.

Every HTTP front-end (mitmproxy, the Squid helper, ICAP) has these parts in its own
shape; this turns them into the origins the engine checks a URL on and the canonical
hosts the engine can say are URL-free (`engine.origin_hosts`), without the front-end
knowing how a URL is canonicalized. Pure functions; no mitmproxy.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from netfilter.engine import origin_hosts

__all__ = ["DEFAULT_PORTS", "Target", "TargetCache", "make_target", "normalize_host",
           "origin", "split_authority"]

DEFAULT_PORTS = {"http": 80, "https": 443}
TARGET_CACHE_SIZE = 4096  # entries; cleared wholesale when full

# as mitmproxy's own: host, or [IPv6], then an optional :port
_AUTHORITY = re.compile(r"(?P<host>[^:]+|\[.+\])(?::(?P<port>\d+))?").fullmatch
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}").fullmatch


def normalize_host(host: str) -> str:
    """A host as front-ends compare it: lowercase, no trailing dot, no IPv6 brackets.

    For comparing names (SNI against CONNECT, a request's authority against its
    connection's) and for destination policies; the engine does its own, full
    canonicalization for matching.
    """
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host[:-1] if host.endswith(".") else host


def _valid_host(host: str) -> bool:
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    if not ascii_host or len(ascii_host) > 255:
        return False
    if all(_LABEL(label) for label in ascii_host.removesuffix(".").split(".")):
        return True
    try:
        ipaddress.ip_address(ascii_host)
    except ValueError:
        return False
    return True


def split_authority(authority: str) -> tuple[str, int | None]:
    """`host[:port]` -> (host, port or None), brackets removed; a malformed authority
    comes back whole, without a port (never raises: the engine judges the host)."""
    m = _AUTHORITY(authority)
    if m is None:
        return authority, None
    host = m["host"]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not _valid_host(host):
        return authority, None
    if m["port"]:
        port = int(m["port"])
        if not 0 < port < 65536:
            return authority, None
        return host, port
    return host, None


def origin(scheme: str, host: str, port: int) -> str:
    """`scheme://host[:port]`, the part of a checked URL before the path; the scheme's
    own port is left out (matching ignores ports anyway)."""
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    suffix = "" if port == DEFAULT_PORTS.get(scheme) else f":{port}"
    return f"{scheme}://{host}{suffix}"


@dataclass(frozen=True, slots=True)
class Target:
    """What a request's scheme, Host/:authority and dialled address yield.

    The same few names come again and again, so front-ends compute this once per
    (scheme, Host, host, port) and cache it (`TargetCache`).
    """

    authority: str  # the name the client asked for (Host/:authority, else the address)
    asked: str  # `scheme://host[:port]` by Host/:authority
    dialled: str | None  # the same for the address the proxy dials, when it differs
    allowed: bool  # the front-end's own destination policy lets the dialled host through
    # The canonical host of every URL `asked + path` (and `dialled + path`): where
    # the engine says no URL on them can match, a request's URL need not be checked.
    # None for an origin unusual enough that a path might change its host.
    hosts: tuple[str, ...] | None = None


def make_target(scheme: str, header: str | None, host: str, port: int,
                allowed: bool) -> Target:
    """A Target for one (scheme, Host header, dialled host and port)."""
    dialled = origin(scheme, host, port)
    if not header:
        return Target(normalize_host(host), dialled, None, allowed, origin_hosts(dialled))
    asked_host, asked_port = split_authority(header)
    if asked_port is None:
        asked_port = DEFAULT_PORTS.get(scheme) or port
    asked = origin(scheme, asked_host, asked_port)
    if asked == dialled:
        return Target(normalize_host(asked_host), asked, None, allowed, origin_hosts(asked))
    return Target(normalize_host(asked_host), asked, dialled, allowed,
                  origin_hosts(asked, dialled))


class TargetCache(dict[object, Target]):
    """Targets by a front-end's own key; cleared wholesale when full, and by the
    front-end whenever what `allowed` came from changes."""

    def put(self, key: object, target: Target) -> Target:
        if len(self) >= TARGET_CACHE_SIZE:
            self.clear()
        self[key] = target
        return target
