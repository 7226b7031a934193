"""Canaries (dns/canaries.py) on a real `netfilter serve dns`, asked by dig and dnspython.

The upstream is a recording DNS server on loopback: a canary must be answered by the
resolver itself and never reach it, while any other name does. Canary answers are
counted on /metrics per canary and appear in neither the log nor the audit log.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rdtypes.svcbbase
import dns.rrset
import pytest
import yaml

from netfilter.audit.store import AuditStore
from netfilter.config import DnsSettings
from netfilter.dns.canaries import Canaries, designations
from netfilter.dns.tlsconfig import generate_self_signed
from netfilter.dns.udp import relay_built
from tests.dns_support import Netfilter, dig, require_tools, udp
from tests.support import HOST, free_port

NXDOMAIN_CANARIES = ["use-application-dns.net", "mask.icloud.com", "mask-h2.icloud.com"]
RESOLVER_NAME = "dns.gateway.test"  # the certificate's DNS name: the SVCB TargetName


class Recorder:
    """An upstream that records every question name and answers REFUSED at once, but
    `alias.test` with a CNAME to a canary."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.names: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue
            self.names.append(query.question[0].name.to_text(omit_final_dot=True).lower())
            response = dns.message.make_response(query)
            if self.names[-1] == "alias.test":
                response.answer.append(dns.rrset.from_text(
                    "alias.test.", 60, "IN", "CNAME", "mask.icloud.com."))
            else:
                response.set_rcode(dns.rcode.REFUSED)
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Rig:
    recorder: Recorder
    on: Netfilter
    off: Netfilter
    metrics_port: int
    dot_port: int


