"""The audit log's tiles and checkpoint (C2SP tlog-tiles) as routes, for auditors and
witnesses: GET and HEAD of regular files below the tiles directory only; no listings,
no dot files, nothing a path or a link leads out to.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from netfilter.audit.tileserver import tile_resource

__all__ = ["tile_routes"]


def tile_routes(directory: Path, prefix: str = "") -> list[Route]:
    """Routes serving `directory` below `prefix` ("" or "/something")."""
    root = directory.resolve()

    async def tile(request: Request) -> Response:
        # a file read of a few KiB: done on the loop, as the old server did
        found = tile_resource(root, "/" + request.path_params["path"])
        if found is None:
            return PlainTextResponse("404 Not Found\n", status_code=404,
                                     headers={"X-Content-Type-Options": "nosniff"})
        data, headers = found
        response = Response(data)
        for name, value in [*headers, ("X-Content-Type-Options", "nosniff")]:
            response.headers.append(name, value)
        return response

    return [Route(prefix + "/{path:path}", tile, methods=["GET", "HEAD"])]
