"""An ICAP server (RFC 3507) with one REQMOD service, `/reqmod`, over the one HTTP
decision (netfilter.http): Squid and any proxy or firewall that speaks ICAP enforce
the lists with it.

- OPTIONS: Methods REQMOD, `Preview: 0` (the request head is all a decision needs),
  `Allow: 204`, `Max-Connections` (icap.max_connections) and an ISTag that changes
  with the lists in force (a proxy then drops what it cached of our answers).
- REQMOD: the encapsulated HTTP request is decided as mitmproxy's and the Squid
  helper's are (CONNECT by host). Clean: 204 (when the client allows it, or in a
  preview), else the request echoed unchanged. Blocked: the engine has recorded it
  (frontend `icap`) and the answer is the 451 stop page as an encapsulated HTTP
  response; a body is never looked at (drained, never buffered whole).

Bounded: connections at once and per client address (beyond: 503 and close), ICAP
and HTTP heads (MAX_HEAD each, else 400), deadlines: icap.header_timeout for a
request's head (from its first byte; the first request's from the connect), for its
encapsulated HTTP head, for each read of a body and for a client to take our answers;
icap.idle_timeout between requests on a kept-alive connection. A malformed request
gets its ICAP error status and the connection is closed.

Each connection is an asyncio.Protocol that parses from its own buffer as bytes
arrive, pipelined requests answered in order: no streams, no task per connection, one
timer per connection that a deadline moves lazily. Reading pauses while the client
does not take our answers (pause_writing).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from collections import Counter
from typing import cast

from netfilter.config import IcapSettings, parse_hostport
from netfilter.engine import Engine, Verdict
from netfilter.http import (
    DEFAULT_PORTS,
    REASONS,
    TargetCache,
    TlsAction,
    check_request,
    decide_host,
    make_target,
    normalize_host,
    split_authority,
    stop_reply,
)
from netfilter.icap.protocol import (
    Encapsulated,
    HttpHead,
    IcapError,
    IcapRequest,
    format_head,
    parse_encapsulated,
    parse_http_request,
    parse_icap_head,
)
from netfilter.slots import close_within
from netfilter.stoppage import Renderer

__all__ = ["MAX_HEAD", "SERVICE", "IcapServer"]

log = logging.getLogger(__name__)

SERVICE = "/reqmod"
FRONTEND = "icap"
MAX_HEAD = 64 * 1024  # bytes of an ICAP head, and of the encapsulated HTTP head
MAX_CHUNK_LINE = 256  # bytes of a chunk-size line, CRLF included
OPTIONS_TTL = 60  # seconds a client may keep our OPTIONS answer
LINGER_SECONDS = 1.0  # per read of what a client sends after its answer, before closing
LINGER_READS = 16  # reads at most

# connection states
_HEAD, _HTTP, _BODY, _LINGER, _CLOSED = range(5)
# within a chunked body
_SIZE, _DATA, _CRLF, _TRAILER = range(4)


class IcapServer:
    """Serves `/reqmod` on `settings.listen` (or `sock`) from `start` to `stop`."""

    def __init__(self, engine: Engine, settings: IcapSettings, renderer: Renderer, *,
                 sock: socket.socket | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.renderer = renderer  # replaced on a reload; read per request
        self.stats: Counter[str] = Counter()
        self._sock = sock
        self._server: asyncio.base_events.Server | None = None
        self._clients: Counter[str] = Counter()
        self._connections: set[_Connection] = set()
        self._targets = TargetCache()
        self._istag: tuple[object, str] | None = None
        self._no_content: tuple[int, str, bytes] = (0, "", b"")
        self.address: tuple[str, int] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            host, port = parse_hostport(self.settings.listen, any_port=True)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=128)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock)
        self.address = sock.getsockname()[:2]
        log.info("icap: serving %s on %s port %d", SERVICE, *self.address)

    async def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._server is not None:
            self._server.close()
            for connection in list(self._connections):  # each ends as on a reset
                connection.abort()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.header_timeout):
                    await self._server.wait_closed()

    @property
    def port(self) -> int:
        if self.address is None:
            raise RuntimeError("icap server not started")
        return int(self.address[1])

    def istag(self) -> str:
        """Quoted, at most 32 characters; changes whenever the lists in force do."""
        lists = self.engine.lists
        if self._istag is None or self._istag[0] is not lists:
            text = repr((sorted(lists.versions().items()), len(lists)))
            self._istag = (lists, f'"nf-{hashlib.sha256(text.encode()).hexdigest()[:24]}"')
            self._targets.clear()
        return self._istag[1]

    # ------------------------------------------------------------ answers

    def _options(self) -> bytes:
        self.stats["options"] += 1
        return format_head(200, [
            ("Methods", "REQMOD"), ("ISTag", self.istag()),
            ("Max-Connections", str(self.settings.max_connections)),
            ("Options-TTL", str(OPTIONS_TTL)), ("Allow", "204"), ("Preview", "0"),
            ("Transfer-Complete", "*"), ("Encapsulated", "null-body=0")])

    def _no_content_head(self) -> bytes:
        """The 204 answer, formatted once a second (and when the ISTag changes)."""
        second, istag = int(time.time()), self.istag()
        cached = self._no_content
        if cached[0] != second or cached[1] != istag:
            cached = self._no_content = (second, istag, format_head(
                204, [("ISTag", istag), ("Encapsulated", "null-body=0")]))
        return cached[2]

    def _reqmod(self, request: IcapRequest, enc: Encapsulated,
                raw: bytes) -> tuple[bytes, bytes | None]:
        """A REQMOD request with its encapsulated HTTP head `raw` (blank line
        included): what to write now, and what to write once the body (if any) has
        been read, or None when the body is to be echoed after what is written now."""
        http = parse_http_request(raw[:-4])
        verdict = self._decide(http, request.field("x-client-ip"))
        self.stats["requests"] += 1
        if verdict is not None and verdict.blocked:
            self.stats["blocked"] += 1
            # a body's rest is never asked for (no 100 Continue): drained, then this
            return b"", self._stop(verdict, http)
        if request.field("preview") is not None or "204" in (request.field("allow") or ""):
            self.stats["no_content"] += 1
            return b"", self._no_content_head()  # after the body, or the preview's bytes
        # unchanged, echoed: the client did not allow 204
        self.stats["echoed"] += 1
        section = "req-body" if enc.body == "req-body" else "null-body"
        head = format_head(200, [("ISTag", self.istag()),
                                 ("Encapsulated", f"req-hdr=0, {section}={len(raw)}")])
        return head + raw, None

    # ------------------------------------------------------------ decisions

    def _decide(self, http: HttpHead, client: str | None) -> Verdict | None:
        """The engine's verdict for the encapsulated request (None: nothing matched)."""
        if http.method == "CONNECT":
            host, _port = split_authority(http.target)
            decision = decide_host(self.engine, normalize_host(host), "none", client=client,
                                   detail="CONNECT", frontend=FRONTEND)
            return decision.verdict if decision.action is TlsAction.BLOCK else None
        target_text = http.target
        scheme, sep, rest = target_text.partition("://")
        if sep and scheme.isascii() and scheme.isalpha():
            scheme = scheme.lower()
            cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0),
                      default=len(rest))
            dialled, path = rest[:cut], rest[cut:]
        elif target_text.startswith("/"):
            scheme, dialled, path = "http", http.field("host") or "", target_text
        else:
            raise IcapError(400, "an HTTP request target that is neither absolute nor a path")
        host_field = http.fields.get("host")
        if host_field is not None and len(host_field) > 1:
            raise IcapError(400, "more than one Host header")
        header = host_field[0] if host_field else None
        key = (scheme, dialled, header)
        target = self._targets.get(key)
        if target is None:
            host, port = split_authority(dialled)
            target = self._targets.put(key, make_target(
                scheme, header, host, port or DEFAULT_PORTS.get(scheme, 80), allowed=True))
        try:
            return check_request(self.engine, target, path or "/", frontend=FRONTEND,
                                 client=client, method=http.method)
        except ValueError as e:  # InvalidURL: no host at all
            raise IcapError(400, f"cannot check the URL ({e})") from None

    def _stop(self, verdict: Verdict, http: HttpHead) -> bytes:
        """The 451 stop page as an encapsulated HTTP response."""
        page = stop_reply(self.renderer, verdict, method=http.method, header=http.field,
                          host=split_authority(http.field("host") or http.target)[0])
        lines = [f"HTTP/1.1 {page.status} {REASONS.get(page.status, 'Blocked')}"]
        lines.extend(f"{n}: {''.join(c for c in v if c not in chr(13) + chr(10))}"
                     for n, v in page.headers)
        lines.append(f"Content-Length: {page.length}")
        http_head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        if page.body:
            enc = f"res-hdr=0, res-body={len(http_head)}"
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(page.body), page.body)
        else:
            enc, body = f"res-hdr=0, null-body={len(http_head)}", b""
        return format_head(200, [("ISTag", self.istag()), ("Encapsulated", enc)]) + \
            http_head + body


