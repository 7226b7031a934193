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
and HTTP heads (MAX_HEAD each, else 400), every read under a deadline
(icap.header_timeout; icap.idle_timeout between requests on a kept-alive connection).
A malformed request gets its ICAP error status and the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
from collections import Counter
from collections.abc import Awaitable
from typing import TypeVar

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
    HttpHead,
    IcapError,
    IcapRequest,
    format_head,
    parse_encapsulated,
    parse_http_request,
    parse_icap_head,
)
from netfilter.stoppage import Renderer

__all__ = ["MAX_HEAD", "SERVICE", "IcapServer"]

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE = "/reqmod"
FRONTEND = "icap"
MAX_HEAD = 64 * 1024  # bytes of an ICAP head, and of the encapsulated HTTP head
MAX_CHUNK_LINE = 256  # bytes of a chunk-size line
READ_PIECE = 64 * 1024  # bytes read at once from a body chunk
OPTIONS_TTL = 60  # seconds a client may keep our OPTIONS answer
LINGER_SECONDS = 1.0  # per read of what a client sends after its answer, before closing
LINGER_READS = 16  # reads of READ_PIECE at most


async def _within(awaitable: Awaitable[T], seconds: float) -> T:
    """`awaitable` under a deadline; asyncio.timeout, not wait_for: no task per read
    (this is every request's path)."""
    async with asyncio.timeout(seconds):
        return await awaitable


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
        self._writers: set[asyncio.StreamWriter] = set()
        self._targets = TargetCache()
        self._istag: tuple[object, str] | None = None
        self.address: tuple[str, int] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            host, port = parse_hostport(self.settings.listen, any_port=True)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=128)
        self._server = await asyncio.start_server(self._connection, sock=sock, limit=MAX_HEAD)
        self.address = sock.getsockname()[:2]
        log.info("icap: serving %s on %s port %d", SERVICE, *self.address)

    async def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):  # each handler then ends as on a reset
                writer.transport.abort()
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

    # ------------------------------------------------------------ connections

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else "?"
        s = self.settings
        if (sum(self._clients.values()) >= s.max_connections
                or self._clients[client] >= s.max_connections_per_client):
            self.stats["refused_busy"] += 1
            writer.write(format_head(503, [("Encapsulated", "null-body=0"),
                                           ("Connection", "close")]))
            await self._close(reader, writer)
            return
        self._writers.add(writer)
        self._clients[client] += 1
        try:
            await self._serve(reader, writer)
        except IcapError as e:
            self.stats[f"error_{e.status}"] += 1
            writer.write(format_head(e.status, [("Encapsulated", "null-body=0"),
                                                ("Connection", "close")]))
        except TimeoutError:
            self.stats["timeouts"] += 1
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            self.stats["broken"] += 1
        except Exception:  # never take the server down for one connection
            log.exception("icap: connection failed")
        finally:
            self._clients[client] -= 1
            if self._clients[client] <= 0:
                del self._clients[client]
            await self._close(reader, writer)
            self._writers.discard(writer)

    async def _close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Send what is written, then read (a bounded while) what the client still
        sends before closing: closed with unread input, the kernel would reset the
        connection and the client might never see our answer."""
        with contextlib.suppress(OSError, ConnectionError, TimeoutError, RuntimeError):
            await _within(writer.drain(), self.settings.header_timeout)
            if writer.can_write_eof():
                writer.write_eof()
            for _ in range(LINGER_READS):
                if not await _within(reader.read(READ_PIECE), LINGER_SECONDS):
                    break
        with contextlib.suppress(OSError):
            writer.close()

    async def _head(self, reader: asyncio.StreamReader, timeout: float) -> bytes | None:
        try:
            head = await _within(reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.LimitOverrunError:
            raise IcapError(400, "ICAP head too long") from None
        except asyncio.IncompleteReadError as e:
            if not e.partial.strip():
                return None  # the client closed between requests
            raise
        return head[:-4]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = self.settings
        served = 0
        while True:
            head = await self._head(reader, s.idle_timeout if served else s.header_timeout)
            if head is None:
                return
            request = parse_icap_head(head.lstrip(b"\r\n"))
            if request.service != SERVICE:
                raise IcapError(404, f"no service {request.service[:100]!r}")
            if request.method == "OPTIONS":
                self.stats["options"] += 1
                writer.write(format_head(200, [
                    ("Methods", "REQMOD"), ("ISTag", self.istag()),
                    ("Max-Connections", str(s.max_connections)),
                    ("Options-TTL", str(OPTIONS_TTL)), ("Allow", "204"), ("Preview", "0"),
                    ("Transfer-Complete", "*"), ("Encapsulated", "null-body=0")]))
            elif request.method == "REQMOD":
                await self._reqmod(request, reader, writer)
            else:
                raise IcapError(405, f"{request.method[:20]} is not served here")
            if writer.transport.get_write_buffer_size():
                await _within(writer.drain(), s.header_timeout)
            served += 1
            if (request.field("connection") or "").lower() == "close":
                return

    async def _reqmod(self, request: IcapRequest, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        s = self.settings
        enc = parse_encapsulated(request.field("encapsulated"))
        if enc.req_hdr is None:
            raise IcapError(400, "REQMOD without an encapsulated request head")
        if enc.body_offset > MAX_HEAD or enc.body_offset < 4:
            raise IcapError(400, "encapsulated HTTP head too long or empty")
        raw = await _within(reader.readexactly(enc.body_offset), s.header_timeout)
        if not raw.endswith(b"\r\n\r\n"):
            raise IcapError(400, "the encapsulated HTTP head does not end where it says")
        http = parse_http_request(raw[:-4])
        preview = request.field("preview") is not None
        has_body = enc.body == "req-body"
        verdict = self._decide(http, request.field("x-client-ip"))
        self.stats["requests"] += 1
        if verdict is not None and verdict.blocked:
            self.stats["blocked"] += 1
            if has_body:  # the rest is never asked for (no 100 Continue)
                await self._body(reader, None)
            writer.write(self._stop(verdict, http))
            return
        allows_204 = preview or "204" in (request.field("allow") or "")
        if allows_204:
            if has_body and not preview:
                await self._body(reader, None)  # read to its end, then answer
            elif has_body:
                await self._body(reader, None)  # the preview's (zero) bytes
            self.stats["no_content"] += 1
            writer.write(format_head(204, [("ISTag", self.istag()),
                                           ("Encapsulated", "null-body=0")]))
            return
        # unchanged, echoed: the client did not allow 204
        self.stats["echoed"] += 1
        section = "req-body" if has_body else "null-body"
        writer.write(format_head(200, [("ISTag", self.istag()),
                                       ("Encapsulated", f"req-hdr=0, {section}={len(raw)}")]))
        writer.write(raw)
        if has_body:
            await self._body(reader, writer)

    async def _body(self, reader: asyncio.StreamReader,
                    echo: asyncio.StreamWriter | None) -> bool:
        """Read a chunked body to its last chunk (written on to `echo` when given);
        True if it ended with `ieof` (a preview that holds the whole body)."""
        timeout = self.settings.header_timeout
        while True:
            line = await _within(reader.readuntil(b"\r\n"), timeout)
            if len(line) > MAX_CHUNK_LINE:
                raise IcapError(400, "chunk-size line too long")
            size_text, _, ext = line[:-2].partition(b";")
            size = int(size_text.strip(), 16)  # ValueError: a broken connection
            if size < 0:
                raise IcapError(400, "negative chunk size")
            if size == 0:
                await _within(reader.readuntil(b"\r\n"), timeout)  # trailer end
                if echo is not None:
                    echo.write(b"0\r\n\r\n")
                return ext.strip() == b"ieof"
            if echo is not None:
                echo.write(b"%x\r\n" % size)
            left = size
            while left:
                piece = await _within(reader.read(min(left, READ_PIECE)), timeout)
                if not piece:
                    raise asyncio.IncompleteReadError(piece, left)
                left -= len(piece)
                if echo is not None:
                    echo.write(piece)
                    await _within(echo.drain(), timeout)
            if await _within(reader.readexactly(2), timeout) != b"\r\n":
                raise IcapError(400, "chunk not followed by CRLF")
            if echo is not None:
                echo.write(b"\r\n")

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
