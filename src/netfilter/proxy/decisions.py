"""The host decisions the proxy uses, kept under their old name: they live in
`netfilter.http.hosts`, shared with the Squid helper and the ICAP server."""

from netfilter.http.hosts import (
    HostDecision,
    InterceptMode,
    TlsAction,
    combine,
    decide_host,
    intercept_mode,
)

__all__ = ["HostDecision", "InterceptMode", "TlsAction", "combine", "decide_host",
           "intercept_mode"]
