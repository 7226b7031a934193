"""The audit log's tiles and checkpoint (C2SP tlog-tiles) as routes, for auditors and
witnesses: GET and HEAD of regular files below the tiles directory only; no listings,
no dot files, nothing a path or a link leads out to.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from netfilter.audit.tileserver import tile_resource

__all__ = ["TilesApp", "tile_routes"]


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
    loop, as the old server did."""
    found = tile_resource(root, path)
    if found is None:
        return PlainTextResponse("404 Not Found\n", status_code=404,
                                 headers={"X-Content-Type-Options": "nosniff"})
    data, headers = found
    response = Response(data)
    for name, value in [*headers, ("X-Content-Type-Options", "nosniff")]:
        response.headers.append(name, value)
    return response


def tile_routes(directory: Path, prefix: str = "") -> list[Route]:
    """Routes serving `directory` below `prefix` ("" or "/something"), for an app that
    serves other things too."""
    root = directory.resolve()

    async def tile(request: Request) -> Response:
        return tile_response(root, "/" + request.path_params["path"])

    return [Route(prefix + "/{path:path}", tile, methods=["GET", "HEAD"])]
