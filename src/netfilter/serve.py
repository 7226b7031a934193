"""`netfilter serve`: run the configured parts in one process until told to stop.

SIGTERM/SIGINT stop it cleanly; SIGHUP reloads the lists (a refused bundle leaves the
lists in force). uvloop is used when installed: the DNS front-end's throughput
depends on it (plain asyncio measured ~4x slower on this kind of machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from netfilter.audit.tileserver import TileServer
from netfilter.config import Settings, parse_hostport
from netfilter.engine import Engine
from netfilter.errors import ConfigError, ListenError
from netfilter.metrics import MetricsServer, for_node
from netfilter.node import make_engine

__all__ = ["PARTS", "serve"]

log = logging.getLogger(__name__)
PARTS = ("dns", "proxy", "stoppage")
AVAILABLE = ("dns", "proxy", "stoppage")


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
    host, port = parse_hostport(listen)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


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


async def _run(settings: Settings, parts: list[str], engine: Engine,
               config_path: Path, ready: Callable[[], None] | None = None) -> None:
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

    def reload() -> None:
        loop.run_in_executor(None, engine.reload)
        for _, _, server in servers:
            if isinstance(server, ProxyProcess):
                server.reload()  # the proxy's own engine, in the mitmdump child

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
          config_path: Path | None = None, ready: Callable[[], None] | None = None) -> int:
    """Run the parts; `config_path` is handed to the proxy child (mitmdump); `ready` is
    called once every part listens (the demo prints what to try then)."""
    chosen = _selected(settings, parts)
    engine = make_engine(settings)
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    try:
        runner(_run(settings, chosen, engine, config_path or Path("netfilter.yaml"), ready))
    finally:
        engine.close()  # passes on aggregated counts, commits, signs a last checkpoint
    return 0
