"""Answer a blocked request as soon as its headers are read, without its body.

Why: in mitmproxy 11 a response that an addon sets in `requestheaders` is sent only
once the whole request body has arrived. So a blocked upload was read into memory to
the last byte before the client got its 451 (over a slow uplink, minutes), and with
`stream_large_bodies` mitmproxy logged an internal error ("Can't set a response and
enable streaming at the same time") each time the buffered body passed that size.

mitmproxy has no hook for "answer now", so this module gives its HTTP layer a stream
class with one method more: right after the `requestheaders` hook, a flow the addon
marked (`mark(flow)`, set together with its response) whose request body is still to
come is answered there and then:

- the `responseheaders` and `response` hooks run as for any answer set by an addon
  (mitmproxy does the same for a response set in `request`);
- HTTP/1: the answer carries `Connection: close` and is followed by a lingering close
  (below); nothing of the body is buffered or forwarded, and no `100 Continue` is sent,
  so a client waiting for one never sends the body at all;
- HTTP/2: the answer ends the stream, then RST_STREAM (CANCEL) tells the client to
  stop sending this request's body; the connection and its other streams go on.

The lingering close (RFC 9112 section 9.6; Apache and nginx do the same): the proxy
half-closes the connection (FIN) after the answer, then reads and discards what the
client still sends until the client closes, for at most LINGER_SECONDS and
LINGER_BYTES, and only then closes. Closing at once would leave the upload that is
already on its way unread, and the kernel answers a close over unread data with a
reset (RST), which clients see before they have read the 451 (curl: "Send failure").
The bounds keep a client from holding the connection, or the proxy's CPU, for longer.
Over HTTPS the connection belongs to the CONNECT request's stream (mitmproxy turns
every close from inside a tunnel into a full close), so the blocked request's stream
hands the lingering close to it (`_TunnelLinger`), which then discards the client's
TLS records undecrypted.

Requests without a body, and flows nobody marked, take mitmproxy's own path. The
class is installed only on the mitmproxy it was written against (11.x, with the
methods it relies on); elsewhere `install()` returns False and mitmproxy's own
behaviour (read the body, then answer) stays.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mitmproxy import http
from mitmproxy import version as mitmproxy_version
from mitmproxy.net.http import status_codes
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import http as layers_http
from mitmproxy.proxy.layers.http import DropStream, HttpStream, SendHttp
from mitmproxy.proxy.layers.http._events import (
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook, HttpResponseHook

__all__ = ["LINGER_BYTES", "LINGER_SECONDS", "EarlyAnswerStream", "install", "installed",
           "mark"]

log = logging.getLogger(__name__)

LINGER_SECONDS = 2.0
"""The longest a lingering close reads before it closes (Apache waits 2 s as well)."""
LINGER_BYTES = 64 << 20
"""The most a lingering close reads before it closes: more than a client can have on its
way when the answer reaches it, which is what the sockets of both ends buffer (Linux
grows them to tcp_wmem and tcp_rmem's maxima: 4 and 6 MiB by default, often raised to
32 MiB). Discarding that much costs the proxy 30 to 60 ms of CPU (on loopback)."""

_KEY = "netfilter_answer_now"
_ORIGINAL = HttpStream
_NEEDS = ("check_killed", "state_wait_for_request_headers", "state_errored", "client_state",
          "passthrough")


def mark(flow: http.HTTPFlow) -> None:
    """Ask for the flow's response (set in requestheaders) to be sent before its body."""
    flow.metadata[_KEY] = True


class _TunnelLinger(commands.Command):
    """From a stream inside a CONNECT tunnel to the tunnel's stream: close the client's
    connection, lingering, after what was sent. Not a ConnectionCommand, so the layers
    in between (TLS, HTTP) pass it on untouched."""


class _Linger:
    """A lingering close under way: its deadline and what it has discarded."""

    __slots__ = ("discarded", "over", "started", "timer", "tunnel")

    def __init__(self, tunnel: bool) -> None:
        self.tunnel = tunnel  # a CONNECT tunnel's stream (else a blocked request's)
        self.timer = commands.RequestWakeup(LINGER_SECONDS)
        self.started = time.monotonic()
        self.discarded = 0
        self.over = False


