"""dns/codes.py agrees with dnspython's tables, name for name and number for number."""

from __future__ import annotations

import dns.flags
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from netfilter.dns.codes import (
    EDNS_DO,
    OPCODE_MASK,
    OPCODE_SHIFT,
    Flag,
    Rcode,
    RRClass,
    RRType,
    type_name,
)


@pytest.mark.parametrize("flag", list(Flag), ids=lambda f: f.name)
def test_header_flags(flag: Flag) -> None:
    assert flag == getattr(dns.flags, str(flag.name))


def test_opcode_and_do_bits() -> None:
    assert OPCODE_MASK >> OPCODE_SHIFT == 0xF
    assert dns.opcode.to_flags(dns.opcode.NOTIFY) & OPCODE_MASK == dns.opcode.NOTIFY << 11
    assert EDNS_DO == dns.flags.DO


@pytest.mark.parametrize("rcode", list(Rcode), ids=lambda r: r.name)
def test_rcodes(rcode: Rcode) -> None:
    assert rcode == dns.rcode.from_text(rcode.name)


@pytest.mark.parametrize("rtype", list(RRType), ids=lambda t: t.name)
def test_types(rtype: RRType) -> None:
    assert rtype == dns.rdatatype.from_text(rtype.name)
    assert type_name(rtype) == dns.rdatatype.to_text(rtype)


def test_classes_and_unknown_type_names() -> None:
    assert [int(c) for c in RRClass] == [dns.rdataclass.IN, dns.rdataclass.ANY]
    assert type_name(65280) == "TYPE65280" == dns.rdatatype.to_text(65280)
