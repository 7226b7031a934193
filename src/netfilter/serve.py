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
from collections.abc import Sequence
from pathlib import Path

from netfilter.config import Settings
from netfilter.engine import Engine
from netfilter.errors import ConfigError
from netfilter.events import EventSink, JsonLinesSink

__all__ = ["PARTS", "event_sink", "serve"]

log = logging.getLogger(__name__)
PARTS = ("dns", "proxy", "stoppage")
AVAILABLE = ("dns",)


def event_sink(settings: Settings) -> EventSink:
    """Where blocks and list events go until the audit log lands: JSON lines."""
    audit = settings.audit
    path = (settings.resolve(audit.path).with_suffix(".jsonl") if audit
            else settings.resolve(Path("var/events.jsonl")))
    return JsonLinesSink(path)


def _selected(settings: Settings, parts: Sequence[str]) -> list[str]:
    configured = [p for p in PARTS if getattr(settings, p) is not None]
    chosen = list(parts) or configured
    for part in chosen:
        if getattr(settings, part) is None:
            raise ConfigError(part, "asked to serve it, but the config has no such section")
        if part not in AVAILABLE:
            if parts:
                raise ConfigError(part, "not available in this version of netfilter")
            log.warning("%s: section present but not available in this version", part)
    chosen = [p for p in chosen if p in AVAILABLE]
    if not chosen:
        raise ConfigError("serve", "nothing to serve: add a dns section to the config")
    return chosen


async def _run(settings: Settings, parts: list[str], engine: Engine) -> None:
    from netfilter.dns.server import DnsServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, engine.reload))
    servers = []
    if "dns" in parts:
        assert settings.dns is not None
        dns = DnsServer(engine, settings.dns)
        await dns.start()
        servers.append(dns)
    log.info("netfilter: serving %s", ", ".join(parts))
    try:
        await stop.wait()
    finally:
        for server in servers:
            await server.stop()


def serve(settings: Settings, parts: Sequence[str] = ()) -> int:
    chosen = _selected(settings, parts)
    sink = event_sink(settings)
    engine = Engine(settings, sink)
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    runner(_run(settings, chosen, engine))
    if isinstance(sink, JsonLinesSink):
        sink.close()
    return 0
