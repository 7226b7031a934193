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
- HTTP/1: the answer carries `Connection: close`, and after it the proxy half-closes
  the connection (FIN), so the client stops sending; what it still sends is parsed
  and dropped, never buffered, never forwarded (no `100 Continue` is sent either, so
  a client waiting for one never sends the body at all);
- HTTP/2: the answer ends the stream, then RST_STREAM (CANCEL) tells the client to
  stop sending this request's body; the connection and its other streams go on.

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
from mitmproxy.proxy import commands, layer
from mitmproxy.proxy.layers import http as layers_http
from mitmproxy.proxy.layers.http import DropStream, HttpStream, SendHttp
from mitmproxy.proxy.layers.http._events import (
    RequestHeaders,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook, HttpResponseHook

__all__ = ["EarlyAnswerStream", "install", "installed", "mark"]

log = logging.getLogger(__name__)

_KEY = "netfilter_answer_now"
_ORIGINAL = HttpStream
_NEEDS = ("check_killed", "state_wait_for_request_headers", "state_errored", "client_state")


def mark(flow: http.HTTPFlow) -> None:
    """Ask for the flow's response (set in requestheaders) to be sent before its body."""
    flow.metadata[_KEY] = True


class EarlyAnswerStream(HttpStream):
    """mitmproxy's HttpStream, answering marked flows right after requestheaders."""

    _body_pending = False

    # Both overrides return the parent's generator itself (no generator of their own
    # wrapping it): they run for every request, check_killed several times.

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
        if http1:
            yield commands.CloseTcpConnection(client, half_close=True)
        else:  # 499 is what mitmproxy maps to RST_STREAM CANCEL
            yield SendHttp(ResponseProtocolError(
                self.stream_id, "netfilter: answered before the request body",
                status_codes.CLIENT_CLOSED_REQUEST), client)
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
