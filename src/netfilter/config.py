"""The one YAML configuration file, loaded into typed, validated settings.

A part (dns, proxy, stoppage, audit, metrics) runs when its section is present.
Unknown keys are errors, not silently ignored: a typo in a security setting must not
fall back to a default. Relative paths are taken relative to the config file.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from netfilter.errors import ConfigError, SourceError
from netfilter.listsource import read_yaml_file

__all__ = [
    "AuditSettings",
    "DnsSettings",
    "IcapSettings",
    "ListSettings",
    "LocalSettings",
    "MetricsSettings",
    "NodeSettings",
    "ProxySettings",
    "Settings",
    "StoppageSettings",
    "UpdateSettings",
    "WebSettings",
    "load_config",
    "parse_hostport",
]


def parse_hostport(value: str, default_port: int | None = None,
                   *, any_port: bool = False) -> tuple[str, int]:
    """`127.0.0.1:53`, `[::1]:53` or (with a default port) a bare address.

    `any_port` admits port 0 (listen on a port the system picks: tests, tools)."""
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r} is not [address]:port")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    try:
        ipaddress.ip_address(host)
    except ValueError as e:
        raise ValueError(f"{value!r}: {host!r} is not an IP address") from e
    if not port_text:
        if default_port is None:
            raise ValueError(f"{value!r} has no port")
        return host, default_port
    lowest = 0 if any_port else 1
    if not port_text.isdigit() or not lowest <= int(port_text) < 65536:
        raise ValueError(f"{value!r}: port must be {lowest}-65535")
    return host, int(port_text)


def _hostport(value: str) -> str:
    parse_hostport(value, any_port=True)
    return value


def _upstream(value: str) -> str:
    parse_hostport(value, default_port=53)
    return value


def _list_source(value: str | None) -> str | None:
    """A list's `source`: an https:// URL or a local path (a directory or a bundle)."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        raise ValueError("must be an https:// URL or a local path")
    if "://" in text and not text.lower().startswith("https://"):
        raise ValueError("must be an https:// URL or a local path (no plain http: the "
                         "signature protects the list, not the operator's privacy)")
    return text


def _key_file(value: Path) -> Path:
    if value.suffix != ".key":
        raise ValueError("must name a NAME.key file (NAME.pub is written beside it)")
    return value


