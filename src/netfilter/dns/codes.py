"""DNS numbers by name: header flags, opcodes, RCODEs, RR types and classes, EDNS bits.

One table for the whole front-end (wire, answers, server, the Unbound plugin), so no
code spells 0x8000 or 28 and a reader can check each against its RFC. IntFlag and
IntEnum members are ints: they go into struct.pack and compare with parsed fields
as they are.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = [
    "EDE_OPTION",
    "EDNS_DO",
    "EDNS_VERSION",
    "OPCODE_MASK",
    "OPCODE_SHIFT",
    "RCODE_MASK",
    "Flag",
    "RRClass",
    "RRType",
    "Rcode",
    "type_name",
]


class Flag(IntFlag):
    """Header flag bits (RFC 1035 4.1.1, RFC 4035 3.2 for AD and CD)."""

    QR = 0x8000  # a response
    AA = 0x0400
    TC = 0x0200  # truncated: ask again over TCP
    RD = 0x0100  # recursion desired (copied from the query)
    RA = 0x0080  # recursion available
    AD = 0x0020
    CD = 0x0010  # checking disabled (copied from the query, RFC 4035 3.2.2)


OPCODE_MASK = 0x7800  # the opcode's four bits in the flags word
OPCODE_SHIFT = 11
RCODE_MASK = 0x000F  # the low four bits of the RCODE (EDNS holds the upper eight)


class Rcode(IntEnum):
    """Response codes (RFC 1035 4.1.1; BADVERS: RFC 6891 9, needs EDNS)."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16


class RRType(IntEnum):
    """Resource record types the front-end writes, reads or names in events."""

    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    NAPTR = 35
    DS = 43
    RRSIG = 46
    NSEC = 47
    DNSKEY = 48
    SVCB = 64  # RFC 9460; resolver.arpa designations (RFC 9462)
    HTTPS = 65
    OPT = 41  # the EDNS pseudo-record (RFC 6891)
    AXFR = 252
    ANY = 255
    CAA = 257


class RRClass(IntEnum):
    IN = 1
    ANY = 255


EDNS_DO = 0x8000  # DNSSEC OK, in the OPT record's flags (RFC 3225)
EDNS_VERSION = 0  # the only version we speak (RFC 6891 6.1.3)
EDE_OPTION = 15  # Extended DNS Error option code (RFC 8914)

_TYPE_NAMES = {t.value: t.name for t in RRType}


def type_name(rtype: int) -> str:
    """The mnemonic of a type, or TYPEnnn for one without (RFC 3597 5)."""
    return _TYPE_NAMES.get(rtype) or f"TYPE{rtype}"
