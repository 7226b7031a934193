"""The audit log's tiles and checkpoint (C2SP tlog-tiles) over HTTP, for auditors and
witnesses: GET and HEAD of regular files below the tiles directory only; no listings,
no dot files, nothing a path or a link leads out to.

`netfilter serve` puts `TilesApp` on `audit.tiles_listen` beside its other listeners;
`netfilter audit tiles --listen` serves the same app on a loop of its own
(`TileServer`). Either way the guard's limits hold (see netfilter.web.guard).
"""

from __future__ import annotations

import socket
from pathlib import Path

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from netfilter.web.app import build_app
from netfilter.web.server import SMALL, Limits, Listener, Standalone, bind_tcp

__all__ = ["LIMITS", "TileServer", "TilesApp", "serve_tiles", "tile_resource",
           "tiles_listener"]

LIMITS = SMALL

Resource = tuple[bytes, list[tuple[str, str]]]  # a body and its header fields


def tile_resource(directory: Path, path: str) -> Resource | None:
    """A regular file below `directory` (resolved) at `path` (percent-decoded, from
    "/"), and its header fields; None for anything else. The checkpoint changes, tiles
    are bytes."""
    parts = path[1:].split("/")
    if any(not p or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
        return None  # "", ".", "..", dot files, directory paths
    try:
        real = directory.joinpath(*parts).resolve(strict=True)
        if not real.is_relative_to(directory) or not real.is_file():
            return None
        data = real.read_bytes()
    except (OSError, ValueError):
        return None
    if parts == ["checkpoint"]:
        return data, [("Content-Type", "text/plain; charset=utf-8"),
                      ("Cache-Control", "no-cache")]
    return data, [("Content-Type", "application/octet-stream")]


class TilesApp:
    """An ASGI app serving `directory` (every path; GET and HEAD only)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        if request.method not in ("GET", "HEAD"):
            response: Response = PlainTextResponse(
                "405 Method Not Allowed\n", status_code=405,
                headers={"Allow": "GET, HEAD", "X-Content-Type-Options": "nosniff"})
        else:
            response = tile_response(self.directory, scope["path"])
        await response(scope, receive, send)


def tile_response(root: Path, path: str) -> Response:
    """The file at `path` below `root`, or 404. A file read of a few KiB: done on the
    loop."""
    found = tile_resource(root, path)
    if found is None:
        return PlainTextResponse("404 Not Found\n", status_code=404,
                                 headers={"X-Content-Type-Options": "nosniff"})
    data, headers = found
    response = Response(data)
    for name, value in [*headers, ("X-Content-Type-Options", "nosniff")]:
        response.headers.append(name, value)
    return response


def tiles_listener(directory: Path, sock: socket.socket, limits: Limits = LIMITS) -> Listener:
    """The listener of `audit.tiles_listen` (or of `audit tiles --listen`) on `sock`."""
    return Listener("audit tiles", sock, build_app([], fallback=TilesApp(directory)), limits)


class TileServer(Standalone):
    """The tiles directory over HTTP on a loop of its own (`netfilter audit tiles
    --listen`): bound at construction (a port in use fails at once, as OSError), or on
    `sock`; call `serve_forever`, then `shutdown` and `server_close`."""

    def __init__(self, directory: str | Path, host: str, port: int, *,
                 limits: Limits = LIMITS, sock: socket.socket | None = None) -> None:
        self.directory = Path(directory).resolve()
        super().__init__([tiles_listener(self.directory, sock or bind_tcp(host, port),
                                         limits)])


def serve_tiles(directory: str | Path, host: str, port: int) -> TileServer:
    """A read-only HTTP server over the tiles directory (call serve_forever)."""
    return TileServer(directory, host, port)
