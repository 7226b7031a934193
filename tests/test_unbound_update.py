"""A list update reaches names that Unbound had cached as clean: a real unbound with the
plugin, a real upstream unbound, bundles swapped in place as `list update` does.

A swap that adds an entry has the plugin reload its lists and flush Unbound's caches
(unbound-control, on loopback without certificates): the newly blocked name is blocked
within BOUND seconds. A swap that only removes entries reloads without a flush (cached
answers stay, their TTLs keep running down).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.message
import dns.rcode
import pytest
import yaml

from netfilter.keys import generate_keypair, load_private_key
from netfilter.listfile import build_bundle
from tests.dns_support import Unbound, require_tools, udp
from tests.support import HOST, free_port
from tests.test_unbound_plugin import UNBOUND_PYTHON, PluginUnbound

# Seconds from a bundle's rename to the block being served: the plugin looks at the
# files each second (dns/unbound.py CHECK_INTERVAL), loads the list, flushes (README).
BOUND = 5.0


class ControlledPlugin(PluginUnbound):
    """The plugin's unbound with remote control on loopback, which the plugin uses."""

    name = "unbound-plugin-update"

    def __init__(self, directory: Path, upstream: Unbound, netfilter_config: Path) -> None:
        super().__init__(directory, upstream, netfilter_config)
        self.control_port = free_port()
        text = self.conf.read_text(encoding="utf-8").replace(
            "remote-control:\n  control-enable: no\n",
            f"remote-control:\n  control-enable: yes\n  control-interface: {HOST}\n"
            f"  control-port: {self.control_port}\n  control-use-cert: no\n")
        self.conf.write_text(text, encoding="utf-8")

    def environment(self) -> dict[str, str]:
        return {**super().environment(),
                "NETFILTER_UNBOUND_CONTROL": shlex.join(["unbound-control", "-c",
                                                         str(self.conf)])}


class Authority:
    """Signs successive versions of one list and installs them by rename."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        key, self.public = generate_keypair(directory / "authority")
        self.key = load_private_key(key)
        self.installed = directory / "list.nfl"
        self.version = 0

    def install(self, domains: list[str]) -> None:
        self.version += 1
        source = {"issuer": "Test Authority", "legal_basis": "Test Act s. 1",
                  "contact": "mailto:appeals@authority.test",
                  "entries": [{"domain": d, "ref": f"UPD-{d}", "category": "test"}
                              for d in domains]}
        src = self.directory / f"v{self.version}.yaml"
        src.write_text(yaml.safe_dump(source), encoding="utf-8")
        staged = self.directory / f"v{self.version}.nfl"
        build_bundle(src, staged, key=self.key, list_id="update-test", version=self.version)
        os.replace(staged, self.installed)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Authority, ControlledPlugin]]:
    require_tools("unbound", "unbound-control")
    if not UNBOUND_PYTHON.exists():
        pytest.skip("Debian's python3-unbound (unboundmodule.py) is not installed")
    base = tmp_path_factory.mktemp("update")
    authority = Authority(base)
    authority.install(["blocked.example"])
    (base / "upstream").mkdir()
    upstream = Unbound(base / "upstream")
    (base / "plugin").mkdir()
    config = base / "plugin" / "netfilter.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"id": "resolver-update.example", "key": str(base / "plugin" / "node.key")},
        "lists": [{"path": str(authority.installed), "trust": [str(authority.public)],
                   "action": "nxdomain"}],
        "dns": {"ede": 16, "block_ttl": 60},
        "audit": {"path": str(base / "plugin" / "audit.sqlite"), "client": "none"},
    }), encoding="utf-8")
    plugin = ControlledPlugin(base / "plugin", upstream, config)
    with upstream, plugin:
        yield authority, plugin


def _ask(plugin: ControlledPlugin, name: str) -> dns.message.Message:
    return udp(dns.message.make_query(name, "A", use_edns=0), plugin.port)


def _ttl(response: dns.message.Message) -> int:
    return response.answer[0].ttl


def test_a_new_entry_is_enforced_on_a_cached_name_within_the_bound(
        setup: tuple[Authority, ControlledPlugin]) -> None:
    authority, plugin = setup
    first = _ask(plugin, "partly.example")
    assert first.rcode() == dns.rcode.NOERROR and first.answer  # clean, now cached
    time.sleep(1.5)
    cached = _ask(plugin, "www.clean.example")
    assert _ttl(_ask(plugin, "partly.example")) < _ttl(first)  # served from the cache

    authority.install(["blocked.example", "partly.example"])  # adds an entry
    installed = time.monotonic()
    response = _ask(plugin, "partly.example")
    while response.rcode() != dns.rcode.NXDOMAIN and time.monotonic() - installed < BOUND:
        time.sleep(0.1)
        response = _ask(plugin, "partly.example")
    took = time.monotonic() - installed
    assert response.rcode() == dns.rcode.NXDOMAIN, (
        f"partly.example still answered from the cache {took:.1f} s after the swap:\n"
        f"{plugin.log()}")
    assert [e.code for e in response.extended_errors()] == [dns.edns.EDECode.CENSORED]
    assert "UPD-partly.example" in (response.extended_errors()[0].text or "")
    # the flush emptied the whole cache: other names are fetched again (full TTL)
    assert _ttl(_ask(plugin, "www.clean.example")) >= _ttl(cached)
    assert "Traceback" not in plugin.log() and "error" not in plugin.log(), plugin.log()


def test_a_swap_that_only_removes_entries_keeps_the_cache(
        setup: tuple[Authority, ControlledPlugin]) -> None:
    authority, plugin = setup
    first = _ask(plugin, "clean.example")
    assert first.rcode() == dns.rcode.NOERROR
    assert _ask(plugin, "cleared.blocked.example").rcode() == dns.rcode.NXDOMAIN
    time.sleep(1.5)
    authority.install(["partly.example"])  # blocked.example leaves the list
    installed = time.monotonic()
    while (_ask(plugin, "cleared.blocked.example").rcode() != dns.rcode.NOERROR
           and time.monotonic() - installed < BOUND):
        time.sleep(0.1)
    assert _ask(plugin, "cleared.blocked.example").rcode() == dns.rcode.NOERROR  # reloaded
    assert _ttl(_ask(plugin, "clean.example")) < _ttl(first)  # not flushed
    assert _ask(plugin, "partly.example").rcode() == dns.rcode.NXDOMAIN


def test_a_refused_bundle_leaves_the_lists_in_force(
        setup: tuple[Authority, ControlledPlugin]) -> None:
    authority, plugin = setup
    authority.installed.write_bytes(b"not a bundle")
    time.sleep(BOUND / 2)
    assert _ask(plugin, "partly.example").rcode() == dns.rcode.NXDOMAIN
    assert plugin.alive()
