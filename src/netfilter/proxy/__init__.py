"""The proxy front-end: mitmproxy addon logic over the engine.

`addons/netfilter_proxy.py` only wires `NetfilterAddon` into mitmdump; the decisions
(decisions.py), destination rules (destinations.py) and answers (replies.py) live here.
"""

from netfilter.proxy.addon import ConnState, NetfilterAddon, Runtime, build_runtime
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
