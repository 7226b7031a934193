"""The log in the C2SP tlog-tiles layout, so existing transparency tooling can follow it.

    checkpoint                      the latest signed checkpoint
    tile/<L>/<N>[.p/<W>]            256 hashes of tree level 8*L (partial: W of them)
    tile/entries/<N>[.p/<W>]        the events of leaves 256*N.., each a big-endian
                                    uint16 length and the canonical JSON

Tiles cover the tree of the latest checkpoint. An event whose body retention removed
is served as an empty entry; its leaf hash stays in the level-0 tile, so the tree
still verifies. `write_tiles` fills a static directory any web server can serve;
`tileserver.serve_tiles` is a small read-only HTTP server for it.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

from netfilter.audit.merkle import root
from netfilter.audit.store import AuditStore
from netfilter.audit.tileserver import serve_tiles as serve_tiles  # moved; tests import it here
from netfilter.errors import NetfilterError

__all__ = ["tile_path", "write_tiles"]

WIDTH = 256


def tile_path(level: int | str, index: int, width: int = WIDTH) -> str:
    """`tile/<L>/<N>` with N in 3-digit groups, `x` before all but the last."""
    digits = f"{index:d}"
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    encoded = "/".join([f"x{g}" for g in groups[:-1]] + [groups[-1]])
    suffix = "" if width == WIDTH else f".p/{width}"
    return f"tile/{level}/{encoded}{suffix}"


def _write(base: Path, relative: str, data: bytes, *, keep: bool = False) -> None:
    target = base / relative
    if keep and target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)


def write_tiles(store: AuditStore, out: str | Path, *, refresh: bool = False) -> int:
    """Write checkpoint and tiles of the latest checkpoint's tree; returns its size.

    Full tiles never change, so existing ones are kept unless `refresh` (after
    retention removed event bodies, whose entry bundles must then be rewritten)."""
    latest = store.latest_checkpoint()
    if latest is None:
        raise NetfilterError(store.path, "no signed checkpoint yet")
    base = Path(out)
    size = latest.size
    level_hashes = store.leaf_hashes(0, size)
    entries = [b"" if leaf.event is None else leaf.event for leaf in store.leaves(0, size)]
    for start in range(0, size, WIDTH):
        chunk = entries[start : start + WIDTH]
        data = b"".join(struct.pack("!H", len(e)) + e for e in chunk)
        _write(base, tile_path("entries", start // WIDTH, len(chunk)), data,
               keep=len(chunk) == WIDTH and not refresh)
    level = 0
    while level_hashes:
        for start in range(0, len(level_hashes), WIDTH):
            chunk = level_hashes[start : start + WIDTH]
            _write(base, tile_path(level, start // WIDTH, len(chunk)), b"".join(chunk),
                   keep=len(chunk) == WIDTH)
        complete = len(level_hashes) // WIDTH
        level_hashes = [root(level_hashes[i * WIDTH : (i + 1) * WIDTH]) for i in range(complete)]
        level += 1
    _write(base, "checkpoint", latest.note)  # last: readers never see tiles missing
    return size