class _Connection(asyncio.Protocol):
    """One ICAP connection: requests parsed from a buffer as their bytes arrive,
    answered in order, under the server's bounds."""

    def __init__(self, server: IcapServer) -> None:
        self.server = server
        self.settings = server.settings
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.client: str | None = None  # counted in server._clients while set
        self.state = _HEAD
        self.buf = bytearray()
        self.scan = 0  # where to look for the end of a head already partly here
        self.served = 0
        self.paused = False  # the client is not taking our answers (pause_writing)
        self.head_started = True  # the first head's deadline runs from the connect
        # the request being read
        self.request: IcapRequest | None = None
        self.enc: Encapsulated | None = None
        self.body = _SIZE
        self.left = 0
        self.echo = False
        self.after: bytes | None = None
        # one timer, moved lazily: it fires at `timer_at` and looks at `deadline`
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.lingered = 0
        self.killer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)  # uvloop's: no subclass
        server, s = self.server, self.settings
        server._connections.add(self)
        peer = t.get_extra_info("peername")
        client = str(peer[0]) if peer else "?"
        clients = server._clients
        if (sum(clients.values()) >= s.max_connections
                or clients[client] >= s.max_connections_per_client):
            server.stats["refused_busy"] += 1
            self.write(format_head(503, [("Encapsulated", "null-body=0"),
                                         ("Connection", "close")]))
            self.linger()
            return
        clients[client] += 1
        self.client = client
        self.arm(s.header_timeout)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _HEAD and not self.buf:
            self.buf = bytearray(data)  # the common case: a whole request at once
        elif state < _LINGER:
            self.buf += data
        elif state == _LINGER:
            self.lingered += 1
            if self.lingered >= LINGER_READS:
                self.close()
            else:
                self.arm(LINGER_SECONDS)
            return
        else:
            return
        self.process()

    def eof_received(self) -> bool:
        if self.state < _LINGER and (self.state != _HEAD or self.buf.strip()):
            self.server.stats["broken"] += 1  # cut off inside a request (not between)
        self.close()
        return True  # close() has been called: nothing more to send but what is queued

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state < _LINGER and (self.state != _HEAD or self.buf.strip()):
            self.server.stats["broken"] += 1
        self.state = _CLOSED
        self.buf = bytearray()
        for handle in (self.timer, self.killer):
            if handle is not None:
                handle.cancel()
        self.timer = self.killer = None
        server = self.server
        server._connections.discard(self)
        client, self.client = self.client, None
        if client is not None:
            server._clients[client] -= 1
            if server._clients[client] <= 0:
                del server._clients[client]

    def pause_writing(self) -> None:
        """The client is not reading our answers: read nothing more from it until it
        does, and not longer than header_timeout."""
        self.paused = True
        if self.state < _LINGER and self.transport is not None:
            self.transport.pause_reading()
            self.arm(self.settings.header_timeout)

    def resume_writing(self) -> None:
        self.paused = False
        if self.state < _LINGER and self.transport is not None:
            self.transport.resume_reading()
            self.loop.call_soon(self.process)

    # ------------------------------------------------------------ deadlines

    def arm(self, seconds: float) -> None:
        """The connection times out `seconds` from now (unless armed again first)."""
        now = self.loop.time()
        deadline = self.deadline = now + seconds
        if self.timer is None or self.timer_at > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self.expire)

    def expire(self) -> None:
        self.timer = None
        if self.state == _CLOSED:
            return
        if self.loop.time() < self.deadline:  # moved on since: wait for the new one
            self.timer_at = self.deadline
            self.timer = self.loop.call_at(self.deadline, self.expire)
            return
        if self.state == _LINGER:
            self.close()
            return
        self.server.stats["timeouts"] += 1
        if self.paused:
            self.abort()  # it does not read: nothing more can reach it
        else:
            self.linger()

    # ------------------------------------------------------------ closing

    def write(self, data: bytes) -> None:
        if self.state != _CLOSED and self.transport is not None:
            self.transport.write(data)

    def linger(self) -> None:
        """Send what is written and the end of our side, then read (a bounded while)
        what the client still sends before closing: closed with unread input, the
        kernel would reset the connection and the client might never see our answer."""
        t = self.transport
        if self.state >= _LINGER or t is None:
            return
        self.state = _LINGER
        self.buf = bytearray()
        self.lingered = 0
        with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
            if t.can_write_eof():
                t.write_eof()
            t.resume_reading()
        self.arm(LINGER_SECONDS)

    def close(self) -> None:
        """Close once what is written has been sent, or abort if that takes longer
        than header_timeout."""
        t = self.transport
        if self.state == _CLOSED or t is None:
            return
        self.state = _CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.killer = close_within(t, self.settings.header_timeout)

    def abort(self) -> None:
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------ requests

    def process(self) -> None:
        """Parse and answer what the buffer holds, request after request."""
        if self.state >= _LINGER:
            return
        before = self.state, self.body, self.left
        try:
            while not self.paused and self.state < _LINGER:
                if self.state == _HEAD:
                    if not self.head():
                        break
                elif self.state == _HTTP:
                    if not self.http():
                        break
                elif not self.chunked():
                    break
        except IcapError as e:
            self.server.stats[f"error_{e.status}"] += 1
            self.write(format_head(e.status, [("Encapsulated", "null-body=0"),
                                              ("Connection", "close")]))
            self.linger()
            return
        except ValueError:  # a chunk size that is no number
            self.server.stats["broken"] += 1
            self.linger()
            return
        except Exception:  # never take the server down for one connection
            log.exception("icap: connection failed")
            self.linger()
            return
        if self.paused or self.state >= _LINGER:
            return
        s = self.settings
        if self.state == _HEAD:
            if self.buf:
                if not self.head_started:  # a head has begun: header_timeout for all of it
                    self.head_started = True
                    self.arm(s.header_timeout)
            elif self.served:
                self.arm(s.idle_timeout)  # between requests
        elif (self.state, self.body, self.left) != before or self.state == _BODY:
            self.arm(s.header_timeout)  # per read, as long as a request's bytes come

    def head(self) -> bool:
        buf = self.buf
        end = buf.find(b"\r\n\r\n", self.scan, MAX_HEAD)
        if end < 0:
            if len(buf) >= MAX_HEAD:
                raise IcapError(400, "ICAP head too long")
            self.scan = max(0, len(buf) - 3)
            return False
        head = bytes(buf[:end])
        del buf[:end + 4]
        self.scan = 0
        request = parse_icap_head(head.lstrip(b"\r\n"))
        if request.service != SERVICE:
            raise IcapError(404, f"no service {request.service[:100]!r}")
        if request.method == "OPTIONS":
            self.write(self.server._options())
            self.done(request)
        elif request.method == "REQMOD":
            enc = parse_encapsulated(request.field("encapsulated"))
            if enc.req_hdr is None:
                raise IcapError(400, "REQMOD without an encapsulated request head")
            if enc.body_offset > MAX_HEAD or enc.body_offset < 4:
                raise IcapError(400, "encapsulated HTTP head too long or empty")
            self.request, self.enc, self.state = request, enc, _HTTP
        else:
            raise IcapError(405, f"{request.method[:20]} is not served here")
        return True

    def http(self) -> bool:
        request, enc, buf = self.request, self.enc, self.buf
        assert request is not None and enc is not None
        if len(buf) < enc.body_offset:
            return False
        raw = bytes(buf[:enc.body_offset])
        del buf[:enc.body_offset]
        if not raw.endswith(b"\r\n\r\n"):
            raise IcapError(400, "the encapsulated HTTP head does not end where it says")
        now, after = self.server._reqmod(request, enc, raw)
        if now:
            self.write(now)
        if enc.body == "req-body":
            self.state, self.body, self.echo, self.after = _BODY, _SIZE, after is None, after
        else:
            if after is not None:
                self.write(after)
            self.done(request)
        return True

    def chunked(self) -> bool:
        """One step through a chunked body (drained, or written on when echoed)."""
        buf = self.buf
        if self.body == _DATA:
            n = min(self.left, len(buf))
            if not n:
                return False
            if self.echo:
                self.write(bytes(buf[:n]))
            del buf[:n]
            self.left -= n
            if not self.left:
                self.body = _CRLF
            return True
        if self.body == _CRLF:
            if len(buf) < 2:
                return False
            if buf[:2] != b"\r\n":
                raise IcapError(400, "chunk not followed by CRLF")
            del buf[:2]
            if self.echo:
                self.write(b"\r\n")
            self.body = _SIZE
            return True
        if self.body == _SIZE:
            end = buf.find(b"\r\n", 0, MAX_CHUNK_LINE)
            if end < 0:
                if len(buf) >= MAX_CHUNK_LINE:
                    raise IcapError(400, "chunk-size line too long")
                return False
            size_text = bytes(buf[:end]).partition(b";")[0]
            del buf[:end + 2]
            size = int(size_text.strip(), 16)  # ValueError: a broken connection
            if size < 0:
                raise IcapError(400, "negative chunk size")
            if size:
                if self.echo:
                    self.write(b"%x\r\n" % size)
                self.body, self.left = _DATA, size
            else:
                self.body = _TRAILER
            return True
        # _TRAILER: the line that ends the body
        end = buf.find(b"\r\n", 0, MAX_HEAD)
        if end < 0:
            if len(buf) >= MAX_HEAD:
                raise ValueError("trailer too long")
            return False
        del buf[:end + 2]
        if self.echo:
            self.write(b"0\r\n\r\n")
        if self.after is not None:
            self.write(self.after)
        assert self.request is not None
        self.done(self.request)
        return True

    def done(self, request: IcapRequest) -> None:
        """A request answered: the next one, unless this one said close."""
        self.served += 1
        self.request = self.enc = self.after = None
        if (request.field("connection") or "").lower() == "close":
            self.linger()
        else:
            self.state, self.head_started = _HEAD, False

