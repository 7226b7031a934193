"""The Squid external ACL helper: each lookup decided by the one HTTP decision.

squid.conf (examples/squid/netfilter-helper.conf, annotated):

    external_acl_type netfilter concurrency=100 children-max=2 ttl=0 negative_ttl=30 \\
        %>a %>rm %>ru /usr/bin/python3 addons/netfilter_squid.py --config FILE
    acl netfilter_blocked external netfilter
    http_access deny netfilter_blocked
    deny_info 307:http://STOP-PAGE-ADDRESS/ netfilter_blocked

OK means blocked (the engine has recorded the block, frontend `squid`), ERR allowed.
A CONNECT is decided by its host (a domain-level entry refuses the tunnel: Squid
cannot show a page inside TLS it does not terminate); every other request by its URL,
through `netfilter.http` as mitmproxy's and ICAP's are. `ttl=0` keeps Squid from
answering repeated blocks from its cache (each is recorded); `negative_ttl` lets it
cache clean answers (a list change reaches them after that many seconds).

The gate (`--gate`) answers another question, for `adaptation_access`: may a URL on
this host be blocked (OK: send the request to the ICAP server) or is the host clean
for every URL under the lists in force (ERR: Squid forwards it without asking)? It is
the host stage of the one decision (`request_url_free`: the host index, domain-level
entries), so it works on hashed lists, whose hosts no squid.conf can name. It records
nothing (the ICAP server decides and records) and, failing, answers OK: a request it
cannot judge is asked, never passed unchecked. Squid caches its answers per host
(`ttl`, `negative_ttl`): a list change reaches a clean host after `negative_ttl`.

    external_acl_type netfilter_gate concurrency=100 children-max=1 ttl=60 \\
        negative_ttl=60 %>rd /usr/bin/python3 addons/netfilter_squid.py --config FILE --gate
    acl netfilter_maybe external netfilter_gate
    adaptation_access netfilter_req allow netfilter_maybe

Bounded: a line longer than MAX_LINE, a malformed line or a failing check is answered
BH (Squid then logs it and treats the ACL as not matching; the gate answers OK); the
helper never exits for bad input. SIGHUP reloads the lists (between two lookups).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import BinaryIO

from netfilter import InvalidURL
from netfilter.config import load_config
from netfilter.engine import Engine, Verdict
from netfilter.errors import NetfilterError
from netfilter.http import (
    DEFAULT_PORTS,
    TargetCache,
    TlsAction,
    check_request,
    decide_host,
    make_target,
    normalize_host,
    request_url_free,
    split_authority,
)
from netfilter.node import make_engine
from netfilter.squid.protocol import (
    MAX_LINE,
    GateLookup,
    Lookup,
    answer,
    parse_gate,
    parse_lookup,
)

__all__ = ["SquidHelper", "main"]

log = logging.getLogger(__name__)

FRONTEND = "squid"


def _blocked(channel: str, verdict: Verdict) -> bytes:
    match = verdict.match
    list_id = match.list_id if match else "?"
    ref = match.ref if match else "?"
    return answer(channel, "OK", message=f"netfilter: blocked (list {list_id}, entry {ref})",
                  log=f"netfilter list={list_id} ref={ref}")


class SquidHelper:
    """Answers lookups through one engine (`gate`: the host-stage questions);
    `lookup` never raises."""

    def __init__(self, engine: Engine, *, gate: bool = False) -> None:
        self.engine = engine
        self.gate = gate
        self._targets = TargetCache()
        self.reload_wanted = False

    def lookup(self, line: bytes) -> bytes:
        """The response line for one request line (with or without its newline)."""
        channel = None
        try:
            text = line.decode("utf-8", "surrogateescape").strip()
            fields = text.split(maxsplit=1)
            if fields and fields[0].isdigit() and len(fields[0]) < 10:
                channel = fields[0]
            if self.gate:
                return self._gate(parse_gate(text))
            return self._decide(parse_lookup(text))
        except (ValueError, InvalidURL) as e:
            return answer(channel, "OK" if self.gate else "BH",
                          message=f"netfilter: {e.args[0] if e.args else e}")
        except Exception as e:  # never take Squid's helper down: say why, go on
            log.exception("squid helper: lookup failed")
            return answer(channel, "OK" if self.gate else "BH",
                          message=f"netfilter: internal error ({type(e).__name__})")

    def _gate(self, q: GateLookup) -> bytes:
        """OK: a URL on this host may be blocked (ask ICAP); ERR: none can be."""
        target = self._targets.get(q.host)
        if target is None:
            host, _port = split_authority(q.host)
            target = self._targets.put(q.host, make_target("http", None, host, 80,
                                                           allowed=True))
        return answer(q.channel, "ERR" if request_url_free(self.engine, target) else "OK")

    def _decide(self, q: Lookup) -> bytes:
        if q.method == "CONNECT":
            host, _port = split_authority(q.url)
            decision = decide_host(self.engine, normalize_host(host), "none", client=q.client,
                                   detail="CONNECT", frontend=FRONTEND)
            if decision.action is TlsAction.BLOCK:
                return _blocked(q.channel, decision.verdict)
            return answer(q.channel, "ERR")
        scheme, sep, rest = q.url.partition("://")
        if not sep or not scheme.isascii() or not scheme.isalpha():
            raise ValueError("not an absolute http(s) URL", q.channel)
        scheme = scheme.lower()
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, path = rest[:cut], rest[cut:]
        target = self._targets.get((scheme, authority))
        if target is None:
            host, port = split_authority(authority)
            target = self._targets.put((scheme, authority), make_target(
                scheme, None, host, port or DEFAULT_PORTS.get(scheme, 80), allowed=True))
        verdict = check_request(self.engine, target, path, frontend=FRONTEND,
                                client=q.client, method=q.method)
        return _blocked(q.channel, verdict) if verdict.blocked else answer(q.channel, "ERR")

    def reload(self) -> None:
        """The lists again (a refused bundle leaves those in force)."""
        self.reload_wanted = False
        if self.engine.reload():
            self._targets.clear()
            log.info("squid helper: lists reloaded (%d entries)", len(self.engine.lists))

    def serve(self, stdin: BinaryIO, stdout: BinaryIO) -> None:
        """Until Squid closes stdin: one answer per line, each flushed at once."""
        while True:
            line = stdin.readline(MAX_LINE + 1)
            if not line:
                return
            if self.reload_wanted:
                self.reload()
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                while True:  # the rest of the long line, in bounded pieces
                    more = stdin.readline(MAX_LINE)
                    if not more or more.endswith(b"\n"):
                        break
                head = line.split(maxsplit=1)
                channel = head[0].decode("ascii") if head and head[0].isdigit() else None
                stdout.write(answer(channel, "OK" if self.gate else "BH",
                                    message="netfilter: line too long"))
            else:
                stdout.write(self.lookup(line))
            stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """`netfilter_squid.py --config FILE`: serve Squid on stdin/stdout."""
    parser = argparse.ArgumentParser(prog="netfilter_squid.py",
                                     description="netfilter's Squid external ACL helper")
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="the netfilter YAML config (lists, audit)")
    parser.add_argument("--gate", action="store_true",
                        help="answer for adaptation_access (FORMAT %%>rd): OK when a URL "
                             "on the host may be blocked, ERR when none can be")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="netfilter squid helper: %(levelname)s %(message)s")
    try:
        engine = make_engine(load_config(args.config))
    except NetfilterError as e:
        print(f"netfilter squid helper: {e}", file=sys.stderr)
        return 1
    helper = SquidHelper(engine, gate=args.gate)

    def wanted(_signum: int, _frame: object) -> None:
        helper.reload_wanted = True

    signal.signal(signal.SIGHUP, wanted)
    try:
        helper.serve(sys.stdin.buffer, sys.stdout.buffer)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        engine.close()
    return 0
