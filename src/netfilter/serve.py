"""`netfilter serve`: run the configured parts in one process until told to stop.

Every listening socket of every part is bound first (`open_listeners`), before the
engine is made (which writes to the audit log) and before any part serves: a port in
use, an address not on this host or a privileged port ends the start in one line
(ListenError: the part, the address, why) with nothing started and nothing written.
SIGTERM/SIGINT stop it cleanly; SIGHUP reloads the lists (a refused bundle leaves the
lists in force) and, when started with --config, re-reads the config: one with an error
is refused in one line and the config in force stays; of a good one, what can change
live is applied (LIVE) and every other changed key keeps its value until a restart.
uvloop is used when installed: the DNS front-end's throughput depends on it (plain
asyncio measured ~4x slower on this kind of machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from netfilter.config import Settings, StoppageSettings, load_config, parse_hostport
from netfilter.configcheck import bind_probe, check_config
from netfilter.engine import Engine
from netfilter.errors import ConfigError, ListenError, NetfilterError
from netfilter.metrics import for_node
from netfilter.node import make_engine
from netfilter.stoppage.render import blocked_by_url
from netfilter.web.admin import AdminSite, admin_body
from netfilter.web.metrics import MetricsSite
from netfilter.web.server import Listener, WebServer
from netfilter.web.transparency import TransparencySource

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from starlette.routing import BaseRoute

    from netfilter.dns.server import Listening
    from netfilter.updates.updater import Updater

__all__ = ["PARTS", "Listeners", "open_listeners", "serve"]

log = logging.getLogger(__name__)
PARTS = ("dns", "proxy", "stoppage", "icap")
AVAILABLE = ("dns", "proxy", "stoppage", "icap")
# What a re-read config may change in a running serve: the engine's lists, what the
# DNS server reads per query for its answers, the stop page texts, and what the
# mitmdump child takes from its own re-read. The rest (listen addresses, upstreams,
# which parts run, node, audit, metrics) is read once at start.
LIVE = frozenset({
    "lists", "local",
    "dns.ede", "dns.block_ttl", "dns.stoppage_ipv4", "dns.stoppage_ipv6",
    "dns.proxy_ipv4", "dns.proxy_ipv6",
    "proxy.intercept", "proxy.allowed_destinations",
    "stoppage.default_language", "stoppage.operator", "stoppage.operator_url",
    "stoppage.help_service", "stoppage.help_url", "stoppage.templates",
})


@dataclass
class Listeners:
    """Every socket the parts of a start listen on, bound (TCP ones listening) before
    any part starts, each handed to its part (the proxy's is mitmdump's own)."""

    dns: list[Listening] = field(default_factory=list)  # one per dns.listen address
    # dns.workers > 1: one more set like `dns` per worker child (SO_REUSEPORT, dnsworkers.py)
    dns_workers: list[list[Listening]] = field(default_factory=list)
    dot: list[socket.socket] = field(default_factory=list)  # one per dns.dot_listen address
    doh: list[socket.socket] = field(default_factory=list)  # one per dns.doh_listen address
    stoppage: socket.socket | None = None
    icap: socket.socket | None = None
    web: socket.socket | None = None  # web.listen: the public pages on a listener of their own
    tiles: socket.socket | None = None
    metrics: socket.socket | None = None

    def close(self) -> None:
        """Close every one (one a part has served is closed already: no harm)."""
        for listening in (*self.dns, *(b for bound in self.dns_workers for b in bound)):
            listening.close()
        for sock in (*self.dot, *self.doh, self.stoppage, self.icap, self.web, self.tiles,
                     self.metrics):
            if sock is not None:
                sock.close()


def open_listeners(settings: Settings, parts: Sequence[str]) -> Listeners:
    """Bind every listening socket the start of `parts` needs, in the order the parts
    start: DNS (UDP and TCP per address, then DoT and DoH), the stop page, ICAP, the proxy,
    the audit tiles, metrics. ListenError for the first that cannot be bound, naming its key (as
    `config check` does: `dns.listen[1]`, `metrics.listen`), the address and why;
    the ones bound before it are closed. TCP sockets listen at once: two parts given
    one address fail here too.

    mitmdump binds the proxy's address in its child, whose failure would reach us only
    as an exit status after lines of its own (and a foreign listener on the port would
    pass the child's readiness probe): the address is probed here, the probe held until
    the others are bound and closed then, so that the port does not seem to accept
    connections while the parts start."""
    tiles_listen = _tiles_listen(settings)
    bound = Listeners()
    probe: socket.socket | None = None
    try:
        if settings.dns is not None and "dns" in parts:
            from netfilter.dns.server import bind as bind_dns
            from netfilter.dnsworkers import bind_workers, worker_count

            workers = worker_count(settings.dns)
            bound.dns = bind_dns(settings.dns.listen, reuse_port=workers > 1)
            bound.dns_workers = bind_workers(bound.dns, workers)
            for i, address in enumerate(settings.dns.dot_listen):
                bound.dot.append(_bind_tcp(f"dns.dot_listen[{i}]", address))
            for i, address in enumerate(settings.dns.doh_listen):
                bound.doh.append(_bind_tcp(f"dns.doh_listen[{i}]", address))
        if settings.stoppage is not None and "stoppage" in parts:
            bound.stoppage = _bind_tcp("stoppage.listen", settings.stoppage.listen)
        if settings.icap is not None and "icap" in parts:
            bound.icap = _bind_tcp("icap.listen", settings.icap.listen)
        if settings.web is not None and settings.web.listen is not None:
            bound.web = _bind_tcp("web.listen", settings.web.listen)
        if settings.proxy is not None and "proxy" in parts:
            probe = _bind_tcp("proxy.listen", settings.proxy.listen, probe=True)
        if tiles_listen is not None:
            bound.tiles = _bind_tcp("audit.tiles_listen", tiles_listen)
        if settings.metrics is not None:
            bound.metrics = _bind_tcp("metrics.listen", settings.metrics.listen)
    except BaseException:
        bound.close()
        raise
    finally:
        if probe is not None:
            probe.close()
    return bound


def _bind_tcp(part: str, listen: str, *, probe: bool = False) -> socket.socket:
    """A TCP socket bound and listening on `listen` as asyncio's servers open theirs
    (SO_REUSEADDR: a connection in TIME_WAIT is no conflict; IPv6 only on an IPv6
    address); or, for a part that binds in a child (`probe`), configcheck's probe."""
    host, port = parse_hostport(listen, any_port=not probe)
    try:
        if probe:
            return bind_probe(host, port)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=100)
    except OSError as e:
        raise ListenError.from_os_error(part, host, port, e) from None


