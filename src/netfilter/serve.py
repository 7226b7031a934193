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
import threading
from collections.abc import Sequence
from pathlib import Path

from netfilter.audit.tileserver import TileServer
from netfilter.config import Settings, parse_hostport
from netfilter.engine import Engine
from netfilter.errors import ConfigError
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
    server = TileServer(directory, host, port)
    threading.Thread(target=server.serve_forever, name="audit-tiles", daemon=True).start()
    log.info("audit: serving tiles of %s on %s port %d", directory, host,
             server.server_address[1])
    return server


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
               config_path: Path) -> None:
    from netfilter.dns.server import DnsServer
    from netfilter.proxy.process import ProxyProcess
    from netfilter.stoppage import Renderer
    from netfilter.stoppage.server import StopPageServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers: list[DnsServer | StopPageServer | ProxyProcess] = []

    def reload() -> None:
        loop.run_in_executor(None, engine.reload)
        for server in servers:
            if isinstance(server, ProxyProcess):
                server.reload()  # the proxy's own engine, in the mitmdump child

    loop.add_signal_handler(signal.SIGHUP, reload)
    if "dns" in parts:
        assert settings.dns is not None
        servers.append(DnsServer(engine, settings.dns))
    if "stoppage" in parts:
        assert settings.stoppage is not None
        renderer = Renderer(settings.stoppage, base=settings.base)
        servers.append(StopPageServer(engine, settings.stoppage, renderer=renderer))
    if "proxy" in parts:
        assert settings.proxy is not None
        servers.append(ProxyProcess(settings.proxy, config_path, settings.base))
    tiles = _serve_tiles(settings)
    try:
        for server in servers:
            await server.start()
        log.info("netfilter: serving %s", ", ".join(parts))
        await stop.wait()
    finally:
        for server in servers:
            await server.stop()
        if tiles is not None:
            tiles.shutdown()
            tiles.server_close()


def serve(settings: Settings, parts: Sequence[str] = (), *,
          config_path: Path | None = None) -> int:
    """Run the parts; `config_path` is handed to the proxy child (mitmdump)."""
    chosen = _selected(settings, parts)
    engine = make_engine(settings)
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    try:
        runner(_run(settings, chosen, engine, config_path or Path("netfilter.yaml")))
    finally:
        engine.close()  # passes on aggregated counts, commits, signs a last checkpoint
    return 0
