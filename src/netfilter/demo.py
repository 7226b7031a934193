"""`netfilter serve` without `--config`: the embedded demo, on fixed loopback ports.

The demo is only settings built here, handed to the same `serve()` as any config, so
what a first-time user sees is what an operator runs. Its list and local lists ship
as package data (`demo_data/`, a copy of the authority-side `lists/demo/`), so a
pip-installed netfilter has them too. Blocked names and URLs are decided locally and
need no network; only clean names are forwarded, to the resolvers of
/etc/resolv.conf (or `NETFILTER_DEMO_UPSTREAM`, a comma-separated list of HOST:PORT,
empty for none).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from netfilter.config import (
    AuditSettings,
    DnsSettings,
    ListSettings,
    LocalSettings,
    MetricsSettings,
    NodeSettings,
    ProxySettings,
    Settings,
    StoppageSettings,
    parse_hostport,
)
from netfilter.dns.tlsconfig import generate_self_signed
from netfilter.errors import ConfigError

__all__ = ["Demo", "demo", "resolv_conf_upstreams", "state_dir"]

DATA = Path(__file__).resolve().with_name("demo_data")
DNS_LISTEN = "127.0.0.1:5353"
PROXY_LISTEN = "127.0.0.1:8080"
STOPPAGE_LISTEN = "127.0.0.1:8081"
METRICS_LISTEN = "127.0.0.1:9108"
DOT_LISTEN = "127.0.0.1:8853"  # DNS over TLS, with a self-signed certificate
DOH_LISTEN = "127.0.0.1:8443"  # DNS over HTTPS, at /dns-query
TLS_CERTIFICATE, TLS_KEY = Path("tls.crt"), Path("tls.key")  # in the state directory
# Where clean names go when no upstream is usable: the discard port on loopback, where
# nothing answers, so they get SERVFAIL after the timeout (DnsSettings needs one).
NO_UPSTREAM = "127.0.0.1:9"
UPSTREAM_ENV = "NETFILTER_DEMO_UPSTREAM"
BLOCKED_NAME = "blocked.example"  # a domain-level entry of the demo list (DEMO-0001)
CLEAN_NAME = "www.clean.example"  # in no demo list
BLOCKED_URL = "http://partly.example/dir/page.html"  # a URL-level entry (DEMO-0003)


def state_dir() -> Path:
    """`$XDG_STATE_HOME/netfilter` when set, else `./var`; created 0700 (it holds the
    node key and the audit log)."""
    xdg = os.environ.get("XDG_STATE_HOME")
    path = Path(xdg) / "netfilter" if xdg else Path("var")
    path = path.resolve()
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True)
    return path


def _is_self(upstream: str, listens: list[str]) -> bool:
    """Would forwarding to `upstream` reach our own listener (a loop)?"""
    host, port = parse_hostport(upstream, default_port=53)
    for listen in listens:
        lhost, lport = parse_hostport(listen)
        if port == lport and (ipaddress.ip_address(host) == ipaddress.ip_address(lhost)
                              or ipaddress.ip_address(lhost).is_unspecified):
            return True
    return False


def resolv_conf_upstreams(text: str) -> list[str]:
    """The `nameserver` addresses of a resolv.conf, as upstreams on port 53. Scoped
    IPv6 addresses (fe80::1%eth0) are left out: the forwarder does not take them."""
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(fields[1])
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            continue
        found.append(f"[{address}]:53" if address.version == 6 else f"{address}:53")
    return found


def _upstreams(listens: list[str]) -> tuple[list[str], str]:
    """The usable upstreams and where they came from; never our own listener."""
    override = os.environ.get(UPSTREAM_ENV)
    if override is not None:
        where = f"${UPSTREAM_ENV}"
        given = [u.strip() for u in override.split(",") if u.strip()]
        for upstream in given:
            try:
                parse_hostport(upstream, default_port=53)
            except ValueError as e:
                raise ConfigError(UPSTREAM_ENV, str(e)) from None
    else:
        where = "/etc/resolv.conf"
        try:
            given = resolv_conf_upstreams(Path(where).read_text(encoding="utf-8"))
        except OSError:
            given = []
    return [u for u in given if not _is_self(u, listens)], where


@dataclass(frozen=True)
class Demo:
    """The demo's settings, where its config copy is written, and what to print."""

    settings: Settings
    config_path: Path  # the same settings as YAML, for the proxy child (mitmdump)
    upstreams: list[str]  # usable ones; empty: clean names get SERVFAIL
    upstream_source: str

    def instructions(self, parts: Sequence[str] = ()) -> str:
        """What to try, once the `parts` (default: all) listen: each line a command
        that works."""
        running = set(parts) or {"dns", "proxy", "stoppage"}
        dns_host, dns_port = parse_hostport(DNS_LISTEN)
        dig = f"dig @{dns_host} -p {dns_port}"
        if self.upstreams:
            clean = f"clean: forwarded to {', '.join(self.upstreams)} ({self.upstream_source})"
        else:
            clean = f"clean: SERVFAIL, no usable upstream in {self.upstream_source}"
        lines = [
            f"netfilter demo: serving the bundled demo list; state in {_shown(self.state)}/",
            "Try:",
        ]
        if "dns" in running:
            lines += [f"  {dig} {BLOCKED_NAME}    # blocked: NXDOMAIN with an Extended DNS Error",
                      f"  {dig} {CLEAN_NAME}    # {clean}"]
            dot_host, dot_port = parse_hostport(DOT_LISTEN)
            doh_host, doh_port = parse_hostport(DOH_LISTEN)
            lines += [f"  kdig @{dot_host} -p {dot_port} +tls {BLOCKED_NAME}    # DoT: the same "
                      "answer over TLS (self-signed certificate)",
                      f"  kdig @{doh_host} -p {doh_port} +https {BLOCKED_NAME}    # DoH: the same "
                      "answer over HTTPS at /dns-query"]
        if "proxy" in running and self.settings.proxy is not None:
            lines.append(f"  curl -i -x http://{PROXY_LISTEN} {BLOCKED_URL}    "
                         "# blocked URL: 451 and the stop page")
        elif "proxy" in running:
            lines.append("  (no proxy: mitmproxy is not installed; pip install 'netfilter[proxy]')")
        audit = self.settings.audit
        assert audit is not None and self.settings.metrics is not None
        log = shlex.quote(_shown(self.settings.resolve(audit.path)))
        pub = self.settings.resolve(self.settings.node.key).with_suffix(".pub")
        lines += [
            f"  curl http://{self.settings.metrics.listen}/metrics    # the node's counters",
            f"  {_netfilter()} audit verify --log {log} --trust {shlex.quote(_shown(pub))}"
            "    # the audit log",
            "Blocked names and URLs need no network. Ctrl-C stops the demo.",
        ]
        if not self.upstreams and "dns" in running:
            lines.insert(1, f"netfilter demo: no usable upstream in {self.upstream_source}: "
                            f"clean names get SERVFAIL (set {UPSTREAM_ENV}=HOST:PORT)")
        return "\n".join(lines)

    @property
    def state(self) -> Path:
        return self.settings.base

    def ready(self, parts: Sequence[str] = ()) -> Callable[[], None]:
        """The callback `serve()` calls once every part listens."""
        return lambda: print(self.instructions(parts), flush=True)


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the current directory if below it."""
    try:
        return str(path.relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def _netfilter() -> str:
    """How to run `netfilter` from here: by name if it is on PATH, else its path."""
    script = Path(sys.executable).with_name("netfilter")
    found = shutil.which("netfilter")
    if found is not None and (not script.exists() or Path(found).resolve() == script.resolve()):
        return "netfilter"
    return shlex.quote(_shown(script)) if script.exists() else f"{sys.executable} -m netfilter.cli"


def demo(parts: Sequence[str] = ()) -> Demo:
    """Build the demo's settings in the state directory and write their YAML copy."""
    has_mitmproxy = importlib.util.find_spec("mitmproxy") is not None
    if "proxy" in parts and not has_mitmproxy:
        raise ConfigError("proxy", "mitmproxy is not installed (pip install 'netfilter[proxy]')")
    state = state_dir()
    if not (state / TLS_CERTIFICATE).exists() or not (state / TLS_KEY).exists():
        generate_self_signed(state / TLS_CERTIFICATE, state / TLS_KEY)  # the key 0600
    upstreams, source = _upstreams([DNS_LISTEN])
    proxy = (ProxySettings(listen=PROXY_LISTEN, confdir=state / "mitmproxy")
             if has_mitmproxy else None)
    settings = Settings(
        node=NodeSettings(id="demo-node", key=Path("node.key")),
        lists=[ListSettings(path=DATA / "demo.nfl", trust=[DATA / "demo.pub"],
                            action="nxdomain")],
        local=LocalSettings(block=DATA / "local-block.yaml", allow=DATA / "local-allow.yaml",
                            action="nxdomain"),
        # A gateway's resolver: the canaries keep browsers and Apple devices on it.
        dns=DnsSettings(listen=[DNS_LISTEN], upstreams=upstreams or [NO_UPSTREAM],
                        canaries=True,
                        dot_listen=[DOT_LISTEN], doh_listen=[DOH_LISTEN],
                        tls_certificate=TLS_CERTIFICATE, tls_key=TLS_KEY),
        proxy=proxy,
        stoppage=StoppageSettings(listen=STOPPAGE_LISTEN, operator="netfilter demo"),
        audit=AuditSettings(path=Path("audit.sqlite")),
        metrics=MetricsSettings(listen=METRICS_LISTEN),
        base=state,
    )
    config_path = state / "demo.yaml"
    text = ("# Written by `netfilter serve` (the demo) at each start; `netfilter serve "
            "--config` runs it too.\n"
            + yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True),
                             sort_keys=False))
    config_path.write_text(text, encoding="utf-8")
    return Demo(settings, config_path, upstreams, source)