def _tiles_listen(settings: Settings) -> str | None:
    audit = settings.audit
    if audit is None or audit.tiles_listen is None:
        return None
    if audit.tiles is None:
        raise ConfigError("audit.tiles_listen", "needs audit.tiles (the directory to serve)")
    return audit.tiles_listen


def _web(settings: Settings, engine: Engine, listeners: Listeners) -> tuple[
        WebServer, list[BaseRoute], Listener | None, TransparencySource, AdminSite]:
    """The web stack's own listeners (the public pages on `web.listen`, the audit tiles
    on `audit.tiles_listen`), the public pages' routes (for the stop page's listener
    when there is no `web.listen`), the tiles' listener (its counters go to metrics)
    and the transparency page's source, and the dashboard (its routes beside theirs)."""
    from netfilter.web.app import build_app
    from netfilter.web.public import transparency_routes
    from netfilter.web.tiles import tiles_listener

    tiles_url = None
    if listeners.tiles is not None:
        host, port = listeners.tiles.getsockname()[:2]
        tiles_url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    source = TransparencySource(settings, engine, tiles_url=tiles_url)
    language = settings.stoppage.default_language if settings.stoppage else "en"
    admin = AdminSite(settings, engine)
    public: list[BaseRoute] = [*transparency_routes(source, language), *admin.routes()]
    served: list[Listener] = []
    if listeners.web is not None:
        served.append(Listener("web", listeners.web, build_app(public), keeps_body=admin_body))
    tiles: Listener | None = None
    audit = settings.audit
    if listeners.tiles is not None and audit is not None and audit.tiles is not None:
        directory = settings.resolve(audit.tiles)
        directory.mkdir(parents=True, exist_ok=True)
        tiles = tiles_listener(directory, listeners.tiles)
        served.append(tiles)
    return WebServer(served), public if listeners.web is None else [], tiles, source, admin