class EarlyAnswerStream(HttpStream):
    """mitmproxy's HttpStream, answering marked flows right after requestheaders."""

    _body_pending = False
    # Set once this stream closes the client's connection lingering (and kept after it
    # is over): a blocked request's stream over plain HTTP/1, or a CONNECT tunnel's.
    # From then on its events go to _lingering (`_handle_event`, as mitmproxy itself
    # switches a tunnel's stream to `passthrough`).
    _linger: _Linger | None = None

    # The overrides return the parent's generator itself (no generator of their own
    # wrapping it): they run for every request, check_killed several times. Only a
    # tunnel's passthrough is wrapped: it watches for _TunnelLinger.

    def state_wait_for_request_headers(
            self, event: RequestHeaders) -> layer.CommandGenerator[None]:
        self._body_pending = not event.end_stream
        parent: layer.CommandGenerator[None] = super().state_wait_for_request_headers(event)
        return parent  # (the parent is decorated, so untyped)

    def check_killed(self, emit_error_hook: bool) -> layer.CommandGenerator[bool]:
        # mitmproxy calls this right after the requestheaders hook (client_state is
        # still the headers state then; a CONNECT has moved on to state_done).
        flow = self.flow
        if (self._body_pending and flow.response is not None and flow.metadata.get(_KEY)
                and not flow.error
                and self.client_state == self.state_wait_for_request_headers):
            return self._answered_now()
        return super().check_killed(emit_error_hook)

    def passthrough(self, event: events.Event) -> layer.CommandGenerator[None]:
        # A CONNECT tunnel's stream (mitmproxy sets `_handle_event = self.passthrough`).
        for command in super().passthrough(event):
            if isinstance(command, _TunnelLinger):
                yield from self._close_tunnel()
            else:
                yield command

    def _answered_now(self) -> layer.CommandGenerator[bool]:
        yield from self._answer_now()
        return True

    def _answer_now(self) -> layer.CommandGenerator[None]:
        flow = self.flow
        response = flow.response
        assert response is not None
        http1 = not (flow.request.is_http2 or flow.request.is_http3)
        if http1:
            response.headers["connection"] = "close"
        response.timestamp_start = time.time()
        yield HttpResponseHeadersHook(flow)
        response.timestamp_end = time.time()
        yield HttpResponseHook(flow)
        response = flow.response  # a later addon may have replaced it
        assert response is not None
        client = self.context.client
        content = response.raw_content
        yield SendHttp(ResponseHeaders(self.stream_id, response, not content), client)
        if content:
            yield SendHttp(ResponseData(self.stream_id, content), client)
        yield SendHttp(ResponseEndOfMessage(self.stream_id), client)
        flow.live = False
        self.client_state = self.server_state = self.state_errored
        if not http1:  # 499 is what mitmproxy maps to RST_STREAM CANCEL
            yield SendHttp(ResponseProtocolError(
                self.stream_id, "netfilter: answered before the request body",
                status_codes.CLIENT_CLOSED_REQUEST), client)
        else:
            tunnel = self._tunnel()
            if tunnel is None:  # this stream holds the connection: it lingers
                yield from self._start_linger(tunnel=False)
                return  # (and drops itself when that is over)
            if isinstance(tunnel, EarlyAnswerStream):
                yield _TunnelLinger()
            else:  # a tunnel older than install(): mitmproxy closes it at once
                yield commands.CloseTcpConnection(client, half_close=True)
        yield DropStream(self.stream_id)

    def _tunnel(self) -> HttpStream | None:
        """The CONNECT stream this stream's connection is tunnelled in, if any."""
        for outer in reversed(self.context.layers):
            if isinstance(outer, HttpStream) and outer is not self:
                return outer
        return None

    def _close_tunnel(self) -> layer.CommandGenerator[None]:
        if self._linger is not None:
            return
        if self.flow.request.is_http2 or self.flow.request.is_http3:
            # The tunnel is one stream of a shared connection: end it as mitmproxy
            # ends a tunnel whose inside closed the client connection.
            yield SendHttp(ResponseProtocolError(self.stream_id, "EOF"), self.context.client)
        else:
            yield from self._start_linger(tunnel=True)

    def _start_linger(self, *, tunnel: bool) -> layer.CommandGenerator[None]:
        self._linger = linger = _Linger(tunnel)
        self._handle_event = self._lingering
        yield commands.CloseTcpConnection(self.context.client, half_close=True)
        yield linger.timer

    def _lingering(self, event: events.Event) -> layer.CommandGenerator[None]:
        """The events of a stream that closes the client's connection lingering.

        Both kinds of stream get the client's data as RequestData (a blocked request's
        stream: its body; a tunnel's: the TLS records) and drop it, and the client's
        close as RequestEndOfMessage (a request's stream may get RequestProtocolError
        instead: the body ended early). What else a tunnel gets still goes to the
        layers inside it (their timers, the client's close)."""
        linger = self._linger
        assert linger is not None
        if isinstance(event, events.Wakeup) and event.command is linger.timer:
            if not linger.over:
                yield from self._end_linger("time is up", close=True)
            return
        if isinstance(event, RequestData):
            if not linger.over:
                linger.discarded += len(event.data)
                if linger.discarded >= LINGER_BYTES:
                    yield from self._end_linger("byte limit reached", close=True)
            return
        if isinstance(event, (RequestEndOfMessage, RequestProtocolError)) and not linger.over:
            # The client closed, or its body is complete: the HTTP/1 connection layer
            # (or the server, once both directions are shut) closes the connection.
            yield from self._end_linger("the client is done", close=False)
        if linger.tunnel:
            yield from self.passthrough(event)

    def _end_linger(self, why: str, *, close: bool) -> layer.CommandGenerator[None]:
        linger = self._linger
        assert linger is not None
        linger.over = True
        yield commands.Log(
            f"netfilter: lingering close of {self.context.client.peername}: discarded "
            f"{linger.discarded} bytes in {time.monotonic() - linger.started:.2f} s, {why}",
            logging.DEBUG)
        if close:
            yield commands.CloseConnection(self.context.client)
        if not linger.tunnel:
            yield DropStream(self.stream_id)


def _compatible() -> bool:
    return (mitmproxy_version.VERSION.split(".")[0] == "11"
            and all(hasattr(_ORIGINAL, name) or name == "client_state" for name in _NEEDS))


def install() -> bool:
    """Have mitmproxy's HTTP layer create EarlyAnswerStream streams (idempotent).

    False, and nothing changed, on another mitmproxy major version or when something
    else already replaced the stream class.
    """
    current: Any = layers_http.HttpStream
    if current is EarlyAnswerStream:
        return True
    if current is not _ORIGINAL or not _compatible():
        log.warning("netfilter: mitmproxy %s: blocked uploads are answered after their "
                    "body was read (mitmproxy's own behaviour)", mitmproxy_version.VERSION)
        return False
    layers_http.HttpStream = EarlyAnswerStream  # type: ignore[misc]
    return True


def installed() -> bool:
    return layers_http.HttpStream is EarlyAnswerStream
