"""One HTTP decision for every HTTP front-end: mitmproxy, the Squid helper and ICAP.

Request parts in (target.py), the host stage and URL check through the engine
(decide.py, hosts.py for CONNECT and TLS names), the 451 stop page or short text out
(reply.py). The engine does all canonicalization and records every block; front-ends
only translate into their protocol. No mitmproxy here.
"""

from netfilter.http.decide import check_request, check_target_urls, request_url_free
from netfilter.http.hosts import (
    HostDecision,
    InterceptMode,
    TlsAction,
    combine,
    decide_host,
    intercept_mode,
)
from netfilter.http.reply import REASONS, Reply, refusal_text, stop_reply
from netfilter.http.target import (
    DEFAULT_PORTS,
    Target,
    TargetCache,
    make_target,
    normalize_host,
    origin,
    split_authority,
)

__all__ = [
    "DEFAULT_PORTS",
    "REASONS",
    "HostDecision",
    "InterceptMode",
    "Reply",
    "Target",
    "TargetCache",
    "TlsAction",
    "check_request",
    "check_target_urls",
    "combine",
    "decide_host",
    "intercept_mode",
    "make_target",
    "normalize_host",
    "origin",
    "refusal_text",
    "request_url_free",
    "split_authority",
    "stop_reply",
]
