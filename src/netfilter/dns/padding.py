"""EDNS(0) padding (RFC 7830) of answers over encrypted transports, as RFC 8467 says.

Its Block-Length Padding strategy: a server pads a response to a multiple of 468
octets, and only when the query carried the padding option (clients pad their own
queries, to 128). Over TLS the length of an answer otherwise tells an observer much
about the name asked. Bytes are walked, not parsed into objects: it runs on every
padded answer. Anything unexpected leaves the answer as it is (never a failure).
"""

from __future__ import annotations

import struct

__all__ = ["BLOCK", "OPTION_PADDING", "pad", "wants_padding"]

BLOCK = 468  # RFC 8467 section 4.1: responses
OPTION_PADDING = 12  # RFC 7830
TYPE_OPT = 41
MAX_MESSAGE = 65535
_COUNTS = struct.Struct("!HHHH")
_RR = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_OPTION = struct.Struct("!HH")


class _Malformed(Exception):
    """Stop walking: the message is not what it says."""


def _skip_name(data: bytes, at: int) -> int:
    for _ in range(128):  # a name has at most 127 labels
        if at >= len(data):
            raise _Malformed
        length = data[at]
        if length & 0xC0 == 0xC0:
            return at + 2
        if length & 0xC0:
            raise _Malformed
        at += 1 + length
        if not length:
            return at
    raise _Malformed


def _find_opt(data: bytes) -> tuple[int, int] | None:
    """(offset of the OPT record's rdlength, offset of its rdata end), or None when
    the message has no OPT record. _Malformed when the walk runs off the end."""
    if len(data) < 12:
        raise _Malformed
    qd, an, ns, ar = _COUNTS.unpack_from(data, 4)
    at = 12
    for _ in range(qd):
        at = _skip_name(data, at) + 4
    for index in range(an + ns + ar):
        at = _skip_name(data, at)
        if at + _RR.size > len(data):
            raise _Malformed
        rtype, _, _, rdlength = _RR.unpack_from(data, at)
        end = at + _RR.size + rdlength
        if end > len(data):
            raise _Malformed
        if rtype == TYPE_OPT and index >= an + ns:
            return at + 8, end
        at = end
    return None


def wants_padding(query: bytes) -> bool:
    """Whether the query's OPT record carries the padding option."""
    try:
        found = _find_opt(query)
    except _Malformed:
        return False
    if found is None:
        return False
    at, end = found[0] + 2, found[1]
    while at + 4 <= end:
        code, length = _OPTION.unpack_from(query, at)
        if code == OPTION_PADDING:
            return True
        at += 4 + length
    return False


def pad(answer: bytes, block: int = BLOCK) -> bytes:
    """`answer` padded to a multiple of `block` octets: a padding option appended to
    its OPT record (one is added when it has none). Unchanged when malformed, when it
    carries padding already, or when padding would pass the 65535 octets of a DNS
    message."""
    try:
        found = _find_opt(answer)
    except _Malformed:
        return answer
    if found is None:  # an OPT record of our own: root name, 1232 octets, no flags
        opt = b"\x00" + _RR.pack(TYPE_OPT, 1232, 0, 0)
        qid_flags, (qd, an, ns, ar) = answer[:4], _COUNTS.unpack_from(answer, 4)
        answer = qid_flags + _COUNTS.pack(qd, an, ns, ar + 1) + answer[12:] + opt
        found = (len(answer) - 2, len(answer))
    rdlength_at, end = found
    at = rdlength_at + 2
    while at + 4 <= end:
        code, length = _OPTION.unpack_from(answer, at)
        if code == OPTION_PADDING:
            return answer
        at += 4 + length
    fill = -(len(answer) + 4) % block
    if len(answer) + 4 + fill > MAX_MESSAGE:
        return answer
    rdlength = struct.unpack_from("!H", answer, rdlength_at)[0] + 4 + fill
    return (answer[:rdlength_at] + struct.pack("!H", rdlength) + answer[rdlength_at + 2:end]
            + _OPTION.pack(OPTION_PADDING, fill) + bytes(fill) + answer[end:])
