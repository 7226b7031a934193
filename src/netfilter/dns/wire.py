"""Just enough DNS wire format for the hot path, parsed by hand.

Forwarding a clean query must not decode and re-encode the whole message (dnslib
costs ~100 us per packet), so this module reads only what the filter needs: the
header, the one question, the EDNS OPT record of a query, and CNAME targets in an
upstream answer. Every read is bounds-checked; anything malformed raises
`FormError`, which the server answers with FORMERR (or drops when no header is
readable). Block answers are written by hand in answers.py.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import NamedTuple

from netfilter.dns.codes import EDE_OPTION, EDNS_DO, OPCODE_MASK, Flag, RRClass, RRType

__all__ = [
    "EDE_OPTION",
    "FormError",
    "Query",
    "answer_is_plain",
    "cname_targets",
    "parse_query",
    "py_answer_is_plain",
    "py_scan_question",
    "read_name",
    "scan_question",
]

HEADER = struct.Struct("!HHHHHH")
U16 = struct.Struct("!H")
RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
TYPE_CNAME = RRType.CNAME
TYPE_OPT = RRType.OPT
NO_EDNS_SIZE = 512  # what a client without EDNS can take (RFC 1035 4.2.1)
POINTER = 0xC0  # the two top bits of a compression pointer's first octet
OFFSET_HIGH = 0x3F  # the rest of that octet: the offset's high bits
_VERSION = 0xFF  # the EDNS version: the low octet of ext-rcode+version (RFC 6891 6.1.3)
MAX_NAME = 255
MAX_POINTERS = 32  # a chain longer than this is a loop or an attack


class FormError(ValueError):
    """The message is malformed."""


class Query(NamedTuple):
    """What the filter needs from a query, parsed once by `parse_query` when a packet
    reaches the server; canaries, the engine check, block answers, forwarding and
    truncation all read this one value (a tuple: cheap per packet)."""

    id: int
    flags: int
    name: str  # presentation form, lowercase, no trailing dot ("" for the root)
    qtype: int
    qclass: int
    question_end: int  # offset just past the question
    edns: bool
    udp_size: int  # the client's EDNS buffer size, 512 without EDNS
    dnssec_ok: bool
    wants_structured_error: bool  # an EDE option in the query (structured-dns-error)
    edns_version: int = 0


def _label_text(label: bytes) -> str:
    """Presentation form of one label; unusual bytes escaped so they cannot fake dots."""
    if label.isascii() and label.replace(b"-", b"").replace(b"_", b"").isalnum():
        return label.decode("ascii").lower()
    out = []
    for byte in label.lower():
        if byte in b".\\" or byte <= 0x20 or byte >= 0x7F:
            out.append(f"\\{byte:03d}")
        else:
            out.append(chr(byte))
    return "".join(out)


def read_name(data: bytes, offset: int, *, allow_pointers: bool = True) -> tuple[str, int]:
    """The name at `offset` and the offset after it (after the first pointer, if any)."""
    labels: list[str] = []
    end = -1
    length = 1  # the root label's octet
    jumps = 0
    size = len(data)
    while True:
        if offset >= size:
            raise FormError("name runs past the end of the message")
        count = data[offset]
        if count == 0:
            offset += 1
            break
        if count & POINTER == POINTER:
            if not allow_pointers:
                raise FormError("compression pointer where none is allowed")
            if offset + 1 >= size:
                raise FormError("truncated compression pointer")
            jumps += 1
            if jumps > MAX_POINTERS:
                raise FormError("compression loop")
            target = (count & OFFSET_HIGH) << 8 | data[offset + 1]
            if end < 0:
                end = offset + 2
            if target >= offset:
                raise FormError("compression pointer points forward")
            offset = target
            continue
        if count & POINTER:
            raise FormError("unknown label type")
        start = offset + 1
        offset = start + count
        if offset > size:
            raise FormError("label runs past the end of the message")
        length += count + 1
        if length > MAX_NAME:
            raise FormError("name longer than 255 octets")
        labels.append(_label_text(data[start:offset]))
    return ".".join(labels), (end if end >= 0 else offset)


def _skip_rr(data: bytes, offset: int) -> tuple[int, int, int, int]:
    """(type, rdata offset, rdata length, offset after) of the RR at `offset`."""
    _, offset = read_name(data, offset)
    if offset + 10 > len(data):
        raise FormError("truncated resource record")
    rtype, _, _, rdlength = RR_FIXED.unpack_from(data, offset)
    rdata = offset + 10
    after = rdata + rdlength
    if after > len(data):
        raise FormError("resource record data runs past the end")
    return rtype, rdata, rdlength, after


_PLAIN_NAME = re.compile(rb"[A-Za-z0-9_.\-]*").fullmatch
_QUESTION = struct.Struct("!HH")
_OPT_FIXED = struct.Struct("!HHHHH")  # type, udp size, ext-rcode+version, flags, rdlength


def _question_name(data: bytes) -> tuple[str, int]:
    """The question's name at offset 12: the common case without any per-label decoding."""
    labels: list[bytes] = []
    offset = 12
    try:
        count = data[offset]
        while count:
            if count > 63:
                raise FormError("compression pointer or bad label in the question")
            end = offset + 1 + count
            labels.append(data[offset + 1 : end])
            offset = end
            count = data[offset]
    except IndexError:
        raise FormError("name runs past the end of the message") from None
    if offset + 1 - 12 > MAX_NAME:
        raise FormError("name longer than 255 octets")
    name = b".".join(labels)
    # Plain characters, and no dot inside a label (that would fake a label boundary).
    if _PLAIN_NAME(name) is not None and name.count(b".") == len(labels) - 1:
        return name.decode("ascii").lower(), offset + 1
    return read_name(data, 12, allow_pointers=False)


