"""The Unbound plugin inside a real unbound: blocked and clean names, EDE, CNAMEs,
events in the audit log, and no side effects from unbound-checkconf."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.message
import dns.rcode
import pytest
import yaml

from netfilter.audit.store import AuditStore
from netfilter.audit.verify import verify_log
from netfilter.keys import load_public_key
from tests.dns_support import Unbound, _Process, require_tools, udp
from tests.support import DEMO_LIST, DEMO_PUB, HOST, REPO, free_port

UNBOUND_PYTHON = Path("/usr/lib/python3/dist-packages/unboundmodule.py")


class PluginUnbound(_Process):
    """An unbound running addons/unbound_netfilter.py, forwarding to `upstream`."""

    name = "unbound-plugin"

    def __init__(self, directory: Path, upstream: Unbound, netfilter_config: Path) -> None:
        super().__init__(directory, free_port())
        self.netfilter_config = netfilter_config
        self.conf = directory / "plugin.conf"
        self.conf.write_text("\n".join([
            "server:",
            "  do-daemonize: no", '  username: ""', '  chroot: ""',
            f'  directory: "{directory}"', '  pidfile: ""', "  use-syslog: no",
            '  logfile: ""', "  verbosity: 1",
            f"  interface: {HOST}@{self.port}", f"  port: {self.port}",
            "  access-control: 127.0.0.0/8 allow", "  do-ip6: no", "  num-threads: 1",
            "  do-not-query-localhost: no", f"  outgoing-interface: {HOST}",
            '  module-config: "python iterator"',
            *(f'  local-zone: "{zone}." nodefault' for zone in ("example", "test", "invalid")),
            "python:",
            f'  python-script: "{REPO / "addons" / "unbound_netfilter.py"}"',
            "remote-control:", "  control-enable: no",
            "forward-zone:", '  name: "."', f"  forward-addr: {HOST}@{upstream.port}",
        ]) + "\n", encoding="utf-8")

    def environment(self) -> dict[str, str]:
        return {**os.environ, "NETFILTER_CONFIG": str(self.netfilter_config),
                "NETFILTER_SITE_PACKAGES": site.getsitepackages()[0],
                "PYTHONPATH": str(UNBOUND_PYTHON.parent)}

    def command(self) -> list[str]:
        return ["unbound", "-d", "-c", str(self.conf)]

    def probe_message(self) -> dns.message.Message:
        return dns.message.make_query("clean.example", "A")


def _netfilter_config(directory: Path) -> Path:
    local_block = directory / "local-block.yaml"
    local_block.write_text("entries:\n  - stop.test\n", encoding="utf-8")
    config = {
        "local": {"block": str(local_block), "action": "stoppage"},
        "node": {"id": "resolver-1.example", "key": str(directory / "node.key")},
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)], "action": "nxdomain"}],
        "dns": {"ede": 16, "block_ttl": 120, "canaries": True,
                "stoppage_ipv4": "192.0.2.80", "stoppage_ipv6": "2001:db8::80"},
        "audit": {"path": str(directory / "audit.sqlite"), "client": "truncated",
                  "checkpoint_interval": 1},
    }
    path = directory / "netfilter.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Unbound, PluginUnbound]]:
    require_tools("unbound", "unbound-checkconf")
    if not UNBOUND_PYTHON.exists():
        pytest.skip("Debian's python3-unbound (unboundmodule.py) is not installed")
    if sys.version_info[:2] != (3, 11):
        pytest.skip("Unbound's embedded Python is Debian's 3.11: the venv must match")
    base = tmp_path_factory.mktemp("plugin")
    (base / "upstream").mkdir()
    upstream = Unbound(base / "upstream")
    (base / "plugin").mkdir()
    plugin = PluginUnbound(base / "plugin", upstream, _netfilter_config(base / "plugin"))
    with upstream, plugin:
        yield upstream, plugin


def test_checkconf_has_no_side_effects(servers: tuple[Unbound, PluginUnbound],
                                       tmp_path: Path) -> None:
    _, plugin = servers
    config = _netfilter_config(tmp_path)
    env = {**plugin.environment(), "NETFILTER_CONFIG": str(config)}
    result = subprocess.run(["unbound-checkconf", str(plugin.conf)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "audit.sqlite").exists() and not (tmp_path / "node.key").exists()


def test_clean_names_pass_through(servers: tuple[Unbound, PluginUnbound]) -> None:
    upstream, plugin = servers
    query = dns.message.make_query("clean.example", "A")
    assert udp(query, plugin.port).answer == udp(query, upstream.port).answer
    assert udp(dns.message.make_query("clean.example", "AAAA"), plugin.port).answer


@pytest.mark.parametrize("qtype", ["A", "AAAA", "TXT", "HTTPS"])
@pytest.mark.parametrize("name", ["blocked.example", "sub.blocked.example"])
def test_blocked_names_get_nxdomain_with_ede(servers: tuple[Unbound, PluginUnbound],
                                             name: str, qtype: str) -> None:
    _, plugin = servers
    response = udp(dns.message.make_query(name, qtype, use_edns=0), plugin.port)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert not response.answer
    assert response.authority and response.authority[0].ttl == 120
    errors = response.extended_errors()
    assert [e.code for e in errors] == [dns.edns.EDECode.CENSORED]
    assert "DEMO-0001" in (errors[0].text or "")


@pytest.mark.parametrize(("qtype", "address"), [("A", "192.0.2.80"),
                                               ("AAAA", "2001:db8::80")])
def test_stoppage_answers_carry_the_stop_page(servers: tuple[Unbound, PluginUnbound],
                                              qtype: str, address: str) -> None:
    """The resolver's own records (answers.block_reply), handed to Unbound as RFC 3597
    generic rdata."""
    _, plugin = servers
    response = udp(dns.message.make_query("www.stop.test", qtype, use_edns=0), plugin.port)
    assert response.rcode() == dns.rcode.NOERROR
    (rrset,) = response.answer
    assert [r.address for r in rrset] == [address] and rrset.ttl == 120
    assert [e.code for e in response.extended_errors()] == [dns.edns.EDECode.CENSORED]


def test_structured_error_when_the_client_asks(servers: tuple[Unbound, PluginUnbound]) -> None:
    _, plugin = servers
    query = dns.message.make_query("x.blocked.example", "A", use_edns=0,
                                   options=[dns.edns.EDEOption(dns.edns.EDECode.OTHER)])
    errors = udp(query, plugin.port).extended_errors()
    data = json.loads(errors[0].text or "")
    assert "DEMO-0001" in data["j"] and data["o"].startswith("Demo Blocking Authority")
    assert "https://appeals.authority.example/" in data["c"]


def test_cname_to_a_blocked_name_is_blocked(servers: tuple[Unbound, PluginUnbound]) -> None:
    _, plugin = servers
    for _ in range(2):  # the iterator cached the chain; the block expired it there
        response = udp(dns.message.make_query("alias.clean.example", "A"), plugin.port)
        assert response.rcode() == dns.rcode.NXDOMAIN
        # the SOA owns the name asked (not blocked.example, which it is not below)
        assert [r.name.to_text() for r in response.authority] == ["alias.clean.example."]
    clean = udp(dns.message.make_query("alias2.clean.example", "A"), plugin.port)
    assert clean.rcode() == dns.rcode.NOERROR and clean.answer


@pytest.mark.parametrize("name", ["use-application-dns.net", "mask.icloud.com",
                                  "mask-h2.icloud.com"])
def test_canaries_are_answered_by_the_plugin(servers: tuple[Unbound, PluginUnbound],
                                             name: str) -> None:
    """NXDOMAIN with the plugin's own SOA: not from the iterator, whose upstream
    forwards these names to a port with nothing on it (SERVFAIL)."""
    _, plugin = servers
    for _ in range(2):
        response = udp(dns.message.make_query(name, "A", use_edns=0), plugin.port)
        assert response.rcode() == dns.rcode.NXDOMAIN and not response.answer
        (soa,) = response.authority
        assert soa.name.to_text() == f"{name}." and soa[0].mname.to_text() == "localhost."
        assert response.extended_errors() == []  # not a block


def test_blocks_are_audit_events_and_the_log_verifies(
        servers: tuple[Unbound, PluginUnbound]) -> None:
    _, plugin = servers
    for _ in range(3):  # never cached: each query is decided, and recorded, again
        udp(dns.message.make_query("again.blocked.test", "A"), plugin.port)
    plugin.stop()  # deinit commits the queue and signs a last checkpoint
    store = AuditStore(plugin.directory / "audit.sqlite", create=False)
    events = [json.loads(leaf.event) for leaf in store.leaves() if leaf.event]
    again = [e for e in events if e["type"] == "block" and e["ref"] == "DEMO-0002"]
    # the first at once; the repeats as one aggregated event, passed on by deinit
    assert len(again) == 2 and sum(e.get("count", 1) for e in again) == 3
    assert {e["frontend"] for e in again} == {"dns"} and again[0]["client"] == "127.0.0.0/24"
    assert "again" not in json.dumps(events)
    report = verify_log(store, load_public_key(plugin.directory / "node.pub"))
    assert report.ok and report.size == len(events) and report.checkpoints >= 1


def test_broken_config_fails_closed_and_says_so_once(
        servers: tuple[Unbound, PluginUnbound], tmp_path: Path) -> None:
    upstream, _ = servers
    config = tmp_path / "netfilter.yaml"
    config.write_text(yaml.safe_dump({"lists": [{"path": str(tmp_path / "absent.nfl"),
                                                 "trust": [str(DEMO_PUB)]}]}),
                      encoding="utf-8")
    broken = PluginUnbound(tmp_path, upstream, config)
    with broken:  # ready: its probe query got an answer (SERVFAIL counts)
        for _ in range(5):
            response = udp(dns.message.make_query("clean.example", "A"), broken.port)
            assert response.rcode() == dns.rcode.SERVFAIL  # never resolved unfiltered
    assert broken.log().count("cannot load, answering SERVFAIL") == 1
    assert "absent.nfl: file not found" in broken.log()
