"""The baseline of test_web_perf.py: the stop page server as it was before the web stack
(commit b9d662c, `src/netfilter/stoppage/server.py`), kept verbatim below this line.

The stop page server: where DNS `stoppage` answers send browsers.

Every request gets a 451: the blocked name arrives as the Host header, the engine is
asked about it (`frontend="stoppage"`) and its verdict is rendered; a name that is not
blocked (a stale cache, someone typing the address) gets the generic page, which names
no list. One request per connection (`Connection: close`), read by a small and careful
HTTP/1.1 reader: request line and header fields only, at most 8 KiB in all, within a
time limit; garbage is answered 400, an oversized head 431, a slow one 408, and the
server goes on. The request body, if any, is never read as such, only drained briefly
after the answer so that closing does not reset the connection under the client.
Connections are admitted by `netfilter.slots` (per-client caps, the oldest idle
connection evicted when full, short head deadlines when busy): a slowloris from a few
addresses cannot keep other clients from their answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass
from email.utils import formatdate
from urllib.parse import urlsplit

from netfilter.canonical import InvalidURL
from netfilter.config import StoppageSettings, parse_hostport
from netfilter.engine import Action, Engine, Verdict
from netfilter.latency import LatencyHistogram
from netfilter.slots import Slot, Slots, protocol_factory
from netfilter.stoppage.render import REASON, Renderer, StopPage

__all__ = ["MAX_HEAD", "StopPageServer"]

log = logging.getLogger(__name__)

MAX_HEAD = 8192  # request line and header fields together, bytes
MAX_FIELDS = 100
MAX_HOST = 255  # longer is no DNS name: not looked up
WRITE_TIMEOUT = 10.0
LINGER_TIME = 1.0  # after answering, drain what the client still sends, this long
LINGER_BYTES = 65536

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r?\n")
_OTHER_VERSION = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/[0-9]+\.[0-9]+\r?\n")
_FIELD_NAME = re.compile(_TOKEN)
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_PORT = re.compile(r"[0-9]{0,5}")

STATUS_TEXT = {400: "Bad Request", 408: "Request Timeout",
               431: "Request Header Fields Too Large", 451: REASON,
               505: "HTTP Version Not Supported"}


class _Refused(Exception):
    """The request cannot be read; answer with this status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: tuple[int, int]
    fields: list[tuple[str, str]]  # lowercased names, values as received (decoded)

    def get(self, name: str) -> list[str]:
        return [v for n, v in self.fields if n == name]

    def first(self, name: str) -> str | None:
        values = self.get(name)
        return ", ".join(values) if values else None