def _updater(settings: Settings, engine: Engine,
             installed: Callable[[list[str]], object]) -> Updater | None:
    """The periodic check of the lists' sources (an `updates` section and a list with a
    `source`); `installed` is called after a check installed something (a reload)."""
    if settings.updates is None or not any(item.source for item in settings.lists):
        return None
    from netfilter.updates.updater import Updater

    return Updater(settings, engine.recorder, on_install=installed,
                   enforced=lambda: engine.lists.versions())


def _serve_metrics(engine: Engine, parts: list[object], tiles: Listener | None,
                   sock: socket.socket | None,
                   updater: Updater | None = None) -> tuple[WebServer, MetricsSite] | None:
    """The parts' counters for Prometheus on `metrics.listen`, /healthz and /readyz: a
    listener of the web stack on this loop (start it); a scrape's blocking work runs on
    the site's thread (see netfilter.web.metrics)."""
    if sock is None:
        return None
    metrics = for_node(engine, parts, tiles)
    if updater is not None:
        metrics.add("updates", updater.stats, gauges=frozenset(
            {"consecutive_failures", "last_check_timestamp_seconds",
             "held_versions"}))
        metrics.add_families(lambda: _held(updater))
    site = MetricsSite(metrics)
    return WebServer([site.listener(sock)]), site


def _held(updater: Updater) -> Iterator[Metric]:
    """One series per list while a version of it is held for a person's decision."""
    from prometheus_client.core import GaugeMetricFamily

    from netfilter.updates.held import held_versions

    family = GaugeMetricFamily("netfilter_list_held_version", "The version of each list "
                               "held for an operator (list held/confirm/reject)",
                               labels=["list", "trigger"])
    for held in held_versions(updater.state):
        family.add_metric([held.list_id, held.trigger], held.version)
    yield family


def _selected(settings: Settings, parts: Sequence[str]) -> list[str]:
    configured = [p for p in PARTS if getattr(settings, p) is not None]
    chosen = list(parts) or configured
    for part in chosen:
        if part not in PARTS:
            raise ConfigError(part, f"not a part to serve (one of: {', '.join(PARTS)})")
        if getattr(settings, part) is None:
            raise ConfigError(part, "asked to serve it, but the config has no such section")
        if part not in AVAILABLE:
            if parts:
                raise ConfigError(part, "not available in this version of netfilter")
            log.warning("%s: section present but not available in this version", part)
    chosen = [p for p in chosen if p in AVAILABLE]
    if not chosen:
        raise ConfigError("serve", "nothing to serve: add a dns, proxy, stoppage or icap "
                                   "section")
    return chosen


def merge_live(old: Settings, new: Settings) -> tuple[Settings, list[str], list[str]]:
    """`new` with every key that cannot change live kept at its `old` value; and the
    keys changed live, and those that need a restart (dotted, e.g. `dns.listen`)."""
    update: dict[str, Any] = {}
    live: list[str] = []
    restart: list[str] = []
    for name in Settings.model_fields:
        was, now = getattr(old, name), getattr(new, name)
        if name == "base" or was == now:
            continue
        if name in LIVE:
            live.append(name)
        elif isinstance(was, BaseModel) and isinstance(now, BaseModel):
            keep: dict[str, Any] = {}
            for key in type(was).model_fields:
                if getattr(was, key) == getattr(now, key):
                    continue
                if f"{name}.{key}" in LIVE:
                    live.append(f"{name}.{key}")
                else:
                    restart.append(f"{name}.{key}")
                    keep[key] = getattr(was, key)
            update[name] = now.model_copy(update=keep)
        else:  # a section added or removed: which parts run
            restart.append(name)
            update[name] = was
    return new.model_copy(update=update), live, restart