@pytest.fixture(scope="module", params=["relay", "python"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Rig]:
    require_tools("dig")
    if request.param == "relay" and not relay_built():
        pytest.skip("the C extension netfilter.dns._hotpath was not built")
    env = {"NETFILTER_DNS_PYTHON": "1"} if request.param == "python" else {}
    base = tmp_path_factory.mktemp(f"canaries-{request.param}")
    certificate, key = base / "dot.pem", base / "dot.key"
    generate_self_signed(certificate, key, name=RESOLVER_NAME, addresses=[HOST])
    recorder = Recorder()
    dot_port, metrics_port = free_port(), free_port()
    on = Netfilter(base / "on", upstreams=[recorder.address], env=env, canaries=True,
                   dot_listen=[f"{HOST}:{dot_port}"], tls_certificate=str(certificate),
                   tls_key=str(key), block_ttl=60)
    on.config["metrics"] = {"listen": f"{HOST}:{metrics_port}"}
    on.conf.write_text(yaml.safe_dump(on.config), encoding="utf-8")
    off = Netfilter(base / "off", upstreams=[recorder.address], env=env)
    try:
        with on, off:
            yield Rig(recorder, on, off, metrics_port, dot_port)
    finally:
        recorder.close()


def _soa_owner(response: dns.message.Message) -> str:
    (soa,) = response.authority
    assert soa.rdtype == dns.rdatatype.SOA
    return str(soa.name.to_text(omit_final_dot=True))


@pytest.mark.parametrize("name", NXDOMAIN_CANARIES)
@pytest.mark.parametrize("qtype", ["A", "AAAA", "HTTPS"])
def test_canaries_are_nxdomain_and_never_forwarded(rig: Rig, name: str, qtype: str) -> None:
    for _ in range(2):  # the second time too: no fast path forwards it once seen
        response = udp(dns.message.make_query(name, qtype, use_edns=0), rig.on.port)
        assert response.rcode() == dns.rcode.NXDOMAIN
        assert not response.answer and _soa_owner(response) == name
        assert response.authority[0].ttl == 60
    assert name not in rig.recorder.names


def test_a_canary_seen_as_a_cname_target_stays_local(rig: Rig) -> None:
    """The target is checked (and found clean), but not left for the fast path, which
    would forward the canary itself from then on."""
    response = udp(dns.message.make_query("alias.test", "A"), rig.on.port)
    assert response.rcode() == dns.rcode.NOERROR and response.answer
    for _ in range(2):
        response = udp(dns.message.make_query("mask.icloud.com", "A"), rig.on.port)
        assert response.rcode() == dns.rcode.NXDOMAIN
    assert "mask.icloud.com" not in rig.recorder.names


def test_dig_sees_the_firefox_canary_answered(rig: Rig) -> None:
    out = dig(rig.on.port, "use-application-dns.net", "A")
    assert "status: NXDOMAIN" in out
    assert "use-application-dns.net" not in rig.recorder.names


def test_other_names_and_canaries_switched_off_are_forwarded(rig: Rig) -> None:
    response = udp(dns.message.make_query("plain.test", "A"), rig.on.port)
    assert response.rcode() == dns.rcode.REFUSED and "plain.test" in rig.recorder.names
    response = udp(dns.message.make_query("mask.icloud.com", "A"), rig.off.port)
    assert response.rcode() == dns.rcode.REFUSED  # the upstream's answer
    assert rig.recorder.names.count("mask.icloud.com") >= 1


def test_resolver_arpa_designates_the_dot_listener(rig: Rig) -> None:
    query = dns.message.make_query("_dns.resolver.arpa", "SVCB")
    response = udp(query, rig.on.port)
    assert response.rcode() == dns.rcode.NOERROR
    (rrset,) = response.answer
    (svcb,) = rrset
    assert svcb.target == dns.name.from_text(RESOLVER_NAME)
    assert [bytes(a) for a in svcb.params[dns.rdtypes.svcbbase.ParamKey.ALPN].ids] == [b"dot"]
    assert svcb.params[dns.rdtypes.svcbbase.ParamKey.PORT].port == rig.dot_port
    assert [str(a) for a in svcb.params[dns.rdtypes.svcbbase.ParamKey.IPV4HINT].addresses] == [
        HOST]
    assert len(svcb.params) == 3
    # Other types and names there: answered here too, never forwarded.
    nodata = udp(dns.message.make_query("_dns.resolver.arpa", "A"), rig.on.port)
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert _soa_owner(nodata) == "resolver.arpa"
    other = udp(dns.message.make_query("x.resolver.arpa", "SVCB"), rig.on.port)
    assert other.rcode() == dns.rcode.NXDOMAIN
    assert not any(n.endswith("resolver.arpa") for n in rig.recorder.names)
    assert "SVCB" in dig(rig.on.port, "_dns.resolver.arpa", "TYPE64")


def test_resolver_arpa_is_forwarded_without_canaries(rig: Rig) -> None:
    response = udp(dns.message.make_query("_dns.resolver.arpa", "SVCB"), rig.off.port)
    assert response.rcode() == dns.rcode.REFUSED  # no designation: a name like any other


def test_a_canary_over_dot(rig: Rig) -> None:
    query = dns.message.make_query("use-application-dns.net", "A")
    response = dns.query.tls(query, HOST, port=rig.dot_port, timeout=5, verify=False)
    assert response.rcode() == dns.rcode.NXDOMAIN


def test_canaries_are_counted_never_logged_or_recorded(rig: Rig) -> None:
    for name in NXDOMAIN_CANARIES:
        udp(dns.message.make_query(name, "A"), rig.on.port)
    udp(dns.message.make_query("_dns.resolver.arpa", "SVCB"), rig.on.port)
    with urllib.request.urlopen(f"http://{HOST}:{rig.metrics_port}/metrics",
                                timeout=5) as page:
        text = page.read().decode()
    counts = {line.split("canary=")[1].split('"')[1]: float(line.split()[-1])
              for line in text.splitlines()
              if line.startswith("netfilter_dns_canary_answers_total{")}
    assert set(counts) == {"firefox_doh", "icloud_private_relay", "resolver_arpa"}
    assert counts["firefox_doh"] >= 1 and counts["resolver_arpa"] >= 1
    assert counts["icloud_private_relay"] >= 2
    log = rig.on.log()
    assert "icloud" not in log and "use-application" not in log and "resolver.arpa" not in log
    store = AuditStore(rig.on.events_path, create=False)
    events = [json.loads(leaf.event) for leaf in store.leaves() if leaf.event]
    assert events and not [e for e in events if e["type"] == "block"]


# ---------------------------------------------------------------- the answers themselves


def test_designations_per_transport_and_port() -> None:
    settings = DnsSettings(dot_listen=["0.0.0.0:853", "[::1]:853"],
                           doh_listen=["192.0.2.1:443"], tls_certificate=Path("c.pem"),
                           tls_key=Path("k.pem"), canaries=True)
    records = designations(settings, "dns.gateway.test")
    answers = [dns.rdata.from_wire(1, dns.rdatatype.SVCB, r.rdata, 0, len(r.rdata))
               for r in records]
    dot, doh = answers
    assert (dot.priority, doh.priority) == (1, 2)
    assert dot.target == doh.target == dns.name.from_text("dns.gateway.test")
    assert dot.to_text() == '1 dns.gateway.test. alpn="dot" port="853" ipv6hint="::1"'
    assert doh.to_text() == ('2 dns.gateway.test. alpn="h2,http/1.1" port="443" '
                             'ipv4hint="192.0.2.1" dohpath="/dns-query{?dns}"')


def test_switched_off_or_without_listeners() -> None:
    assert Canaries(DnsSettings()).names == {}
    on = Canaries(DnsSettings(canaries=True))
    assert set(on.names) == set(NXDOMAIN_CANARIES)  # no DoT/DoH: resolver.arpa untouched
    assert on.label("_dns.resolver.arpa") is None and on.label("icloud.com") is None