def parse_query(data: bytes) -> Query:
    """Parse a query; FormError if malformed (the caller checks the header length)."""
    if len(data) < 12:
        raise FormError("shorter than a DNS header")
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if qdcount != 1:
        raise FormError(f"{qdcount} questions (one expected)")
    name, offset = _question_name(data)
    if offset + 4 > len(data):
        raise FormError("truncated question")
    qtype, qclass = _QUESTION.unpack_from(data, offset)
    question_end = offset + 4
    size = len(data)
    if not (ancount or nscount or arcount):
        if question_end != size:
            raise FormError("trailing bytes after the last record")
        return Query(qid, flags, name, qtype, qclass, question_end, False, NO_EDNS_SIZE,
                     False, False)
    if (arcount == 1 and not ancount and not nscount and question_end + 11 <= size
            and data[question_end] == 0):
        # The common EDNS query: one OPT record right after the question.
        rtype, udp_size, ext, opt_flags, rdlength = _OPT_FIXED.unpack_from(data, question_end + 1)
        if rtype == TYPE_OPT:
            start = question_end + 11
            if start + rdlength != size:
                raise FormError("OPT record length does not match the message")
            structured = bool(rdlength) and _has_option(data, start, size, EDE_OPTION)
            return Query(qid, flags, name, qtype, qclass, question_end, True,
                         max(NO_EDNS_SIZE, udp_size), bool(opt_flags & EDNS_DO), structured,
                         ext & _VERSION)
    return _parse_records(data, qid, flags, name, qtype, qclass, question_end,
                          ancount + nscount, arcount)


def _parse_records(data: bytes, qid: int, flags: int, name: str, qtype: int, qclass: int,
                   question_end: int, skip: int, arcount: int) -> Query:
    """The general case: any records after the question, OPT among the additional ones."""
    offset = question_end
    for _ in range(skip):
        offset = _skip_rr(data, offset)[3]
    edns = structured = dnssec_ok = False
    udp_size = version = 0
    for _ in range(arcount):
        rr_start = offset
        rtype, rdata, rdlength, offset = _skip_rr(data, offset)
        if rtype != TYPE_OPT:
            continue
        if edns:
            raise FormError("more than one OPT record")
        if data[rr_start] != 0:
            raise FormError("OPT record with a non-root owner")
        edns = True
        _, udp_size, ttl, _ = RR_FIXED.unpack_from(data, rdata - 10)
        dnssec_ok = bool(ttl & EDNS_DO)
        version = (ttl >> 16) & _VERSION
        structured = _has_option(data, rdata, rdata + rdlength, EDE_OPTION)
    if offset != len(data):
        raise FormError("trailing bytes after the last record")
    return Query(qid, flags, name, qtype, qclass, question_end, edns, max(512, udp_size),
                 dnssec_ok, structured, version)


