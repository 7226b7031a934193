"""The mitmproxy addon: one class, one hook set over the engine.

Start:  mitmdump -s addons/netfilter_proxy.py --set netfilter_config=netfilter.yaml
(regular mode, or `--mode transparent`). The addon sets `connection_strategy=lazy`
itself, so mitmproxy opens an upstream connection only for a request it forwards.

Per connection and request, in hook order:

- `http_connect` (regular mode): the CONNECT host is decided (decisions.py). A
  domain-level block without interception is answered 451 (a browser then shows its
  own tunnel error, not the page: it never displays a CONNECT answer); with
  interception the tunnel is accepted and the stop page is served inside TLS. A
  destination outside `proxy.allowed_destinations` is answered 403.
- `tls_clienthello`: the SNI is decided too (a block on either name blocks; an SNI
  other than the CONNECT host is logged). PASS sets `ignore_connection`: the TLS is
  relayed untouched and never decrypted.
- `requestheaders`: every HTTP request, plain or decrypted. On a decrypted connection
  the request's own authority is compared with the connection's name first (HTTP/2
  reuses a connection for other names): a name that needs another decision gets 421
  Misdirected Request, so the browser opens a connection of its own for it. Then the
  URL is checked; a block gets the 451 stop page.
- `request` (only while `netfilter_resolve` has routes: mitmproxy calls every hook
  an addon has on every request): the routes for HTTP requests (the address mitmproxy
  dials; Host header and upstream SNI keep the name), before mitmproxy picks the
  upstream connection, so keep-alive connections are found again.
- `server_connect`: the last guard before any upstream connection: nothing is opened
  for a blocked connection or outside `proxy.allowed_destinations` (and routes are
  applied here to tunnels, whose TLS is passed through).

The engine records every block (frontend `proxy`): each blocked request, each refused
CONNECT or TLS connection, and once for an intercepted domain-blocked connection
(its stop pages are not recorded again). Lists reload without a restart and without
failing requests in flight: on SIGHUP, with the `netfilter.reload` command, or when
`netfilter_config` is set again (then only if a file changed); the engine swaps its
lists atomically, and a refused bundle leaves the lists in force.

Fail closed: a bad config at startup is an OptionsError and mitmdump exits; a bad
config set later is refused and the one in force stays; an addon without a config
answers every request 503 and connects nowhere.

Limits: with `intercept: none` (the default without `proxy.confdir`) URL-level
entries are enforced for plain HTTP only, HTTPS hosts are checked by name. In
transparent mode block UDP 443 at the gateway, so browsers do not use QUIC (HTTP/3),
which this proxy does not see. Leave `ignore_hosts`/`allow_hosts` empty: connections
they exempt skip the TLS check.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mitmproxy import command, connection, ctx, exceptions, http, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import server_hooks
from mitmproxy.utils import human

from netfilter import InvalidURL
from netfilter.childmetrics import export_from_environment
from netfilter.config import ProxySettings, load_config
from netfilter.engine import Verdict
from netfilter.errors import NetfilterError
from netfilter.http import (
    HostDecision,
    Target,
    TlsAction,
    check_target_urls,
    combine,
    decide_host,
    make_target,
    normalize_host,
)
from netfilter.proxy import early
from netfilter.proxy.counters import ProxyCounters, verdict_of
from netfilter.proxy.destinations import Routes
from netfilter.proxy.replies import refusal, stop_page
from netfilter.proxy.runtime import Runtime, build_runtime, file_stamps, keep_restart_only

__all__ = ["ConnState", "NetfilterAddon", "Runtime", "Target", "build_runtime", "make_target"]

log = logging.getLogger(__name__)

OPTION = "netfilter_config"
RESOLVE_OPTION = "netfilter_resolve"
NOT_CONFIGURED = ("netfilter: the filter is not configured (netfilter_config); "
                  "the proxy refuses all traffic until it is")


@dataclass
class ConnState:
    """What was decided for one client connection (CONNECT and/or TLS)."""

    connect_host: str | None = None
    host: str | None = None  # the name the connection is for: SNI, else CONNECT host
    decision: HostDecision | None = None
    intercepted: bool = False  # TLS terminated by the proxy
    refused: bool = False  # blocked, not interceptable: never connect, close
    sni_mismatch: str | None = None  # an SNI other than the CONNECT host
    # netfilter_resolve applied by `request`: (address, port) -> the name routed there
    routed: dict[tuple[str, int], str] = field(default_factory=dict)

    @property
    def sees_requests_for(self) -> TlsAction | None:
        """The connection-level action when its requests pass through the addon."""
        if self.decision is None or self.decision.action is TlsAction.PASS:
            return None
        return self.decision.action


_keep_restart_only = keep_restart_only  # the name tests and older callers use


def _client_ip(client: connection.Client) -> str | None:
    peer = client.peername
    return str(peer[0]) if peer else None


# What a Target is computed from, as mitmproxy holds it: scheme, HTTP version, the
# :authority (HTTP/2 and 3 take it before Host), the Host field, dialled host and port.
TargetKey = tuple[bytes, bytes, bytes, bytes | None, str, int]
TARGET_CACHE_SIZE = 4096  # entries; cleared wholesale when full


# mitmproxy tags each connection's records with the client's (address, port), printed
# as "[127.0.0.1:54321]", and logs every connect and disconnect at info level.
_TAGGING_LOGGERS = ("mitmproxy.proxy.server", "mitmproxy.proxy.layers.http._http_h2",
                    __name__)
_CONNECTION_LINES = frozenset({"client connect", "client disconnect"})
# said once per kind and interval by the addon's origin fault line instead
_ORIGIN_FAULT_LINE = "error establishing server connection: "


class ClientLogFilter(logging.Filter):
    """Keeps clients out of the proxy's log unless `audit.client` is `full`: the node's
    privacy setting holds for its logs too. mitmproxy's connect and disconnect lines
    are dropped; every other record (warnings and errors too) stays, without the client
    tag and with the client's address:port in its text written as "client"."""

    def __init__(self) -> None:
        super().__init__()
        self.addon: NetfilterAddon | None = None  # the loaded addon: its config decides

    def filter(self, record: logging.LogRecord) -> bool:
        peer = getattr(record, "client", None)
        if not peer:
            return True
        if isinstance(record.msg, str) and record.msg.startswith(_ORIGIN_FAULT_LINE):
            return False
        runtime = self.addon.runtime if self.addon is not None else None
        if runtime is not None and runtime.engine.clients.form == "full":
            return True
        if isinstance(record.msg, str) and record.msg in _CONNECTION_LINES:
            return False
        record.client = None
        address = human.format_address(peer)
        text = record.getMessage()
        if address in text:
            record.msg, record.args = text.replace(address, "client"), ()
        return True


