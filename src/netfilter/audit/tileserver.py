"""The read-only HTTP server over a tlog-tiles directory (see `tiles.write_tiles`), for
auditors and witnesses: GET and HEAD of regular files below the directory only; no
listings, no dot files, nothing a path or a link leads out to. Connection limits and
time-outs are `netfilter.httpd`'s.
"""

from __future__ import annotations

import socket
from pathlib import Path

from netfilter.httpd import (
    MAX_CONNECTIONS,
    MAX_PER_CLIENT,
    MAX_REQUESTS,
    TIMEOUT,
    ReadOnlyServer,
    Resource,
)

__all__ = ["TileServer", "serve_tiles", "tile_resource"]


class TileServer(ReadOnlyServer):
    """The tiles directory over HTTP (call serve_forever in a thread of its own)."""

    name = "audit tiles"

    def __init__(self, directory: str | Path, host: str, port: int, *,
                 timeout: float = TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                 max_per_client: int = MAX_PER_CLIENT,
                 max_requests: int = MAX_REQUESTS, sock: socket.socket | None = None) -> None:
        """`sock`: already bound and listening on host:port (see ReadOnlyServer)."""
        self.directory = Path(directory).resolve()
        super().__init__(host, port, timeout=timeout, max_connections=max_connections,
                         max_per_client=max_per_client, max_requests=max_requests,
                         sock=sock)

    def resource(self, path: str) -> Resource | None:
        """See `tile_resource`."""
        return tile_resource(self.directory, path)


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


def serve_tiles(directory: str | Path, host: str, port: int) -> TileServer:
    """A read-only HTTP server over the tiles directory (call serve_forever)."""
    return TileServer(directory, host, port)
