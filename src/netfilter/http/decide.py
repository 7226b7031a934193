"""The one HTTP request decision: a Target and a path in, the engine's Verdict out.

mitmproxy, the Squid helper and ICAP all call `check_request` the same way, so a URL
is blocked (and recorded, by the engine) identically whichever proxy saw it. The host
stage comes first: where the engine says no URL on the target's hosts can match (the
host index), nothing is checked and nothing recorded. This is every request's path
through the proxy: keep it lean (benchmarks/README.md).
"""

from __future__ import annotations

from netfilter.engine import ALLOW, Engine, Verdict
from netfilter.http.target import Target

__all__ = ["check_request", "check_target_urls", "request_url_free"]


def request_url_free(engine: Engine, target: Target) -> bool:
    """No URL on this target can match under the lists in force (the host stage)."""
    return target.hosts is not None and engine.urls_free(target.hosts)


def check_request(engine: Engine, target: Target, path: str, *, frontend: str,
                  client: str | None, method: str) -> Verdict:
    """The verdict for a request to `target` with request-target `path` (origin form,
    with query): the host stage, then `check_target_urls`. Raises InvalidURL for a URL
    with no host."""
    if target.hosts is not None and engine.urls_free(target.hosts):
        return ALLOW
    return check_target_urls(engine, target, path, frontend=frontend, client=client,
                             method=method)


def check_target_urls(engine: Engine, target: Target, path: str, *, frontend: str,
                      client: str | None, method: str) -> Verdict:
    """The URL check after the host stage (a front-end that ran the stage inline, on
    its hot path, calls this). Both the asked origin and, when it differs, the dialled
    one are checked: a block on either blocks."""
    if not path.startswith("/"):
        path = f"/{path}"
    verdict = engine.check_url(target.asked + path, frontend=frontend, client=client,
                               detail=method)
    if not verdict.blocked and target.dialled is not None:
        # The address the proxy would connect to, when it differs from the
        # Host/authority (absolute-form or transparent requests).
        verdict = engine.check_url(target.dialled + path, frontend=frontend,
                                   client=client, detail=method)
    return verdict
