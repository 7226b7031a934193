"""A small read-only HTTP server over a tlog-tiles directory (see `tiles.write_tiles`)."""

from __future__ import annotations

import functools
import http.server
import os
from pathlib import Path

__all__ = ["serve_tiles"]


class _ReadOnly(http.server.SimpleHTTPRequestHandler):
    """Files only: no directory listings, no writes, quiet logs."""

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(404)
        return None

    def log_message(self, format: str, *args: object) -> None:
        return None


def serve_tiles(directory: str | Path, host: str, port: int) -> http.server.HTTPServer:
    """A threaded read-only HTTP server over the tiles directory (call serve_forever)."""
    handler = functools.partial(_ReadOnly, directory=str(directory))
    return http.server.ThreadingHTTPServer((host, port), handler)
