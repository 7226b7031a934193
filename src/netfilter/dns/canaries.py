"""Canaries: names a filtering network answers itself, so clients keep using its resolver.

Some clients ask a name before they go around the network's resolver, and stay when
the answer says no:
- `use-application-dns.net` (Firefox): NXDOMAIN keeps Firefox from switching on its
  own DNS over HTTPS, which would bypass the filter for the whole browser.
- `mask.icloud.com`, `mask-h2.icloud.com` (Apple's iCloud Private Relay): NXDOMAIN
  tells Apple devices the network does not allow the relay, so their Safari traffic
  stays visible to the network's filter (the device tells its user so).
- `_dns.resolver.arpa` (RFC 9462, Discovery of Designated Resolvers): SVCB records
  naming this node's own DoT and DoH listeners, so clients that want encrypted DNS
  upgrade to this filtering resolver rather than to a public one. Only when
  `dns.dot_listen` or `dns.doh_listen` is set, and only with a certificate that names
  the resolver (its first DNS name is the SVCB TargetName); otherwise not answered.

`dns.canaries` switches them (off by default: an open resolver must not answer other
people's names; the demo, a gateway's setup, has them on). Canary answers are counted
per canary (`netfilter_dns_canary_answers_total`), never logged or recorded per client,
and never forwarded.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from netfilter.config import DnsSettings, Settings, parse_hostport
from netfilter.dns.answers import Record, Reply
from netfilter.dns.codes import Rcode, RRType

__all__ = [
    "DDR_NAME",
    "DDR_ZONE",
    "FIREFOX",
    "ICLOUD_RELAY",
    "LABELS",
    "Canaries",
    "certificate_name",
    "designations",
]

FIREFOX = "use-application-dns.net"
ICLOUD_RELAY = ("mask.icloud.com", "mask-h2.icloud.com")
DDR_ZONE = "resolver.arpa"  # RFC 9462 6.4: a special-use name, answered locally
DDR_NAME = "_dns.resolver.arpa"
# Canary -> metric label
LABELS = {FIREFOX: "firefox_doh", **{name: "icloud_private_relay" for name in ICLOUD_RELAY},
          DDR_NAME: "resolver_arpa"}
DOH_PATH = "/dns-query{?dns}"  # RFC 9461 5.1: the dohpath SvcParam, a URI template
ALPN_DOT = ("dot",)
ALPN_DOH = ("h2", "http/1.1")
# SvcParamKeys (RFC 9460 14.3.2, RFC 9461 5)
_ALPN, _PORT, _IPV4HINT, _IPV6HINT, _DOHPATH = 1, 3, 4, 6, 7


class Canaries:
    """The canary names of one resolver and their answers."""

    def __init__(self, settings: DnsSettings,
                 designated: Sequence[Record] = ()) -> None:
        """`designated`: the SVCB records for `_dns.resolver.arpa` (`designations`);
        none: resolver.arpa is not answered."""
        self.ttl = settings.block_ttl
        self.designated = tuple(designated)
        names: dict[str, str] = {}
        if settings.canaries:
            names = {FIREFOX: LABELS[FIREFOX],
                     **{name: LABELS[name] for name in ICLOUD_RELAY}}
            if self.designated:
                names[DDR_NAME] = LABELS[DDR_NAME]
        self.names = names  # name -> label; empty when switched off

    @classmethod
    def for_settings(cls, settings: Settings) -> Canaries:
        """From a whole config: the certificate path is relative to its file."""
        dns = settings.dns or DnsSettings()
        target = None
        if dns.canaries and (dns.dot_listen or dns.doh_listen) and dns.tls_certificate:
            target = certificate_name(settings.resolve(dns.tls_certificate))
        return cls(dns, designations(dns, target) if target else ())

    def label(self, name: str) -> str | None:
        """The canary `name` is (its metric label), or None. `name` as wire.Query.name;
        any name at or below resolver.arpa counts as the resolver.arpa canary."""
        label = self.names.get(name)
        if label is None and self.designated and (name == DDR_ZONE
                                                  or name.endswith("." + DDR_ZONE)):
            return LABELS[DDR_NAME]
        return label

    def reply(self, name: str, qtype: int) -> Reply:
        """The answer for a canary `name` (one `label` knows)."""
        if name in (DDR_NAME, DDR_ZONE):
            if name == DDR_NAME and qtype in (RRType.SVCB, RRType.ANY):
                return Reply(Rcode.NOERROR, self.designated)
            return Reply(Rcode.NOERROR, (), DDR_ZONE, self.ttl)  # NODATA
        if name.endswith("." + DDR_ZONE):
            return Reply(Rcode.NXDOMAIN, (), DDR_ZONE, self.ttl)
        return Reply(Rcode.NXDOMAIN, (), name, self.ttl)


def certificate_name(path: Path) -> str | None:
    """The first DNS name (not a wildcard) in a PEM certificate's subjectAltName; None
    when it has none or cannot be read (config check names that problem)."""
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
        alt = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None
    for name in alt.value.get_values_for_type(x509.DNSName):
        if not name.startswith("*"):
            return name.rstrip(".").lower()
    return None


def designations(settings: DnsSettings, target: str) -> tuple[Record, ...]:
    """SVCB records designating the DoT and DoH listeners (RFC 9462 4, RFC 9461):
    one per transport and port, DoT first; addresses other than 0.0.0.0 and :: go
    into ipv4hint/ipv6hint."""
    records = []
    priority = 1
    for alpn, listen, path in ((ALPN_DOT, settings.dot_listen, None),
                               (ALPN_DOH, settings.doh_listen, DOH_PATH)):
        ports: dict[int, list[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
        for address in listen:
            host, port = parse_hostport(address, any_port=True)
            ip = ipaddress.ip_address(host)
            ports.setdefault(port, [])
            if not ip.is_unspecified:
                ports[port].append(ip)
        for port, hosts in ports.items():
            rdata = _svcb(priority, target, alpn, port, hosts, path)
            records.append(Record(RRType.SVCB, settings.block_ttl, rdata))
            priority += 1
    return tuple(records)


def _svcb(priority: int, target: str, alpn: Iterable[str], port: int,
          hosts: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
          dohpath: str | None) -> bytes:
    """SVCB rdata in ServiceMode (RFC 9460 2.2): params in increasing key order."""
    params = [(_ALPN, b"".join(bytes([len(a)]) + a.encode("ascii") for a in alpn)),
              (_PORT, struct.pack("!H", port))]
    v4 = b"".join(h.packed for h in hosts if h.version == 4)
    v6 = b"".join(h.packed for h in hosts if h.version == 6)
    if v4:
        params.append((_IPV4HINT, v4))
    if v6:
        params.append((_IPV6HINT, v6))
    if dohpath is not None:
        params.append((_DOHPATH, dohpath.encode("utf-8")))
    name = b"".join(bytes([len(label)]) + label.encode("ascii")
                    for label in target.split(".") if label) + b"\x00"
    return struct.pack("!H", priority) + name + b"".join(
        struct.pack("!HH", key, len(value)) + value for key, value in sorted(params))
