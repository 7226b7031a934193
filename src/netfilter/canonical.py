"""URL canonicalization and lookup expressions, as Safe Browsing v4 defines them.

A blocklist entry only matches if the URL being checked is reduced to exactly the
same text the list's author hashed, so this module follows the "Canonicalization"
and "Suffix/Prefix Expressions" sections of the Safe Browsing v4 Update API guide
to the letter.

The guide leaves IPv6 open; here an IPv6 literal has one spelling, whatever the
input's case, leading zeros or '::': its RFC 5952 text in brackets, a zone as
'%25zone' (`[2001:db8::1]`, `[fe80::1%25eth0]`). An IPv6 address that leads to an
IPv4 host (IPv4-mapped, NAT64 well-known prefix: `embedded_ipv4`) is that host's
dotted quad, so an IPv4 entry cannot be passed by writing its address as IPv6.

It sits on the hot path of a filtering proxy, so most URLs (already canonical)
are recognised by one precompiled regular expression (``_FAST_URL``) and split
without further work; everything else goes through the byte-exact slow path,
which the tests prove agrees with the fast path.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote_to_bytes

import idna

__all__ = [
    "InvalidURL",
    "canonical_host",
    "canonical_parts",
    "canonicalize",
    "embedded_ipv4",
    "expressions",
    "host_expressions",
    "host_suffixes",
    "is_ip_literal",
    "name_suffixes",
    "path_prefixes",
]


class InvalidURL(ValueError):
    """The input has no host (or cannot be a URL at all)."""


# --------------------------------------------------------------------------- fast path

# Only strings the slow path provably returns unchanged: lowercase scheme with
# an authority; lowercase LDH host whose last label starts with a letter (so it
# can never be an IPv4 form), no userinfo; an optional numeric port (1-5 digits),
# which the slow path drops too (a proxy checks `http://host:8080/...` URLs); no
# byte <= 0x20 or >= 0x7f, no '#' or '%' anywhere; a path without '//', '/./',
# '/../', trailing '/.' or '/..'. The query is not normalised, so it only has to
# be free of those bytes.
_PCHAR = r"[^\x00-\x20\x7f-\U0010ffff#%/?]"
_QCHAR = r"[^\x00-\x20\x7f-\U0010ffff#%]"
_FAST_URL = re.compile(
    r"([a-z][a-z0-9+.\-]*)://"
    r"((?:[a-z0-9_\-]+\.)*[a-z][a-z0-9_\-]*)(?::[0-9]{1,5})?"
    rf"((?:/(?!/|\.\.?(?:[/?]|\Z)){_PCHAR}*)*(?:\?{_QCHAR}*)?)"
)
# The same host rule for DNS names, which may carry one trailing dot.
_FAST_HOST = re.compile(r"((?:[a-z0-9_\-]+\.)*[a-z][a-z0-9_\-]*)\.?")
_LDH_CHARS = re.compile(r"[a-z0-9_.\-]+").fullmatch

# --------------------------------------------------------------------------- slow path

_SCHEME = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*):")
# After "name:", digits then the end of the authority: "host:port", not a scheme.
_PORT_AFTER_COLON = re.compile(rb"[0-9]+(?:[/?]|\Z)")
_AUTHORITY_END = re.compile(rb"[/?]")
_ESCAPE_SEQ = re.compile(rb"%[0-9A-Fa-f]{2}")
_IPV4_FORM = re.compile(r"(?:(?:0x[0-9a-f]+|[0-9]+)\.){0,3}(?:0x[0-9a-f]+|[0-9]+)")
_DOTTED_QUAD = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
)
_IPV6_ZONE = re.compile(r"[a-z0-9_\-]+")
_IP_LAST_CHARS = frozenset("0123456789]")
# The first 96 bits of the IPv6 forms that embed an IPv4 address (see embedded_ipv4).
_IPV4_EMBEDDINGS = (bytes(10) + b"\xff\xff", bytes.fromhex("0064ff9b") + bytes(8))
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
# Bytes the guide wants percent-escaped: <= 0x20, >= 0x7f, '#' and '%'.
_ESCAPES = {b: f"%{b:02X}" for b in range(256) if b <= 0x20 or b >= 0x7F or b in b"#%"}
_ROUNDS_BEFORE_STACK = 8
_MAX_LABEL_FOR_IDNA = 255
_MAX_IPV4_DIGITS = 12
_REPR_CAP = 200


def _invalid(url: object, why: str) -> InvalidURL:
    """Build the error naming the input, capped so a 100 kB URL cannot flood logs."""
    text = repr(url)
    if len(text) > _REPR_CAP:
        text = text[:_REPR_CAP] + "..."
    return InvalidURL(f"{why}: {text}")


def _to_bytes(url: str | bytes) -> bytes:
    """Work on bytes, as the guide does; lone surrogates are kept, never rejected."""
    if isinstance(url, str):
        return url.encode("utf-8", "surrogatepass")
    if isinstance(url, bytes | bytearray | memoryview):
        return bytes(url)
    raise TypeError(f"expected str or bytes, not {type(url).__name__}")


def _unescape_stack(data: bytes) -> bytes:
    """Fully unescape in one pass: any new escape can only end at the output's tail."""
    out = bytearray()
    for byte in data:
        out.append(byte)
        while (
            len(out) >= 3 and out[-3] == 0x25 and out[-2] in _HEX_DIGITS and out[-1] in _HEX_DIGITS
        ):
            value = int(out[-2:], 16)
            del out[-3:]
            out.append(value)
    return bytes(out)