HostPort = Annotated[str, AfterValidator(_hostport)]
Upstream = Annotated[str, AfterValidator(_upstream)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Section):
    id: str = Field("node", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # audit origin
    # Ed25519 node key NAME.key; created with NAME.pub beside it on first start
    key: Annotated[Path, AfterValidator(_key_file)] = Path("var/node.key")


class ListSettings(_Section):
    path: Path  # a signed bundle (.nfl)
    trust: list[Path] = Field(min_length=1)  # authority public keys accepted for it
    action: Literal["nxdomain", "stoppage", "refused"] = "stoppage"  # DNS answer on a block
    hmac_key: Path | None = None  # list key file, for hmac-sha256 lists
    # Where `list update` pulls newer versions from: an https:// URL or a local path. A
    # directory, or a URL ending in `/`, holds the bundle under this list's file name
    # (path's); otherwise the source names the bundle itself (see netfilter.updates).
    source: Annotated[str | None, AfterValidator(_list_source)] = None
    on_expiry: Literal["enforce", "stop"] = "enforce"  # after `expires`: alarm, then this


class LocalSettings(_Section):
    block: Path | None = None  # operator's own plain domains/URLs, hashed at load
    allow: Path | None = None  # operator's exceptions; each use is logged
    action: Literal["nxdomain", "stoppage", "refused"] = "stoppage"  # DNS answer, local blocks


class DnsSettings(_Section):
    listen: list[HostPort] = Field(default_factory=lambda: ["127.0.0.1:5353"])  # UDP + TCP
    upstreams: list[Upstream] = Field(default_factory=lambda: ["127.0.0.1:53"], min_length=1)
    timeout: float = Field(2.0, gt=0, le=30)  # seconds per query before SERVFAIL
    ede: Literal[15, 16, 17] = 16  # RFC 8914: 16 Censored (authority), 15/17 operator
    block_ttl: int = Field(300, ge=0, le=86400)
    stoppage_ipv4: ipaddress.IPv4Address = ipaddress.IPv4Address("127.0.0.1")
    stoppage_ipv6: ipaddress.IPv6Address = ipaddress.IPv6Address("::1")
    route_url_hosts_to_proxy: bool = False  # answer host-index names with the proxy
    proxy_ipv4: ipaddress.IPv4Address | None = None  # the proxy's address for that routing
    proxy_ipv6: ipaddress.IPv6Address | None = None
    # DNS over TCP: a connection holds a slot, so no client may keep them all.
    # Connections at once, all clients; when full, the longest-idle one makes room.
    tcp_max_connections: int = Field(512, ge=1, le=65536)
    # Connections per client (an IPv4 address, an IPv6 /64); at the cap its own
    # longest-idle one makes room. A NATed site or a forwarder needs a few; 16 x 32
    # clients are needed to fill 512 slots.
    tcp_per_client: int = Field(16, ge=1, le=65536)
    tcp_idle_timeout: float = Field(10.0, gt=0, le=3600)  # seconds with no query, then close
    # Seconds a connection may last however busy (a query every few seconds must not
    # hold a slot for ever); 2 minutes is ample for a stub's reuse.
    tcp_max_lifetime: float = Field(120.0, gt=0, le=86400)
    tcp_max_queries: int = Field(1000, ge=1, le=1 << 20)  # per connection, then close
    # Queries in flight per connection; past it the next is read once one is answered
    # (Knot Resolver's net.tcp_pipeline, default 100).
    tcp_pipeline: int = Field(100, ge=1, le=65535)
    # Bytes of answers a client has not read yet that we keep for it; past it the
    # connection is dropped (a slow or absent reader must not grow our memory).
    tcp_max_buffer: int = Field(256 * 1024, ge=4096, le=64 << 20)
    # Answers the C relay keeps (dns/_hotpath.c), entries; 0 switches the cache off.
    # Positive and negative (RFC 2308), TTLs honoured, emptied on every list swap; at
    # most 1,232 bytes an entry, so memory stays below ~1.4 KB x cache_size.
    cache_size: int = Field(65536, ge=0, le=1 << 24)
    # Encrypted DNS (dns/dot.py, dns/doh.py): DNS over TLS (RFC 7858) and over HTTPS
    # (RFC 8484, at /dns-query), each a list of host:port (TCP), none by default. Their
    # connections keep to the tcp_* limits above, in slots of their own per listener kind.
    dot_listen: list[HostPort] = Field(default_factory=list)
    doh_listen: list[HostPort] = Field(default_factory=list)
    tls_certificate: Path | None = None  # PEM: the certificate chain both present
    tls_key: Path | None = None  # PEM: its private key
    tls_handshake_timeout: float = Field(5.0, gt=0, le=300)  # seconds, then closed
    # HTTP/2 streams (DoH queries) one connection may have open at once
    doh_max_streams: int = Field(100, ge=1, le=65535)
    # Canaries (dns/canaries.py): answer use-application-dns.net (Firefox's DoH) and
    # mask(-h2).icloud.com (iCloud Private Relay) NXDOMAIN, and _dns.resolver.arpa (RFC
    # 9462) with the DoT/DoH listeners above, so clients stay on this resolver. For a
    # gateway (school, library: the demo has them on); off for an ISP's open resolver.
    canaries: bool = Field(False, strict=True)  # true or false, nothing else
    # Processes serving UDP and TCP on the dns.listen addresses (SO_REUSEPORT; the kernel
    # spreads clients over them), each with its own engine on the shared list files and
    # an even share of the relay cache and the TCP limits above, so the node keeps to
    # them; 0 (the default): one per core. DoT and DoH stay in the first.
    workers: int = Field(0, ge=0, le=64, strict=True)

    @model_validator(mode="after")
    def _routing_needs_an_address(self) -> DnsSettings:
        if self.route_url_hosts_to_proxy and not (self.proxy_ipv4 or self.proxy_ipv6):
            raise ValueError("route_url_hosts_to_proxy needs proxy_ipv4 and/or proxy_ipv6")
        return self

    @model_validator(mode="after")
    def _encrypted_needs_a_certificate(self) -> DnsSettings:
        if (self.dot_listen or self.doh_listen) and not (self.tls_certificate
                                                         and self.tls_key):
            raise ValueError("dot_listen and doh_listen need tls_certificate and tls_key")
        return self


class ProxySettings(_Section):
    listen: HostPort = "127.0.0.1:8080"
    intercept: Literal["none", "selective", "all"] = "selective"  # TLS: which hosts to decrypt
    confdir: Path | None = None  # mitmproxy confdir holding its CA (mitmproxy-ca.pem)
    # Destinations the proxy may connect to (CIDRs or host patterns like *.example); any
    # other is answered 403 without connecting. Empty: no restriction.
    allowed_destinations: list[str] = Field(default_factory=list)


class StoppageSettings(_Section):
    listen: HostPort = "127.0.0.1:8081"
    default_language: str = Field("en", pattern=r"^[a-z]{2,3}$")
    operator: str | None = Field(None, max_length=200)  # who enforces the block (the page says)
    operator_url: str | None = Field(None, max_length=500)  # Link: <...>; rel="blocked-by"
    help_service: str | None = Field(None, max_length=500)  # optional confidential help text
    help_url: str | None = Field(None, max_length=500)
    templates: Path | None = None  # a directory overriding the shipped templates
    # Against slow clients (slowloris): connections at once, and of those that have
    # sent something, per client address (IPv6: per /64). When full, or at a client's
    # cap, the oldest connection whose request head is not whole yet is closed for the
    # new one (at the cap, that client's own).
    max_clients: int = Field(512, ge=1, le=65536)
    max_clients_per_address: int = Field(32, ge=1, le=65536)
    header_timeout: float = Field(10.0, gt=0, le=300)  # seconds for a request head
    # ... and this, once more than half of max_clients are in use
    busy_header_timeout: float = Field(2.0, gt=0, le=300)


class IcapSettings(_Section):
    """The ICAP server (RFC 3507, REQMOD at /reqmod): `netfilter serve icap`."""

    listen: HostPort = "127.0.0.1:1344"
    max_connections: int = Field(256, ge=1, le=65536)  # at once; OPTIONS says Max-Connections
    max_connections_per_client: int = Field(64, ge=1, le=65536)  # per client address
    header_timeout: float = Field(10.0, gt=0, le=300)  # seconds for a head, or a body read
    idle_timeout: float = Field(60.0, gt=0, le=3600)  # between requests on one connection


class AuditSettings(_Section):
    path: Path = Path("var/audit.sqlite")
    client: Literal["none", "truncated", "pseudonym", "full"] = "pseudonym"
    retention_days: int = Field(90, ge=1, le=3650)
    checkpoint_interval: float = Field(60, gt=0)  # seconds
    witnesses: list[str] = Field(default_factory=list)  # cosigner keys name+hash+base64
    # Events carry no blocked URL or name (the entry reference identifies it); an
    # operator may add them, and that choice is itself recorded (config-changed).
    record_targets: bool = False
    tiles: Path | None = None  # keep this directory in the C2SP tlog-tiles layout
    tiles_listen: HostPort | None = None  # and serve it read-only over HTTP here
    # Identical blocks (list, entry, front-end, action, recorded client) within this
    # many seconds become one event with a count; 0 records every block on its own.
    aggregate_window: float = Field(10.0, ge=0, le=3600)
    # Events held in memory for the store; past it they are shed (counted), never
    # waited for. Bounds what a crash can lose, by count.
    queue_size: int = Field(16384, ge=16, le=1 << 20)
    # A group that may read the log (it is then 0640, else 0600); never the keys file.
    group: str | None = Field(None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")


class UpdateSettings(_Section):
    """`netfilter list update` and, when this section is present, the periodic check
    inside `serve` for every list with a `source`. Times in seconds."""

    interval: float = Field(3600.0, ge=1, le=7 * 86400)  # between two checks of a source
    jitter: float = Field(300.0, ge=0, le=86400)  # each wait moves by up to this, either way
    retry_min: float = Field(60.0, ge=1, le=86400)  # after a failure; doubled per failure...
    retry_max: float = Field(3600.0, ge=1, le=7 * 86400)  # ... up to this
    timeout: float = Field(30.0, gt=0, le=3600)  # per HTTPS request (connect, each read)
    max_size: int = Field(4 << 30, ge=1024)  # bytes a download may have; past it, refused
    # A PEM file with the CA(s) that HTTPS sources must chain to; given, the system's
    # CAs are not trusted for them (pinned). Either way TLS is always verified.
    ca: Path | None = None
    # Freeze alarm (TUF): the newest version a source serves was issued longer ago.
    max_age: float = Field(2 * 86400.0, gt=0)
    # Highest installed version and manifest digest per list (rollback refused across
    # restarts); SQLite, 0600. Default: list-state.sqlite beside the audit log (without
    # an audit section, beside the node key).
    state: Path | None = None
    # Update sanity checks (netfilter.updates.sanity): a new version whose entry count
    # moves by more than this fraction either way (0.2 = 20 %) is held for an operator
    # (`netfilter list held|confirm|reject`), not installed; not applied to a first install.
    max_entry_change: float = Field(0.2, gt=0)
    # A YAML list of essential names (plain names, or {name: ..., private: true}); a new
    # version whose domain entries or host index newly cover one (or a parent domain of
    # one) is held. A private name is shown only as protected[N]. null: no such check.
    protected_names: Path | None = None

    @model_validator(mode="after")
    def _retry_order(self) -> UpdateSettings:
        if self.retry_max < self.retry_min:
            raise ValueError("retry_max must be at least retry_min")
        return self


class MetricsSettings(_Section):
    listen: HostPort = "127.0.0.1:9108"


class WebSettings(_Section):
    """The public pages (/transparency, /transparency.json) and the dashboard (/admin/)."""

    listen: HostPort | None = None  # a listener of their own; null: the stop page's
    # Where the public reaches them (https://filter.example): the 451 answers' Link
    # rel="blocked-by" points below it; null: derived from the listener's address.
    public_url: str | None = Field(None, max_length=500, pattern=r"^https?://[^\s<>]+$")
    # The operator dashboard (/admin/, beside the public pages) answers loopback clients
    # only; true: any client that reaches the listener (put TLS in front of it then).
    admin_remote: bool = False
    # Its accounts (`netfilter user add`), a 0600 file; null: admin-accounts.json in the
    # node's state directory (where the list state is).
    accounts: Path | None = None


class Settings(_Section):
    """The whole file; `base` is the directory relative paths are resolved against."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    lists: list[ListSettings] = Field(default_factory=list)
    local: LocalSettings = Field(default_factory=LocalSettings)
    dns: DnsSettings | None = None
    proxy: ProxySettings | None = None
    stoppage: StoppageSettings | None = None
    icap: IcapSettings | None = None
    audit: AuditSettings | None = None
    metrics: MetricsSettings | None = None
    updates: UpdateSettings | None = None
    web: WebSettings | None = None
    base: Path = Field(Path("."), exclude=True)

    def resolve(self, path: Path) -> Path:
        """A configured path, relative to the config file's directory."""
        return path if path.is_absolute() else self.base / path


def _where(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}]"]
        else:
            parts.append(item)
    return ".".join(parts) or "(top level)"


def load_config(path: str | Path) -> Settings:
    """Read and validate; any problem is one ConfigError naming the file and key."""
    path = Path(path)
    try:
        raw: Any = read_yaml_file(path)
    except SourceError as e:
        raise ConfigError(e.where, e.reason) from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, "expected a mapping of sections (node, lists, dns, ...)")
    if "base" in raw:
        raise ConfigError(f"{path}: base", "unknown key")
    # A present but empty section (`dns:`) means "run it with defaults".
    sections = ("node", "local", "dns", "proxy", "stoppage", "icap", "audit", "metrics",
                "updates")
    data = {k: ({} if v is None and k in sections else v) for k, v in raw.items()}
    try:
        return Settings.model_validate({**data, "base": path.resolve().parent})
    except ValidationError as e:
        err = e.errors()[0]
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown key"
        value = err.get("input")
        if err["type"] != "extra_forbidden" and isinstance(value, str | int | float):
            reason = f"{reason} (got {value!r})"
        raise ConfigError(f"{path}: {_where(tuple(err['loc']))}", reason) from e