def reread(path: Path, current: Settings, engine: Engine,
           parts: Sequence[str]) -> Settings | None:
    """Load, check (as `config check`, addresses aside) and apply `path` to the engine.

    Runs off the event loop (bundles verify). Returns the settings now in force, or
    None when nothing changed because the config or its lists were refused."""
    try:
        new = load_config(path)
        check_config(new, parts, listen=False)
    except NetfilterError as e:
        engine.reloads["refused"] += 1
        if e.where.startswith(("lists[", "local.")):  # every list refusal is an event
            engine.record_refusal(str(e))
        log.error("config reload refused, the config in force stays: %s", e)
        return None
    applied, live, restart = merge_live(current, new)
    if not engine.reload(applied, changed=", ".join(live)):
        return None  # the engine said why in one line
    for key in restart:
        log.warning("config reload: %s changed; a restart is needed for it, the old value "
                    "stays", key)
    if live:
        log.info("config reload: applied %s", ", ".join(live))
    return applied


async def _run(settings: Settings, parts: list[str], engine: Engine, listeners: Listeners,
               config_path: Path, ready: Callable[[], None] | None = None,
               reread_config: bool = False) -> None:
    from netfilter.dns.canaries import Canaries
    from netfilter.dns.encrypted import EncryptedDns
    from netfilter.dns.server import DnsServer
    from netfilter.dnsworkers import DnsWorkers, worker_share
    from netfilter.icap import IcapServer
    from netfilter.proxy.process import ProxyProcess
    from netfilter.stoppage import Renderer
    from netfilter.stoppage.server import StopPageServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # each part with its name (for a one-line error if it cannot start)
    servers: list[tuple[str, DnsServer | DnsWorkers | EncryptedDns | StopPageServer
                        | IcapServer | ProxyProcess]] = []

    in_force = settings
    reloading: asyncio.Future[Settings | None] | None = None
    again = False  # a SIGHUP came during a reload: the file may have changed since

    def apply(done: asyncio.Future[Settings | None]) -> None:
        """On the loop: hand what changed live to the parts (or nothing, if refused)."""
        nonlocal in_force, again
        if done.cancelled():
            return
        if done.exception() is not None:
            log.error("reload failed: %s", done.exception())
        applied = None if done.exception() is not None else done.result()
        if applied is not None:  # refused: the proxy child keeps its config too
            hand_over(applied)
            in_force = applied
            if updater is not None:
                updater.settings = applied  # its sources and lists; `updates` needs a restart
        if again:
            again = False
            reload()

    def hand_over(applied: Settings) -> None:
        for _, server in servers:
            if isinstance(server, DnsServer) and applied.dns is not None:
                # block answers read it per query
                server.settings = worker_share(applied.dns, dns_processes)
            elif isinstance(server, DnsWorkers):
                server.reload(applied)  # each worker reloads its engine, then serves it
            elif isinstance(server, StopPageServer) and applied.stoppage is not None:
                if applied.stoppage != in_force.stoppage:
                    server.renderer = Renderer(applied.stoppage, base=applied.base,
                                               blocked_by=blocked_by_url(applied))
                    server.settings = applied.stoppage
            elif isinstance(server, IcapServer) and applied.stoppage != in_force.stoppage:
                server.renderer = Renderer(applied.stoppage or StoppageSettings(),
                                           base=applied.base, blocked_by=blocked_by_url(applied))
            elif isinstance(server, ProxyProcess):
                server.reload()  # the mitmdump child re-reads the config itself
            elif isinstance(server, EncryptedDns):
                try:  # a renewed certificate, for new connections
                    server.reload_certificate()
                except NetfilterError as e:
                    log.error("dns: TLS certificate not reloaded, the one in force stays: %s", e)

    def lists_only() -> Settings | None:
        return in_force if engine.reload() else None

    def reload() -> None:
        nonlocal reloading, again
        if reloading is not None and not reloading.done():
            again = True
            return
        task: Callable[[], Settings | None] = lists_only
        if reread_config:
            task = lambda: reread(config_path, in_force, engine, parts)  # noqa: E731
        reloading = loop.run_in_executor(None, task)
        reloading.add_done_callback(apply)

    loop.add_signal_handler(signal.SIGHUP, reload)
    dns_processes = 1 + len(listeners.dns_workers)  # the node's DNS bounds split over them
    if settings.dns is not None and "dns" in parts:
        dns = DnsServer(engine, worker_share(settings.dns, dns_processes),
                        sockets=listeners.dns, canaries=Canaries.for_settings(settings))
        servers.append(("dns", dns))
        if listeners.dns_workers:  # dns.workers: the other processes on the same addresses
            servers.append(("dns", DnsWorkers(settings, listeners.dns_workers)))
            listeners.dns_workers = []  # theirs now: closed when they stop
        if listeners.dot or listeners.doh:
            servers.append(("dns", EncryptedDns(dns, settings.dns, base=settings.base,
                                                dot=listeners.dot, doh=listeners.doh)))
    web, public, tiles, source, admin = _web(settings, engine, listeners)
    if settings.stoppage is not None and "stoppage" in parts:
        renderer = Renderer(settings.stoppage, base=settings.base,
                            blocked_by=blocked_by_url(settings))
        servers.append(("stoppage", StopPageServer(engine, settings.stoppage, renderer=renderer,
                                                   sock=listeners.stoppage, routes=public,
                                                   keeps_body=admin_body)))
    if settings.icap is not None and "icap" in parts:
        icap_page = Renderer(settings.stoppage or StoppageSettings(), base=settings.base,
                             blocked_by=blocked_by_url(settings))
        servers.append(("icap", IcapServer(engine, settings.icap, icap_page,
                                           sock=listeners.icap)))
    if settings.proxy is not None and "proxy" in parts:
        servers.append(("proxy", ProxyProcess(settings.proxy, config_path, settings.base)))
    metrics: tuple[WebServer, MetricsSite] | None = None
    updater = _updater(settings, engine, lambda ids: loop.call_soon_threadsafe(reload))
    started: list[DnsServer | DnsWorkers | EncryptedDns | StopPageServer | IcapServer
                  | ProxyProcess] = []
    try:
        await web.start()
        for name, server in servers:
            started.append(server)  # stopped below even when it fails half-way
            try:
                await server.start()
            except OSError as e:  # bound already: not the address, something else
                raise ListenError.cannot_start(name, e) from None
        metrics = _serve_metrics(engine, [s for _, s in servers], tiles, listeners.metrics,
                                 updater)
        if metrics is not None:
            await metrics[0].start()
        if updater is not None:
            updater.start()
        admin.attach([s for _, s in servers], tiles, updater)
        admin.install()
        log.info("netfilter: serving %s", ", ".join(parts))
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        if updater is not None:
            await loop.run_in_executor(None, updater.close)  # a check finishes first
        for server in reversed(started):
            await server.stop()
        await web.stop()
        admin.close()
        source.close()
        if metrics is not None:
            await metrics[0].stop()
            metrics[1].close()


def serve(settings: Settings, parts: Sequence[str] = (), *,
          config_path: Path | None = None, ready: Callable[[], None] | None = None,
          reread: bool = False) -> int:
    """Run the parts; `config_path` is handed to the proxy child (mitmdump); `ready` is
    called once every part listens (the demo prints what to try then); `reread`: SIGHUP
    re-reads `config_path` (the operator's file, not the demo's)."""
    chosen = _selected(settings, parts)
    listeners = open_listeners(settings, chosen)  # a ListenError here: nothing started
    try:
        engine = make_engine(settings)
    except BaseException:
        listeners.close()
        raise
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    try:
        runner(_run(settings, chosen, engine, listeners,
                    config_path or Path("netfilter.yaml"), ready,
                    reread and config_path is not None))
    finally:
        listeners.close()  # those a part did not take over, when the start failed
        engine.close()  # passes on aggregated counts, commits, signs a last checkpoint
    return 0