def _unescape(data: bytes) -> bytes:
    """Percent-unescape until no escape remains (the rewrite is confluent, so any
    order gives the same result); a few C-speed rounds, then the linear fallback
    for adversarial nesting like '%252525...'."""
    for _ in range(_ROUNDS_BEFORE_STACK):
        if _ESCAPE_SEQ.search(data) is None:
            return data
        data = unquote_to_bytes(data)
    return _unescape_stack(data)


def _escape(data: bytes) -> str:
    """Percent-escape (uppercase hex) the bytes the guide lists."""
    return data.decode("latin-1").translate(_ESCAPES)


def _strip_whitespace(data: bytes) -> bytes:
    """Drop tab/CR/LF anywhere and spaces at both ends."""
    return data.translate(None, b"\t\r\n").strip(b" ")


def _clean_input(data: bytes) -> bytes:
    """Drop tab/CR/LF, surrounding spaces and the fragment, then fully unescape."""
    data = _strip_whitespace(data)
    hash_at = data.find(b"#")
    if hash_at >= 0:
        data = data[:hash_at]
    if b"%" in data:
        data = _unescape(data)
    return data


def _split_scheme(data: bytes, url: object) -> tuple[str, bytes]:
    """Return (scheme, authority+path); a missing scheme means http."""
    if not data:
        raise _invalid(url, "empty URL")
    if data[0] == 0x2F:  # '/'
        raise _invalid(url, "URL has no host")
    match = _SCHEME.match(data)
    if match is None:
        return "http", data
    after = data[match.end() :]
    if after.startswith(b"//"):
        return match.group(1).decode("ascii").lower(), after[2:]
    if _PORT_AFTER_COLON.match(after):
        return "http", data  # "example.com:8080/x" is host:port
    raise _invalid(url, "URL has a scheme but no host")


def _authority_host(authority: bytes) -> bytes:
    """Strip userinfo and port, keeping a bracketed IPv6 literal whole. Leading dots go
    first (the host loses them anyway): ".[::1]" is "[::1]", never "[::1" + a port."""
    at = authority.rfind(b"@")
    if at >= 0:
        authority = authority[at + 1 :]
    return _strip_port(authority.lstrip(b"."))


def _strip_port(hostport: bytes) -> bytes:
    """Drop ':port' from 'host:port' or '[v6]:port'."""
    if hostport.startswith(b"["):
        close = hostport.find(b"]")
        return hostport if close < 0 else hostport[: close + 1]
    colon = hostport.find(b":")
    return hostport if colon < 0 else hostport[:colon]


def _strip_header_port(name: bytes) -> bytes:
    """Drop a numeric ':port' only, so no other ':' can cut a DNS name short."""
    head, colon, port = name.rpartition(b":")
    if not colon or (port and not port.isdigit()):
        return name
    if head.startswith(b"["):
        return head if head.endswith(b"]") else name
    return name if b":" in head else head


