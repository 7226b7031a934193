"""The proxy front-end: mitmproxy addon logic over the engine.

`addons/netfilter_proxy.py` only wires `NetfilterAddon` into mitmdump. The decisions are
netfilter.http's (shared with the Squid helper and ICAP; decisions.py re-exports the
host ones); here: the hooks (addon.py), what a config yields (runtime.py), destination
rules (destinations.py) and answers (replies.py).

mitmproxy is the optional `proxy` extra: the addon's names are imported on first use
(module `__getattr__`), so `netfilter serve dns` in an install without it can import
`netfilter.proxy.process` and the decision code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from netfilter.proxy.decisions import (
    HostDecision,
    InterceptMode,
    TlsAction,
    combine,
    decide_host,
    intercept_mode,
)
from netfilter.proxy.destinations import (
    DestinationPolicy,
    Routes,
    normalize_host,
    parse_destination,
    parse_route,
)

if TYPE_CHECKING:
    from netfilter.proxy.addon import ConnState, NetfilterAddon, Runtime, build_runtime

__all__ = [
    "ConnState",
    "DestinationPolicy",
    "HostDecision",
    "InterceptMode",
    "NetfilterAddon",
    "Routes",
    "Runtime",
    "TlsAction",
    "build_runtime",
    "combine",
    "decide_host",
    "intercept_mode",
    "normalize_host",
    "parse_destination",
    "parse_route",
]

_NEED_MITMPROXY = frozenset({"ConnState", "NetfilterAddon", "Runtime", "build_runtime"})


def __getattr__(name: str) -> Any:
    """The addon's names, imported (with mitmproxy) only when asked for."""
    if name in _NEED_MITMPROXY:
        return getattr(importlib.import_module("netfilter.proxy.addon"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