_CLIENT_LOG = ClientLogFilter()  # one per process: a reloaded script re-points it


def _options_error(message: str) -> exceptions.OptionsError:
    """mitmproxy's error for a bad option value (its constructor is untyped)."""
    return exceptions.OptionsError(message)  # type: ignore[no-untyped-call]


def freeze_long_lived() -> None:
    """Exempt everything alive now (mitmproxy, the engine, the lists, the templates:
    nearly all of it long-lived) from the cyclic garbage collector, whose full
    collections under load otherwise walk all of it again and again (measured:
    benchmarks/README.md). Frozen objects freed later by reference counting are
    freed as usual; only cycles among them would stay.

    Each time (at start, and after each reload) it first unfreezes and collects. A
    reload's freeze also catches the flows and connections in flight then, and the
    old lists; cycles among them, once dead, would stay frozen for good (the soak
    measured ~0.3 MiB and an open file per update). A full collection costs ~50 ms
    on a loaded 2-core machine, once per list update."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _answer(flow: http.HTTPFlow, counters: ProxyCounters, response: http.Response) -> None:
    # Called from requestheaders (and what it calls). A request marked for
    # streaming (its Content-Length above `stream_large_bodies`, decided by mitmproxy
    # before requestheaders) cannot carry an addon's response: switched off, it is
    # never sent upstream. `early.mark`: with early.install() in force, a request
    # whose body is still to come is answered right after this hook, without its
    # body (see early.py); otherwise mitmproxy reads the body first, then answers.
    flow.request.stream = False
    flow.response = response
    early.mark(flow)
    counters.answered[verdict_of(response.status_code)] += 1


class NetfilterAddon:
    """Checks every HTTP request and decides every TLS connection through the engine."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.routes = Routes()
        # mitmproxy's `request` hook: None (no hook) until netfilter_resolve has routes
        self.request: Callable[[http.HTTPFlow], None] | None = None
        self.conns: dict[str, ConnState] = {}
        # a plain dict (not TargetCache): this look-up is every request's first step
        self._targets: dict[TargetKey, Target] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reloading: asyncio.Future[Runtime | None] | None = None
        self._reload_again = False  # a reload was asked for while one was running
        self.counters = ProxyCounters()

    # ------------------------------------------------------------ options

    def load(self, loader: Loader) -> None:
        early.install()  # blocked uploads answered without reading their body
        _CLIENT_LOG.addon = self
        for name in _TAGGING_LOGGERS:
            logging.getLogger(name).addFilter(_CLIENT_LOG)  # no-op when already there
        loader.add_option(
            OPTION, str, "",
            "The netfilter YAML config (lists, proxy, stoppage, audit). Required: "
            "without it the proxy refuses all traffic. Set it again to reload the "
            "lists (SIGHUP and the netfilter.reload command do too).",
        )
        loader.add_option(
            RESOLVE_OPTION, Sequence[str], [],
            "Connect to a fixed address for a name instead of resolving it: "
            "NAME=ADDRESS or *.SUFFIX=ADDRESS (for test rigs and labs whose names "
            "resolve nowhere). Host header, SNI and all checks keep the name.",
        )

    def configure(self, updated: set[str]) -> None:
        if RESOLVE_OPTION in updated:
            try:
                self.routes = Routes.parse(ctx.options.netfilter_resolve)
            except ValueError as e:
                raise _options_error(f"{RESOLVE_OPTION}: {e}") from None
            self.request = self._route_request if self.routes.routes else None
            self._targets.clear()
        if OPTION in updated:
            self._configure_config(ctx.options.netfilter_config)
            if self._loop is not None:  # set again while running: new lists, maybe
                freeze_long_lived()
        elif self.runtime is not None and updated & {"connection_strategy", "confdir",
                                                     "flow_detail"}:
            self._require_options(self.runtime)

    def _configure_config(self, path: str) -> None:
        if not path:
            if self.runtime is not None:
                log.warning("netfilter: %s unset; refusing all traffic", OPTION)
                self._install(None)
            return
        current = self.runtime
        try:
            settings = load_config(path)
            if current is not None and current.path == path and current.settings == settings:
                stamps = file_stamps(path, settings)
                if stamps != current.stamps:
                    log.info("netfilter: list files changed; reloading the lists")
                    current.engine.reload()
                    self.runtime = replace(current, stamps=stamps)
                return
            runtime = build_runtime(path, settings)
        except NetfilterError as e:
            # `from None`: the message names file, key and reason; a user's mistake
            # needs no chain of tracebacks (mitmdump prints the one it gets and, at
            # startup, exits).
            raise _options_error(f"{OPTION}: {e}") from None
        self._install(runtime)

    def _install(self, runtime: Runtime | None) -> None:
        old, self.runtime = self.runtime, runtime
        self._targets.clear()  # they hold the old policy's answers
        if runtime is not None:
            self._require_options(runtime)
            proxy = runtime.settings.proxy or ProxySettings()
            ca = runtime.confdir or Path(os.path.expanduser(ctx.options.confdir))
            log.info("netfilter: %d entries in force; intercept=%s (%s); "
                     "allowed destinations: %s", len(runtime.engine.lists), runtime.mode,
                     f"CA in {ca}" if runtime.mode != "none" else "no CA used", runtime.policy)
            if runtime.mode != "none" and proxy.confdir is None:
                log.warning("netfilter: intercept=%s without proxy.confdir uses "
                            "mitmproxy's CA in %s: clients must trust it",
                            runtime.mode, ca)
            if (not early.installed() and "stream_large_bodies" in ctx.options
                    and ctx.options.stream_large_bodies):
                log.warning("netfilter: with stream_large_bodies set, this mitmproxy logs "
                            "an internal error while it drains a blocked upload larger "
                            "than that (the stop page is still sent, nothing is forwarded)")
            if ctx.options.ignore_hosts or ctx.options.allow_hosts:
                log.warning("netfilter: ignore_hosts/allow_hosts let connections bypass "
                            "the TLS (SNI) check; leave them empty")
        if old is not None and old is not runtime:
            old.close()

    def _require_options(self, runtime: Runtime) -> None:
        # mitmdump's flow lines name each request's client (and URL): off unless the
        # operator records clients in full.
        form = runtime.engine.clients.form
        if "flow_detail" in ctx.options and ctx.options.flow_detail and form != "full":
            log.info("netfilter: setting flow_detail=0 (flow lines name clients; "
                     "audit.client is %s)", form)
            ctx.options.update(flow_detail=0)  # type: ignore[no-untyped-call]
        # The upstream must not be contacted before a request is decided: mitmproxy's
        # default `eager` strategy connects at CONNECT and before the TLS handshake.
        if "connection_strategy" in ctx.options and ctx.options.connection_strategy != "lazy":
            log.info("netfilter: setting connection_strategy=lazy")
            ctx.options.update(connection_strategy="lazy")  # type: ignore[no-untyped-call]
        if runtime.confdir is not None:
            wanted = str(runtime.confdir)
            if os.path.abspath(os.path.expanduser(ctx.options.confdir)) != os.path.abspath(
                    wanted):
                log.info("netfilter: using the CA in %s (proxy.confdir)", wanted)
                ctx.options.update(confdir=wanted)  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------ lifecycle

    def running(self) -> None:
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            self._loop.add_signal_handler(signal.SIGHUP, self.reload_lists)
        if self.runtime is None:
            log.error("%s", NOT_CONFIGURED)
        # the node's /metrics asks this process for its counters (under netfilter serve)
        export_from_environment(self.snapshot)
        freeze_long_lived()  # before any traffic: the pause costs nothing

    def done(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.remove_signal_handler(signal.SIGHUP)
        self._install(None)

    @command.command("netfilter.reload")  # type: ignore[untyped-decorator]
    def reload_lists(self) -> None:
        """Reload the lists (and the config file, if it changed), off the event loop."""
        loop = self._loop
        path = ctx.options.netfilter_config
        if loop is None:
            self._install(self._reload(path, self.runtime))
            return
        if self._reloading is not None and not self._reloading.done():
            # the files may have changed after that reload read them: one more follows
            self._reload_again = True
            return
        self._reloading = future = loop.run_in_executor(None, self._reload, path, self.runtime)

        def installed(f: asyncio.Future[Runtime | None]) -> None:
            if f.cancelled():
                return
            if f.exception() is not None:
                log.error("netfilter: reload failed: %s", f.exception())
            else:
                runtime = f.result()
                if runtime is not self.runtime and ctx.options.netfilter_config == path:
                    self._install(runtime)
                freeze_long_lived()  # the new lists; the old ones freed
            if self._reload_again:
                self._reload_again = False
                self.reload_lists()

        future.add_done_callback(installed)

    @staticmethod
    def _reload(path: str, current: Runtime | None) -> Runtime | None:
        """Runs in a worker thread: the engine swaps its lists atomically, so requests
        keep being checked against the old lists until the new ones are in."""
        if not path:
            log.error("%s", NOT_CONFIGURED)
            return current
        try:
            settings = load_config(path)
            if current is not None:
                settings = keep_restart_only(current.settings, settings)
            if current is not None and current.path == path and current.settings == settings:
                if current.engine.reload():
                    log.info("netfilter: lists reloaded (%d entries)",
                             len(current.engine.lists))
                return current
            runtime = build_runtime(path, settings)
        except NetfilterError as e:
            log.error("netfilter: reload refused, the config in force stays: %s", e)
            return current
        log.info("netfilter: config %s loaded anew", path)
        return runtime

    def snapshot(self) -> dict[str, object]:
        """The proxy's, its engine's and its audit log's counters (for /metrics)."""
        runtime = self.runtime
        return self.counters.snapshot(runtime.engine if runtime is not None else None)

    # ------------------------------------------------------------ hooks

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        """An upstream connection that could not be opened (ours refused by a guard
        in server_connect are not origin faults)."""
        server = data.server
        error = server.error or ""
        if error and not error.startswith("netfilter:") and server.address is not None:
            self.counters.origin_fault(human.format_address(server.address), error)

    def error(self, flow: http.HTTPFlow) -> None:
        """A request that failed after its origin connection was open (reset, closed,
        timed out); connect failures are counted by server_connect_error."""
        server = flow.server_conn
        if (flow.error is None or flow.response is not None or server.peername is None
                or server.address is None or server.timestamp_end is None):
            return
        self.counters.origin_fault(human.format_address(server.address), flow.error.msg)

    def client_disconnected(self, client: connection.Client) -> None:
        self.conns.pop(client.id, None)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        self.counters.other["connects"] += 1
        rt = self.runtime
        if rt is None:
            flow.response = refusal(503, NOT_CONFIGURED)
            return
        host = normalize_host(flow.request.host)
        decision = decide_host(rt.engine, host, rt.mode, client=_client_ip(flow.client_conn),
                               detail="CONNECT")
        if decision.action is TlsAction.BLOCK and rt.mode == "none":
            flow.response = stop_page(rt.renderer, decision.verdict, flow.request, host)
            return
        if decision.action is not TlsAction.BLOCK and not self._allowed(rt, host):
            log.info("netfilter: refused CONNECT to %s (not in allowed_destinations)", host)
            flow.response = refusal(403, f"netfilter: the proxy does not connect to {host} "
                                         "(not in proxy.allowed_destinations)")
            return
        self.conns[flow.client_conn.id] = ConnState(connect_host=host, host=host,
                                                    decision=decision)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        client = data.context.client
        rt = self.runtime
        state = self.conns.setdefault(client.id, ConnState())
        if rt is None:
            data.ignore_connection = True
            state.refused = True  # server_connect refuses: the client is disconnected
            return
        ip = _client_ip(client)
        sni = normalize_host(data.client_hello.sni) if data.client_hello.sni else None
        address = data.context.server.address
        if state.connect_host is not None and state.decision is not None:
            decision = state.decision
            if sni and sni != state.connect_host:
                log.warning("netfilter: TLS SNI %s differs from CONNECT %s", sni,
                            state.connect_host, extra={"client": client.peername})
                state.sni_mismatch = sni
                decision = combine(decision, decide_host(rt.engine, sni, rt.mode, client=ip,
                                                         detail="TLS"))
        else:  # no CONNECT (transparent mode): the SNI and the address dialled
            names = [n for n in (sni, normalize_host(address[0]) if address else None) if n]
            if not names:
                data.ignore_connection = True
                state.refused = True
                return
            decision = decide_host(rt.engine, names[0], rt.mode, client=ip, detail="TLS")
            for name in dict.fromkeys(names[1:]):
                if name != names[0]:
                    decision = combine(decision, decide_host(rt.engine, name, rt.mode,
                                                             client=ip, detail="TLS"))
        state.decision = decision
        state.host = sni or state.connect_host or decision.host
        self.counters.other[f"tls_{decision.action.name.lower()}"] += 1
        if decision.action is TlsAction.PASS:
            data.ignore_connection = True
        elif decision.action is TlsAction.BLOCK and rt.mode == "none":
            # Cannot show a page without decrypting: relay nothing and close (the
            # server_connect guard refuses the upstream connection).
            data.ignore_connection = True
            state.refused = True
        else:
            data.ignore_connection = False
            data.establish_server_tls_first = False
            state.intercepted = True

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        self._decide(flow)
        # from the first byte of the request to its decision (for a local answer, to
        # the answer): what netfilter adds to a request; the origin's time is not ours
        started = flow.request.timestamp_start
        if started:
            self.counters.latency.observe(time.time() - started)

    def _decide(self, flow: http.HTTPFlow) -> None:
        # Decided here, not in `request`: this hook runs once the headers are read,
        # before any of the body, so uploads to blocked URLs stay cheap. A response
        # set here is sent without an upstream connection ever being opened
        # (connection_strategy=lazy), and right away, before the body (early.py:
        # HTTP/1 then half-closes the connection, HTTP/2 resets the stream); the body
        # is never forwarded, buffered or looked at.
        # This runs for every request: keep it lean (benchmarks/README.md).
        self.counters.requests += 1
        rt = self.runtime
        if rt is None:
            _answer(flow, self.counters, refusal(503, NOT_CONFIGURED))
            return
        request = flow.request
        data = request.data
        # The raw Host fields, not request.host_header (which decodes and joins them:
        # most of this hook's time on clean traffic). More than one is refused (RFC 9112
        # 3.2: a server and an origin might each pick another).
        hosts = [value for name, value in data.headers.fields if name.lower() == b"host"]
        if len(hosts) > 1:
            _answer(flow, self.counters, refusal(400, "netfilter: more than one Host header"))
            return
        key = (data.scheme, data.http_version, data.authority, hosts[0] if hosts else None,
               data.host, data.port)
        target = self._targets.get(key)
        if target is None:
            target = self._target(rt, request, request.host_header)
            if len(self._targets) >= TARGET_CACHE_SIZE:
                self._targets.clear()
            self._targets[key] = target
        if self.conns:
            state = self.conns.get(flow.client_conn.id)
            if state is not None and self._misdirected(flow, rt, state, target.authority,
                                                       _client_ip(flow.client_conn)):
                return
        if target.hosts is None or not rt.engine.urls_free(target.hosts):
            # Only hosts some entry covers get here (most traffic does not): the URL
            # itself is checked, the one way every HTTP front-end checks it.
            try:
                verdict = check_target_urls(rt.engine, target, request.path,
                                            frontend="proxy",
                                            client=_client_ip(flow.client_conn),
                                            method=request.method)
            except InvalidURL as e:
                _answer(flow, self.counters,
                        refusal(400, f"netfilter: cannot check this request's URL ({e})"))
                return
            if verdict.blocked:
                self._stop(flow, rt, verdict, target.authority)
                return
        if not target.allowed:
            host = normalize_host(request.host)
            log.info("netfilter: refused a request to %s (not in allowed_destinations)", host)
            _answer(flow, self.counters, refusal(
                403, f"netfilter: the proxy does not connect to {host} "
                     "(not in proxy.allowed_destinations)"))

    def _misdirected(self, flow: http.HTTPFlow, rt: Runtime, state: ConnState,
                     authority: str, ip: str | None) -> bool:
        """On a decrypted connection: answer (and return True) a request whose
        authority needs another decision than its connection's (421), or that the
        connection's or its own domain-level block stops."""
        action = state.sees_requests_for
        if state.decision is None or action is None:
            return False
        if authority != state.host:
            other = decide_host(rt.engine, authority, rt.mode, client=ip,
                                detail=flow.request.method)
            if other.action is not action:
                _answer(flow, self.counters, refusal(
                    421, f"netfilter: this connection is for {state.host}; use a new "
                         f"connection for {authority}"))
                return True
            if other.action is TlsAction.BLOCK:
                self._stop(flow, rt, other.verdict, authority)
                return True
        elif action is TlsAction.BLOCK:
            self._stop(flow, rt, state.decision.verdict, authority)
            return True
        return False

    def _route_request(self, flow: http.HTTPFlow) -> None:
        # The `request` hook, installed only while netfilter_resolve has routes
        # (mitmproxy calls every hook an addon has on every request).
        # netfilter_resolve for HTTP: mitmproxy picks (or opens) the upstream
        # connection by the request's host and port right after this hook, so the
        # route is applied here, to the address only (the Host header stays), and
        # mitmproxy finds its keep-alive connection to that address again. (Rewritten
        # later, in server_connect, it never would: one new connection per request,
        # and the 6th on a keep-alive client connection waits forever for one of 5.)
        if flow.response or flow.error or not flow.live:
            return
        request = flow.request
        route = self.routes.lookup(request.host)
        if route is None:
            return
        state = self.conns.setdefault(flow.client_conn.id, ConnState())
        # server_connect lets this address through and keeps the name as the SNI
        state.routed[(route, request.port)] = normalize_host(request.host)
        request.data.host = route

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if server.error or server.address is None:
            return
        host, port = str(server.address[0]), int(server.address[1])
        rt = self.runtime
        if rt is None:
            server.error = "netfilter: not configured, not connecting"
            return
        state = self.conns.get(data.client.id)
        if state is not None and (state.refused or (
                state.decision is not None and state.decision.action is TlsAction.BLOCK)):
            server.error = f"netfilter: {normalize_host(host)} is blocked, not connecting"
            return
        name = state.routed.get((host, port)) if state is not None else None
        if name is not None:  # routed by `request`: the name was decided and allowed
            if server.sni == host:
                server.sni = name  # mitmproxy took the SNI from the address
            return
        if not self._allowed(rt, host):
            server.error = (f"netfilter: {normalize_host(host)} is not in "
                            "proxy.allowed_destinations, not connecting")
            return
        route = self.routes.lookup(host)
        if route is not None:  # a tunnel (TLS passed through): one connection, no reuse
            server.address = (route, port)

    # ------------------------------------------------------------ helpers

    def _target(self, rt: Runtime, request: http.Request, header: str | None) -> Target:
        return make_target(request.scheme or "http", header, request.host, request.port,
                           self._allowed(rt, request.host))

    def _allowed(self, rt: Runtime, host: str) -> bool:
        if rt.policy.allows(host):
            return True
        route = self.routes.lookup(host)
        return route is not None and rt.policy.allows(route)

    def _stop(self, flow: http.HTTPFlow, rt: Runtime, verdict: Verdict, host: str) -> None:
        flow.metadata["netfilter"] = {"blocked": True,
                                      "ref": verdict.match.ref if verdict.match else None}
        _answer(flow, self.counters, stop_page(rt.renderer, verdict, flow.request, host))
