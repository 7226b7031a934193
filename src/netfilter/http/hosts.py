"""What an HTTP front-end does with a connection decided by host name (CONNECT, SNI).

Shared by mitmproxy (CONNECT, TLS ClientHello), the Squid helper and ICAP (CONNECT).
Three outcomes, from the engine's answers only:

- BLOCK: a domain-level entry blocks the host. With interception enabled the proxy
  terminates TLS itself and serves the stop page (the upstream is never contacted);
  without it the CONNECT is answered 451 (a browser shows its own error for a failed
  tunnel, not the page), or a CONNECT-less (transparent) connection is closed.
- INTERCEPT: the host carries URL-level entries (it is in the host index) and
  `intercept` is `selective`, or `intercept` is `all`: TLS is terminated and every
  request's full URL is checked.
- PASS: anything else. The TLS bytes are relayed untouched, never decrypted.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from netfilter.config import ProxySettings
from netfilter.engine import Action, Engine, Verdict

__all__ = ["HostDecision", "InterceptMode", "TlsAction", "combine", "decide_host",
           "intercept_mode"]

InterceptMode = Literal["none", "selective", "all"]


class TlsAction(StrEnum):
    BLOCK = "block"
    INTERCEPT = "intercept"
    PASS = "pass"


_ALLOW = Verdict(Action.ALLOW)
_RANK = {TlsAction.BLOCK: 2, TlsAction.INTERCEPT: 1, TlsAction.PASS: 0}


@dataclass(frozen=True, slots=True)
class HostDecision:
    """The action for one host name; `verdict` is the engine's (blocking for BLOCK)."""

    host: str
    action: TlsAction
    verdict: Verdict = _ALLOW


def intercept_mode(proxy: ProxySettings) -> InterceptMode:
    """The `intercept` in force: as configured; when not written in the file,
    `selective` if a CA is configured (`proxy.confdir`), else `none`.

    An explicit `selective`/`all` without `confdir` uses mitmproxy's own CA (its
    `confdir` option, ~/.mitmproxy by default): the clients must trust that one.
    """
    if "intercept" in proxy.model_fields_set:
        return proxy.intercept
    return "selective" if proxy.confdir is not None else "none"


def decide_host(engine: Engine, host: str, mode: InterceptMode, *,
                client: str | None, detail: str, frontend: str = "proxy") -> HostDecision:
    """BLOCK / INTERCEPT / PASS for one name; a block is recorded by the engine."""
    verdict = engine.check_host(host, frontend=frontend, client=client, detail=detail)
    if verdict.blocked:
        return HostDecision(host, TlsAction.BLOCK, verdict)
    if mode == "all" or (mode == "selective" and engine.host_has_url_entries(host)):
        return HostDecision(host, TlsAction.INTERCEPT, verdict)
    return HostDecision(host, TlsAction.PASS, verdict)


def combine(first: HostDecision, second: HostDecision) -> HostDecision:
    """Two names for one connection (CONNECT and SNI): the stricter decision wins."""
    return second if _RANK[second.action] > _RANK[first.action] else first