def _decode(value: bytes) -> str:
    """A field value: UTF-8 where it is (some clients send raw UTF-8 names), else
    ISO-8859-1 as HTTP/1.1 historically reads it."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """Request line and header fields; None when the client sent nothing at all.

    Raises _Refused for anything that is not a readable HTTP/1.x request head."""
    size = 0

    async def line() -> bytes:
        nonlocal size
        try:
            data = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as e:
            raise _Refused(431, "request head too large") from e
        except asyncio.IncompleteReadError as e:
            if not e.partial and size == 0:
                raise EOFError from e
            raise _Refused(400, "incomplete request") from e
        size += len(data)
        if size > MAX_HEAD:
            raise _Refused(431, "request head too large")
        return data

    try:
        first = await line()
        for _ in range(4):  # RFC 9112 2.2: empty lines before the request line
            if first not in (b"\r\n", b"\n"):
                break
            first = await line()
    except EOFError:
        return None
    match = _REQUEST_LINE.fullmatch(first)
    if match is None:
        if _OTHER_VERSION.fullmatch(first) is not None:
            raise _Refused(505, "HTTP version not supported")
        raise _Refused(400, "malformed request line")
    method, target, major, minor = match.groups()
    if major != b"1":
        raise _Refused(505, "HTTP version not supported")
    fields: list[tuple[str, str]] = []
    while True:
        try:
            data = await line()
        except EOFError as e:
            raise _Refused(400, "incomplete request") from e
        if data in (b"\r\n", b"\n"):
            break
        if len(fields) >= MAX_FIELDS:
            raise _Refused(431, "too many header fields")
        if data[:1] in (b" ", b"\t"):
            raise _Refused(400, "obsolete line folding")
        name, colon, value = data.partition(b":")
        if not colon or _FIELD_NAME.fullmatch(name) is None:
            raise _Refused(400, "malformed header field")
        value = value.rstrip(b"\r\n").strip(b" \t")
        if _BAD_VALUE.search(value):
            raise _Refused(400, "control character in a header field")
        fields.append((name.decode("ascii").lower(), _decode(value)))
    return Request(method.decode("ascii"), target.decode("ascii"),
                   (int(major), int(minor)), fields)


def split_host(value: str) -> str:
    """A Host field without its port: `a.example:8081` -> `a.example`, `[::1]:80` ->
    `[::1]`; anything else is returned as it is (the engine judges it)."""
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end > 0 and (end + 1 == len(text) or
                        (text[end + 1] == ":" and _PORT.fullmatch(text[end + 2:]))):
            return text[:end + 1]
        return text
    host, colon, port = text.rpartition(":")
    if colon and ":" not in host and _PORT.fullmatch(port):
        return host
    return text


def request_host(request: Request) -> str | None:
    """The name asked for: an absolute-form target's authority (RFC 9112 3.2.2) or the
    Host field; raises _Refused when HTTP/1.1 requires a Host and it is missing or
    repeated (RFC 9112 3.2)."""
    hosts = request.get("host")
    if len(hosts) > 1:
        raise _Refused(400, "more than one Host field")
    target = request.target
    if "://" in target and not target.startswith("/"):
        try:
            authority = urlsplit(target).netloc.rpartition("@")[2]
        except ValueError as e:
            raise _Refused(400, "malformed request target") from e
        if authority:
            return split_host(authority)
    if not hosts:
        if request.version >= (1, 1):
            raise _Refused(400, "HTTP/1.1 request without a Host field")
        return None
    return split_host(hosts[0]) or None


def _response(status: int, headers: list[tuple[str, str]], body: bytes, *,
              head: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Error')}",
             f"Date: {formatdate(usegmt=True)}"]
    for name, value in headers:
        clean = "".join(c for c in value if c not in "\r\n\0")
        lines.append(f"{name}: {clean}")
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    out = "\r\n".join(lines).encode("latin-1", "replace")
    return out if head else out + body


def _error(status: int) -> bytes:
    body = f"{status} {STATUS_TEXT[status]}\n".encode("ascii")
    return _response(status, [("Content-Type", "text/plain; charset=utf-8"),
                              ("Cache-Control", "no-store"),
                              ("X-Content-Type-Options", "nosniff")], body)


class StopPageServer:
    """Serves the stop page on `settings.listen` until stopped."""

    def __init__(self, engine: Engine, settings: StoppageSettings, *,
                 renderer: Renderer | None = None, read_timeout: float | None = None,
                 write_timeout: float = WRITE_TIMEOUT, max_clients: int | None = None,
                 sock: socket.socket | None = None) -> None:
        """`renderer` defaults to one built from `settings` (a relative template
        directory taken against the config file's directory); `read_timeout` and
        `max_clients` override the settings' `header_timeout` and `max_clients`;
        `sock`: a TCP socket already bound to `settings.listen` (`netfilter serve` binds
        every part's before it starts any), served from `start` on and closed at `stop`;
        without it, `start` binds one."""
        self.engine = engine
        self._sock = sock
        self.settings = settings
        self.renderer = renderer or Renderer(settings, base=engine.settings.base)
        self.write_timeout = write_timeout
        self.stats: Counter[str] = Counter()
        self.latency = LatencyHistogram()  # a read request to its answer written
        self.slots = Slots(max_clients or settings.max_clients,
                           settings.max_clients_per_address,
                           read_timeout or settings.header_timeout,
                           settings.busy_header_timeout, self.stats)
        self.address: tuple[str, int] | None = None
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The bound port (the one the system chose, for `listen: ...:0`)."""
        if self.address is None:
            raise RuntimeError("stop page server not started")
        return self.address[1]

    async def start(self) -> None:
        host, port = parse_hostport(self.settings.listen, any_port=True)
        loop = asyncio.get_running_loop()
        factory = protocol_factory(self._client, MAX_HEAD)
        if self._sock is not None:
            sock, self._sock = self._sock, None
            self._server = await loop.create_server(factory, sock=sock)
        else:
            self._server = await loop.create_server(factory, host, port, reuse_address=True)
        sockname = self._server.sockets[0].getsockname()
        self.address = (host, int(sockname[1]))
        log.info("stoppage: serving on %s port %d", host, self.address[1])

    async def stop(self) -> None:
        if self._sock is not None:  # not served yet, when start failed
            self._sock.close()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._clients:
            _done, pending = await asyncio.wait(list(self._clients), timeout=1.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    # ------------------------------------------------------------ per connection

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else None
        slot = self.slots.admit(client, reader, task.cancel)
        if slot is None:
            writer.close()
            return
        self._clients.add(task)
        self._writers.add(writer)
        try:
            await self._serve(reader, writer, client, slot)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            self.stats["client_gone"] += 1
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug must cost one request, never the server
            self.stats["internal_errors"] += 1
            log.exception("stop page request failed")
        finally:
            self.slots.release(slot)
            self._writers.discard(writer)
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     client: str | None, slot: Slot) -> None:
        self.stats["connections"] += 1
        started = 0.0  # set once a request is read: time-outs and refusals are not timed
        try:
            async with self.slots.reading(slot):
                request = await read_request(reader)
        except TimeoutError:
            self.stats["timeout"] += 1
            answer = _error(408)
        except _Refused as e:
            self.stats[f"status_{e.status}"] += 1
            log.debug("stoppage: %s from %s: %s", e.status, client, e)
            answer = _error(e.status)
        else:
            if request is None:
                return  # connected and left without a word
            started = time.monotonic()
            try:
                answer = self.answer(request, client)
            except _Refused as e:
                self.stats[f"status_{e.status}"] += 1
                answer = _error(e.status)
        writer.write(answer)
        async with asyncio.timeout(self.write_timeout):
            await writer.drain()
        if started:
            self.latency.observe(time.monotonic() - started)
        await self._linger(reader, writer)

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close and drain briefly: closing with unread data would reset the
        connection and could lose the answer before the client reads it."""
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
        drained = 0
        with contextlib.suppress(Exception):
            async with asyncio.timeout(LINGER_TIME):
                while drained < LINGER_BYTES:
                    data = await reader.read(LINGER_BYTES)
                    if not data:
                        break
                    drained += len(data)

    def answer(self, request: Request, client: str | None) -> bytes:
        """The whole response to one readable request."""
        host = request_host(request)
        verdict = Verdict(Action.ALLOW)
        if host and len(host) <= MAX_HOST:
            with contextlib.suppress(InvalidURL):  # no host name at all: the generic page
                verdict = self.engine.check_host(host, frontend="stoppage", client=client,
                                                 detail=request.method[:16])
        self.stats["blocked" if verdict.blocked else "generic"] += 1
        page: StopPage = self.renderer.render(
            verdict, host=host, accept=request.first("accept"),
            accept_language=request.first("accept-language"),
            sec_fetch_dest=request.first("sec-fetch-dest"))
        return _response(page.status, page.headers, page.body, head=request.method == "HEAD")
