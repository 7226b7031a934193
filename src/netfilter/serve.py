"""`netfilter serve`: run the configured parts in one process until told to stop.

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
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from netfilter.audit.tileserver import TileServer
from netfilter.config import Settings, load_config, parse_hostport
from netfilter.configcheck import bind_probe, check_config
from netfilter.engine import Engine
from netfilter.errors import ConfigError, ListenError, NetfilterError
from netfilter.metrics import MetricsServer, for_node
from netfilter.node import make_engine

__all__ = ["PARTS", "serve"]

log = logging.getLogger(__name__)
PARTS = ("dns", "proxy", "stoppage")
AVAILABLE = ("dns", "proxy", "stoppage")
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


def _serve_tiles(settings: Settings) -> TileServer | None:
    """The audit log's tiles, read-only over HTTP for auditors and witnesses."""
    audit = settings.audit
    if audit is None or audit.tiles_listen is None:
        return None
    if audit.tiles is None:
        raise ConfigError("audit.tiles_listen", "needs audit.tiles (the directory to serve)")
    directory = settings.resolve(audit.tiles)
    directory.mkdir(parents=True, exist_ok=True)
    host, port = parse_hostport(audit.tiles_listen, any_port=True)
    try:
        server = TileServer(directory, host, port)
    except OSError as e:
        raise _listen_error("tiles", audit.tiles_listen, e) from None
    threading.Thread(target=server.serve_forever, name="audit-tiles", daemon=True).start()
    log.info("audit: serving tiles of %s on %s port %d", directory, host,
             server.server_address[1])
    return server


def _serve_metrics(settings: Settings, engine: Engine, parts: list[object],
                   tiles: TileServer | None) -> MetricsServer | None:
    """The parts' counters for Prometheus on `metrics.listen`, /healthz and /readyz."""
    if settings.metrics is None:
        return None
    metrics = for_node(engine, parts, tiles)
    listen = settings.metrics.listen
    host, port = parse_hostport(listen, any_port=True)
    try:
        server = MetricsServer(metrics, host, port)
    except OSError as e:
        raise _listen_error("metrics", listen, e) from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics: serving /metrics, /healthz and /readyz on %s port %d", host,
             server.server_address[1])
    return server


def _listen_error(part: str, listen: str, error: OSError) -> ListenError:
    """One line for a socket a part could not open: which part, where and why."""
    host, port = parse_hostport(listen, any_port=True)
    return ListenError.from_os_error(part, host, port, error)


def _check_bindable(listen: str) -> None:
    """OSError unless `listen` can be bound now. mitmdump binds in its child, whose
    failure would reach us only as an exit status after lines of its own (and a
    foreign listener on the port would pass the child's readiness probe)."""
    bind_probe(*parse_hostport(listen)).close()


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
        raise ConfigError("serve", "nothing to serve: add a dns, proxy or stoppage section")
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


async def _run(settings: Settings, parts: list[str], engine: Engine,
               config_path: Path, ready: Callable[[], None] | None = None,
               reread_config: bool = False) -> None:
    from netfilter.dns.server import DnsServer
    from netfilter.proxy.process import ProxyProcess
    from netfilter.stoppage import Renderer
    from netfilter.stoppage.server import StopPageServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # each part with its name and where it listens (for a one-line error if it cannot)
    servers: list[tuple[str, Callable[[], str], DnsServer | StopPageServer | ProxyProcess]] = []

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
        if again:
            again = False
            reload()

    def hand_over(applied: Settings) -> None:
        for _, _, server in servers:
            if isinstance(server, DnsServer) and applied.dns is not None:
                server.settings = applied.dns  # block answers read it per query
            elif isinstance(server, StopPageServer) and applied.stoppage is not None:
                if applied.stoppage != in_force.stoppage:
                    server.renderer = Renderer(applied.stoppage, base=applied.base)
                    server.settings = applied.stoppage
            elif isinstance(server, ProxyProcess):
                server.reload()  # the mitmdump child re-reads the config itself

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
    if settings.dns is not None and "dns" in parts:
        dns, listens = DnsServer(engine, settings.dns), settings.dns.listen
        # the addresses are opened in order: the first not yet serving failed
        servers.append(("dns", lambda: listens[min(len(dns.addresses), len(listens) - 1)],
                        dns))
    if settings.stoppage is not None and "stoppage" in parts:
        renderer = Renderer(settings.stoppage, base=settings.base)
        listen = settings.stoppage.listen
        servers.append(("stoppage", lambda: listen,
                        StopPageServer(engine, settings.stoppage, renderer=renderer)))
    if settings.proxy is not None and "proxy" in parts:
        proxy_listen = settings.proxy.listen
        servers.append(("proxy", lambda: proxy_listen,
                        ProxyProcess(settings.proxy, config_path, settings.base)))
    tiles: TileServer | None = None
    metrics: MetricsServer | None = None
    started: list[DnsServer | StopPageServer | ProxyProcess] = []
    try:
        tiles = _serve_tiles(settings)
        for name, where, server in servers:
            started.append(server)  # stopped below even when it fails half-way
            try:
                if isinstance(server, ProxyProcess):
                    _check_bindable(where())
                await server.start()
            except OSError as e:
                raise _listen_error(name, where(), e) from None
        metrics = _serve_metrics(settings, engine, [s for _, _, s in servers], tiles)
        log.info("netfilter: serving %s", ", ".join(parts))
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        for server in reversed(started):
            await server.stop()
        for http in (tiles, metrics):
            if http is not None:
                http.shutdown()
                http.server_close()


def serve(settings: Settings, parts: Sequence[str] = (), *,
          config_path: Path | None = None, ready: Callable[[], None] | None = None,
          reread: bool = False) -> int:
    """Run the parts; `config_path` is handed to the proxy child (mitmdump); `ready` is
    called once every part listens (the demo prints what to try then); `reread`: SIGHUP
    re-reads `config_path` (the operator's file, not the demo's)."""
    chosen = _selected(settings, parts)
    engine = make_engine(settings)
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    try:
        runner(_run(settings, chosen, engine, config_path or Path("netfilter.yaml"), ready,
                    reread and config_path is not None))
    finally:
        engine.close()  # passes on aggregated counts, commits, signs a last checkpoint
    return 0
