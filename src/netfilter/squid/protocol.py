"""Squid's external ACL helper protocol, with concurrency channel ids (pure functions).

Squid sends one line per lookup, `CHANNEL VALUE...`, each value URL-escaped by Squid
(`%>a %>rm %>ru`: client address, method, request URL, then the acl's arguments,
`-` when none), and reads one line back per
lookup, `CHANNEL RESULT [key=value ...]`, in any order. RESULT is OK (the ACL
matches: here, the request is blocked), ERR (no match: allowed) or BH (the helper
could not decide: a malformed line). Values sent back are quoted strings with `"` and
`\\` escaped (squid.conf, external_acl_type).

The gate (`--gate`, FORMAT `%>rd`) is asked about a host only: `CHANNEL HOST`.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote

__all__ = ["MAX_LINE", "GateLookup", "Lookup", "answer", "parse_gate", "parse_lookup"]

MAX_LINE = 16 * 1024  # bytes of one request line; longer lines are answered BH
MAX_VALUE = 200  # characters of a message or log value sent back

_CHANNEL = re.compile(r"[0-9]{1,9}").fullmatch
_TOKEN_SAFE = re.compile(r'[^"\\\x00-\x1f\x7f]')


class Lookup(NamedTuple):
    """One request line: what Squid asks about."""

    channel: str
    client: str | None
    method: str
    url: str


def parse_lookup(line: str) -> Lookup:
    """`CHANNEL CLIENT METHOD URL` -> Lookup; ValueError naming what is wrong (the
    channel, when one was read, is the ValueError's second argument)."""
    fields = line.split()
    if not fields or _CHANNEL(fields[0]) is None:
        raise ValueError("no channel id")
    channel = fields[0]
    # Squid appends the acl line's arguments (%DATA, "-" when none) when FORMAT does
    # not name them: one more field, ignored.
    if len(fields) not in (4, 5):
        raise ValueError(f"expected 4 fields (channel, %>a, %>rm, %>ru), got {len(fields)}",
                         channel)
    client, method, url = (unquote(f) for f in fields[1:4])
    if not method.isalpha() or len(method) > 32:
        raise ValueError("bad method", channel)
    return Lookup(channel, None if client in ("-", "") else client, method.upper(), url)


class GateLookup(NamedTuple):
    """One gate line: the requested host (a name or an address literal)."""

    channel: str
    host: str


def parse_gate(line: str) -> GateLookup:
    """`CHANNEL HOST` -> GateLookup; ValueError as parse_lookup's."""
    fields = line.split()
    if not fields or _CHANNEL(fields[0]) is None:
        raise ValueError("no channel id")
    channel = fields[0]
    # as in parse_lookup: the acl line's arguments, when any, are one more field
    if len(fields) not in (2, 3):
        raise ValueError(f"expected 2 fields (channel, %>rd), got {len(fields)}", channel)
    host = unquote(fields[1])
    if host in ("", "-") or len(host) > 255:
        raise ValueError("no host", channel)
    return GateLookup(channel, host)


def _quoted(text: str) -> str:
    kept = "".join(c if _TOKEN_SAFE.fullmatch(c) else "?" for c in text[:MAX_VALUE])
    return f'"{kept}"'


def answer(channel: str | None, result: str, **values: str) -> bytes:
    """One response line; `channel` None when the request line had none."""
    parts = [channel] if channel is not None else []
    parts.append(result)
    parts.extend(f"{key}={_quoted(value)}" for key, value in values.items())
    return (" ".join(parts) + "\n").encode("ascii", "replace")