def _collapse_dots(host: bytes) -> bytes:
    """Remove leading/trailing dots and collapse runs of dots."""
    if b".." in host or host.startswith(b".") or host.endswith(b"."):
        return b".".join(label for label in host.split(b".") if label)
    return host


def _idna_label(label: bytes) -> bytes:
    """Punycode one non-ASCII label; leave it as raw bytes (to be escaped) if not IDNA."""
    if label.isascii() or len(label) > _MAX_LABEL_FOR_IDNA:
        return label
    try:
        return idna.encode(label.decode("utf-8"), uts46=True)
    except Exception:  # invalid UTF-8 or not a valid IDN: any failure means "escape it"
        return label


def _to_idna(host: bytes) -> bytes:
    """Convert the non-ASCII labels of a host to punycode, label by label."""
    return _collapse_dots(b".".join(_idna_label(label) for label in host.split(b".")))


def _parse_ipv4(host: str) -> str | None:
    """Dotted decimal for any form inet_aton accepts (1-4 parts, dec/oct/hex), else None."""
    if _IPV4_FORM.fullmatch(host) is None:
        return None
    values: list[int] = []
    for part in host.split("."):
        if part.startswith("0x"):
            digits, base = part[2:], 16
        elif len(part) > 1 and part[0] == "0":
            digits, base = part[1:], 8
        else:
            digits, base = part, 10
        if len(digits.lstrip("0")) > _MAX_IPV4_DIGITS:
            return None
        try:
            values.append(int(digits, base))
        except ValueError:  # '8' or '9' in an octal part
            return None
    last_bits = 8 * (5 - len(values))
    if any(v > 255 for v in values[:-1]) or values[-1] >= 1 << last_bits:
        return None
    number = values[-1]
    for index, value in enumerate(values[:-1]):
        number |= value << (24 - 8 * index)
    return f"{number >> 24}.{(number >> 16) & 255}.{(number >> 8) & 255}.{number & 255}"


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, where connecting to one reaches the
    other: IPv4-mapped `::ffff:a.b.c.d` (RFC 4291 2.5.5.2: a dual-stack socket talks
    IPv4 to it) and NAT64's well-known prefix `64:ff9b::/96` (RFC 6052 2.1: a
    translator forwards to the IPv4 host). Else None: the deprecated IPv4-compatible
    `::a.b.c.d` (RFC 4291 2.5.5.1) and the obsolete SIIT `::ffff:0:a.b.c.d` (RFC 2765,
    dropped by RFC 6145) are routed as IPv6 by today's stacks, and the local-use
    `64:ff9b:1::/48` (RFC 8215) embeds at an operator-chosen length.
    """
    packed = address.packed
    if packed[:12] in _IPV4_EMBEDDINGS:
        return ipaddress.IPv4Address(packed[12:])
    return None


def _format_ipv6(text: str) -> str | None:
    """RFC 5952 text of a valid IPv6 address, else None.

    Formatted here, not with ``str(IPv6Address)``, whose output for IPv4-mapped
    addresses changed in Python 3.13: a canonical form must not depend on that.
    """
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return _rfc5952(address)


def _rfc5952(address: ipaddress.IPv6Address) -> str | None:
    """Lowercase hex, no leading zeros, the first longest run (>= 2) of zero groups as
    '::', then '%zone'; None for a zone that is not a plain interface name."""
    packed = address.packed
    groups = [f"{packed[i] << 8 | packed[i + 1]:x}" for i in range(0, 16, 2)]
    best_start, best_len, start = -1, 1, -1
    for index, group in enumerate([*groups, "end"]):
        if group == "0":
            if start < 0:
                start = index
        elif start >= 0:
            if index - start > best_len:
                best_start, best_len = start, index - start
            start = -1
    if best_start >= 0:
        head = ":".join(groups[:best_start])
        tail = ":".join(groups[best_start + best_len :])
        text = f"{head}::{tail}"
    else:
        text = ":".join(groups)
    scope = address.scope_id
    if scope is None:
        return text
    # A zone may only be a plain interface name, or brackets/ports get ambiguous.
    return f"{text}%{scope}" if _IPV6_ZONE.fullmatch(scope) else None


def _ipv6_host(text: str) -> str | None:
    """The canonical host of an IPv6 literal (given without brackets), unescaped: the
    dotted quad of an embedded IPv4 address (so no spelling of a listed IPv4 address
    escapes its entry), else '[RFC 5952 text]'; None if `text` is no IPv6 address."""
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    ipv4 = embedded_ipv4(address)  # a zone changes nothing about where it leads
    if ipv4 is not None:
        return str(ipv4)
    formatted = _rfc5952(address)
    return None if formatted is None else f"[{formatted}]"


def _canon_ipv6(host: bytes) -> str:
    """Normalise a bracketed IPv6 literal; escape it as is if invalid."""
    text = _ipv6_host(host[1:-1].decode("latin-1"))
    return _escape(host) if text is None else _escape(text.encode("latin-1"))


def _canon_host(host: bytes) -> str:
    """Canonical host: lowercase, dots cleaned, IDNA, IPv4 normalised, escaped."""
    host = host.lower()
    if host.startswith(b"[") and host.endswith(b"]"):
        return _canon_ipv6(host)
    host = _collapse_dots(host)
    if not host.isascii():
        host = _to_idna(host)
    text = _escape(host)
    return _parse_ipv4(text) or text


def _canon_path(path: bytes) -> bytes:
    """Resolve '.' and '..' segments and collapse '/' runs; empty becomes '/'."""
    if not path:
        return b"/"
    if b"//" not in path and b"/." not in path:
        return path
    segments: list[bytes] = []
    for segment in path.split(b"/"):
        if segment == b"..":
            if segments:
                segments.pop()
        elif segment and segment != b".":
            segments.append(segment)
    if not segments:
        return b"/"
    last = path[path.rfind(b"/") + 1 :]
    trailing = b"/" if last in (b"", b".", b"..") else b""
    return b"/" + b"/".join(segments) + trailing


def _slow_parts(url: str | bytes) -> tuple[str, str, str]:
    """The literal guide algorithm on bytes: (scheme, host, path_with_query)."""
    data = _clean_input(_to_bytes(url))
    scheme, rest = _split_scheme(data, url)
    end = _AUTHORITY_END.search(rest)
    cut = len(rest) if end is None else end.start()
    host = _canon_host(_authority_host(rest[:cut]))
    if not host:
        raise _invalid(url, "URL has no host")
    tail = rest[cut:]
    query_at = tail.find(b"?")
    if query_at < 0:
        return scheme, host, _escape(_canon_path(tail))
    return scheme, host, _escape(_canon_path(tail[:query_at]) + tail[query_at:])


def _fast_parts(url: str | bytes) -> tuple[str, str, str] | None:
    """The split of an already-canonical URL, or None if the slow path is needed."""
    text = url if isinstance(url, str) else bytes(url).decode("latin-1")
    match = _FAST_URL.fullmatch(text)
    if match is None:
        return None
    scheme, host, rest = match.groups()
    if not rest or rest[0] == "?":
        rest = "/" + rest
    return scheme, host, rest


def _parts(url: str | bytes) -> tuple[str, str, str]:
    """(scheme, host, path_with_query) of the canonical URL."""
    return _fast_parts(url) or _slow_parts(url)


def _slow_host(name: str | bytes) -> str:
    """canonical_host without the fast path: the literal rules, on bytes."""
    data = _strip_whitespace(_to_bytes(name))
    if b"%" in data:
        data = _unescape(data)
    if not data.startswith(b"["):
        data = _collapse_dots(data)  # first, so that "h:80." reads as "h:80"
        if b":" in data:
            # A bare IPv6 address (from a resolver or CONNECT) rather than host:port.
            text = _ipv6_host(data.lower().decode("latin-1"))
            if text is not None:
                return _escape(text.encode("latin-1"))
    host = _canon_host(_strip_header_port(data))
    if not host:
        raise _invalid(name, "empty host name")
    return host


# --------------------------------------------------------------------------- public API


def canonical_parts(url: str | bytes) -> tuple[str, str]:
    """(host, path_with_query) of the canonical URL: what expressions are built from.

    This is the proxy's hot path, so already-canonical URLs are split by one regex.
    """
    if not isinstance(url, str):
        _, host, rest = _parts(url)
        return host, rest
    match = _FAST_URL.fullmatch(url)
    if match is None:
        _, host, rest = _slow_parts(url)
        return host, rest
    _, host, rest = match.groups()
    if not rest or rest[0] == "?":
        rest = "/" + rest
    return host, rest


def canonicalize(url: str | bytes) -> str:
    """The canonical URL with its scheme, e.g. 'http://www.google.com/'."""
    scheme, host, rest = _parts(url)
    return f"{scheme}://{host}{rest}"


def is_ip_literal(host: str) -> bool:
    """Whether a canonical host is an IP address, which is looked up only as itself."""
    if not host:
        return False
    last = host[-1]
    if last == "]":
        return host[0] == "[" and _format_ipv6(host[1:-1]) is not None
    return "0" <= last <= "9" and _DOTTED_QUAD.fullmatch(host) is not None


def host_suffixes(host: str) -> list[str]:
    """The up-to-5 lookup hosts: exact host, then the last 5..2 components (never a TLD).

    Unrolled rfind calls: this runs for every request.
    """
    if host[-1:] in _IP_LAST_CHARS and is_ip_literal(host):
        return [host]
    d1 = host.rfind(".")
    if d1 < 0:
        return [host]
    d2 = host.rfind(".", 0, d1)
    if d2 < 0:
        return [host]
    d3 = host.rfind(".", 0, d2)
    if d3 < 0:
        return [host, host[d2 + 1 :]]
    d4 = host.rfind(".", 0, d3)
    if d4 < 0:
        return [host, host[d3 + 1 :], host[d2 + 1 :]]
    d5 = host.rfind(".", 0, d4)
    if d5 < 0:
        return [host, host[d4 + 1 :], host[d3 + 1 :], host[d2 + 1 :]]
    return [host, host[d5 + 1 :], host[d4 + 1 :], host[d3 + 1 :], host[d2 + 1 :]]


def path_prefixes(path_with_query: str) -> list[str]:
    """The up-to-6 lookup paths: exact (with query), exact without query, and the
    first 4 directory prefixes from '/', each ending in '/'."""
    query_at = path_with_query.find("?")
    if query_at < 0:
        path = path_with_query
        out = [path]
    else:
        path = path_with_query[:query_at]
        out = [path_with_query, path]
    slash = path.find("/")
    count = 0
    while slash >= 0 and count < 4:
        slash += 1
        if slash == len(path):
            break  # the prefix is the whole path, already in out
        out.append(path[:slash])
        slash = path.find("/", slash)
        count += 1
    return out


def expressions(url: str | bytes) -> list[str]:
    """All 'host+path' lookup expressions of a URL (at most 30, no scheme, no duplicates)."""
    host, rest = canonical_parts(url)
    paths = path_prefixes(rest)
    return [h + p for h in host_suffixes(host) for p in paths]


def canonical_host(name: str) -> str:
    """A DNS name or Host header in the same canonical form as a URL's host, so a
    resolver and a proxy look the same site up under the same expressions.

    Unlike a URL, a DNS name may hold any byte, so nothing that could cut a real
    suffix off is honoured: no fragment, no userinfo, and only a numeric ':port'
    (or a whole '[v6]' literal) is split off. "x#.evil.com" keeps "evil.com".
    """
    if isinstance(name, str) and name.isascii():
        match = _FAST_HOST.fullmatch(name.lower())
        if match is not None:
            return match.group(1)
    return _slow_host(name)


def name_suffixes(name: str) -> list[str]:
    """`host_suffixes(canonical_host(name))`, with a shortcut for plain lowercase names.

    The shortcut accepts exactly what canonical_host's fast path accepts (lowercase
    LDH labels, the last starting with a letter, one optional trailing dot), tested
    cheaper: one character-class match plus string tests. Resolvers call this for
    every query.
    """
    if _LDH_CHARS(name) is None:
        return host_suffixes(canonical_host(name))
    host = name[:-1] if name[-1] == "." else name
    if not host or host[0] == "." or ".." in host:
        return host_suffixes(canonical_host(name))
    last = host[host.rfind(".") + 1 :]
    if not "a" <= last[:1] <= "z":
        return host_suffixes(canonical_host(name))
    return host_suffixes(host)


def host_expressions(name: str) -> list[str]:
    """The expressions a DNS name is checked as: each lookup host with path '/'."""
    return [h + "/" for h in name_suffixes(name)]