def _has_option(data: bytes, start: int, end: int, code: int) -> bool:
    found = False
    while start < end:
        if start + 4 > end:
            raise FormError("truncated EDNS option")
        option, length = struct.unpack_from("!HH", data, start)
        start += 4 + length
        if start > end:
            raise FormError("EDNS option runs past the OPT record")
        found = found or option == code
    return found


def cname_targets(data: bytes, question_end: int | None = None) -> list[str]:
    """CNAME targets in the answer section of an upstream response ([] if none).

    `question_end`, when the caller already knows the question (the upstream pool
    checked that the response repeats the query's question byte for byte), skips
    parsing it again.
    """
    if len(data) < 12:
        raise FormError("shorter than a DNS header")
    _, _, qdcount, ancount, _, _ = HEADER.unpack_from(data)
    if question_end is None:
        offset = 12
        for _ in range(qdcount):
            offset = read_name(data, offset)[1] + 4
    else:
        offset = question_end
    targets: list[str] = []
    size = len(data)
    for _ in range(ancount):
        if offset + 12 <= size and data[offset] & POINTER == POINTER:  # owner is a pointer
            rtype, _, _, rdlength = RR_FIXED.unpack_from(data, offset + 2)
            rdata = offset + 12
            offset = rdata + rdlength
            if offset > size:
                raise FormError("resource record data runs past the end")
        else:
            rtype, rdata, _, offset = _skip_rr(data, offset)
        if rtype == TYPE_CNAME:
            targets.append(read_name(data, rdata)[0])
    return targets


# ---------------------------------------------------------------- the forwarding fast path

_QR_OPCODE_HIGH = int(Flag.QR | OPCODE_MASK) >> 8  # in the flags' first octet: a query, opcode 0
_PLAIN_TEXT = re.compile(r"[a-z0-9_\-]+(?:\.[a-z0-9_\-]+)*").fullmatch
Question = tuple[str, int, int, int]  # name, qtype, question_end, udp_size


def py_scan_question(data: bytes) -> Question | None:
    """(name, qtype, question_end, udp_size) of a common, well-formed query, else None.

    The pure-Python twin of `_hotpath.question` (see `_hotpath.c` for what is accepted): a
    standard query, one question of class IN whose name is plain labels, and at most
    one OPT record (EDNS version 0) after it. None sends the packet to the full path.
    """
    if len(data) < 17 or data[2] & _QR_OPCODE_HIGH:
        return None
    _, _, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if qdcount != 1 or ancount or nscount or arcount > 1:
        return None
    try:
        query = parse_query(data)
    except FormError:
        return None
    if (query.qclass != RRClass.IN or query.edns_version or _PLAIN_TEXT(query.name) is None
            or (arcount and not query.edns)):
        return None
    return query.name, query.qtype, query.question_end, query.udp_size


def py_answer_is_plain(data: bytes, at: int) -> bool:
    """True when the answer section from `at` is well-formed and holds no CNAME.

    The pure-Python twin of `_hotpath.answer_is_plain`: owner names are labels ended by the
    root or by one backward pointer (not followed); every record stays in the message.
    False sends the answer to the full path (`cname_targets`).
    """
    size = len(data)
    if size < 12 or at < 12 or at > size:
        return False
    for _ in range(U16.unpack_from(data, 6)[0]):
        labels = 0
        while True:
            if at >= size or labels > 127:
                return False
            count = data[at]
            if count == 0:
                at += 1
                break
            if count & POINTER == POINTER:
                if at + 2 > size or ((count & OFFSET_HIGH) << 8 | data[at + 1]) >= at:
                    return False
                at += 2
                break
            if count > 63:
                return False
            at += 1 + count
            labels += 1
        if at + 10 > size:
            return False
        rtype, _, _, rdlength = RR_FIXED.unpack_from(data, at)
        at += 10 + rdlength
        if at > size or rtype == TYPE_CNAME:
            return False
    return True


try:
    from netfilter.dns._hotpath import answer_is_plain as _c_answer_is_plain
    from netfilter.dns._hotpath import question as _c_question
except ImportError:  # built without a C compiler: same results, slower
    scan_question: Callable[[bytes], Question | None] = py_scan_question
    answer_is_plain: Callable[[bytes, int], bool] = py_answer_is_plain
else:
    scan_question = _c_question
    answer_is_plain = _c_answer_is_plain
