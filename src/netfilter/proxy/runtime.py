"""What one netfilter config file yields for the mitmproxy addon: engine, stop page
renderer, destination policy, interception mode; built whole or not at all, replaced
whole on a config change. No mitmproxy here (the addon's hooks live in addon.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from netfilter.config import ProxySettings, Settings, StoppageSettings, load_config
from netfilter.engine import Engine
from netfilter.errors import ConfigError, NetfilterError
from netfilter.http import InterceptMode, intercept_mode
from netfilter.node import make_engine
from netfilter.proxy.destinations import DestinationPolicy
from netfilter.stoppage import Renderer
from netfilter.stoppage.render import blocked_by_url

__all__ = ["FileStamp", "Runtime", "build_runtime", "file_stamps", "keep_restart_only"]

log = logging.getLogger("netfilter.proxy.addon")  # the addon's lines, as before the split


FileStamp = tuple[str, int, int] | tuple[str, None, None]


@dataclass(frozen=True)
class Runtime:
    """Everything one config file yields; replaced as a whole on a config change."""

    path: str
    settings: Settings
    engine: Engine
    renderer: Renderer
    policy: DestinationPolicy
    mode: InterceptMode
    confdir: Path | None  # the CA directory from proxy.confdir (resolved), if any
    stamps: tuple[FileStamp, ...] = ()

    def close(self) -> None:
        self.engine.close()  # aggregated counts, queued events, a last checkpoint


def _stamp(path: Path) -> FileStamp:
    try:
        st = path.stat()
    except OSError:
        return (str(path), None, None)
    return (str(path), st.st_mtime_ns, st.st_size)


def file_stamps(path: str, settings: Settings) -> tuple[FileStamp, ...]:
    """The config file and every file the lists come from, to tell if one changed."""
    files = [Path(path)]
    for item in settings.lists:
        files.append(settings.resolve(item.path))
        files.extend(settings.resolve(k) for k in item.trust)
        if item.hmac_key is not None:
            files.append(settings.resolve(item.hmac_key))
    for local in (settings.local.block, settings.local.allow):
        if local is not None:
            files.append(settings.resolve(local))
    return tuple(_stamp(f) for f in files)


def build_runtime(path: str, settings: Settings | None = None) -> Runtime:
    """Load `path` and build engine, renderer and policies; NetfilterError on any
    problem (naming the file and key), nothing half-built."""
    if settings is None:
        settings = load_config(path)
    proxy = settings.proxy or ProxySettings()
    try:
        policy = DestinationPolicy.parse(proxy.allowed_destinations)
    except ValueError as e:
        raise ConfigError(f"{path}: proxy.allowed_destinations", str(e)) from e
    renderer = Renderer(settings.stoppage or StoppageSettings(), base=settings.base,
                        blocked_by=blocked_by_url(settings))  # RFC 7725 Link, always
    try:
        engine = make_engine(settings)
    except NetfilterError:
        raise
    except Exception as e:  # a store or key file the OS refuses: one clear line
        raise ConfigError(path, f"cannot start the engine: {e}") from e
    confdir = settings.resolve(proxy.confdir) if proxy.confdir is not None else None
    return Runtime(path, settings, engine, renderer, policy, intercept_mode(proxy), confdir,
                   file_stamps(path, settings))


def keep_restart_only(current: Settings, new: Settings) -> Settings:
    """The node and its audit log change only with a restart, as in `netfilter serve`:
    a reload keeps those in force (one log line each), so the proxy never writes to
    another log than the process that started it."""
    for key in ("node", "audit"):
        if getattr(new, key) != getattr(current, key):
            log.warning("netfilter: config reload: %s changed; a restart is needed for it, "
                        "the old value stays", key)
    return new.model_copy(update={"node": current.node, "audit": current.audit})
