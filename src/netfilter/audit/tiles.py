"""The log in the C2SP tlog-tiles layout, so existing transparency tooling can follow it.

    checkpoint                      the latest signed checkpoint
    tile/<L>/<N>[.p/<W>]            256 hashes of tree level 8*L (partial: W of them)
    tile/entries/<N>[.p/<W>]        the events of leaves 256*N.., each a big-endian
                                    uint16 length and the canonical JSON

Tiles cover the tree of the latest checkpoint. An event whose body retention removed
is served as an empty entry; its leaf hash stays in the level-0 tile, so the tree
still verifies. `write_tiles` fills a static directory any web server can serve
(files 0644, directories 0755: tiles are public by design);
`netfilter.web.tiles` serves it read-only over HTTP (on the node's web stack).

The tiles of a log are append-only, so `write_tiles` writes only what changed since
the checkpoint the directory holds: the new full tiles and the partial ones, from the
new leaves alone (a level-L hash is the root of a full level-(L-1) tile; the hashes
already published come back from the partial tiles on disk). Memory is a few tiles
per level whatever the log's size. A partial tile is deleted once its full tile is
written, as c2sp.org/tlog-tiles allows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from netfilter.audit.checkpoint import Checkpoint
from netfilter.audit.merkle import EMPTY_ROOT, HASH_SIZE, root
from netfilter.audit.store import AuditStore, StoredCheckpoint
from netfilter.audit.witness import with_cosignatures
from netfilter.errors import NetfilterError

__all__ = ["tile_path", "write_tiles"]

WIDTH = 256
FILE_MODE = 0o644
DIR_MODE = 0o755
_READ_BATCH = 16 * WIDTH  # rows per store query: ~1 MiB of events

Refresh = bool | tuple[int, int]
"""Entry bundles to rewrite after retention removed bodies: all, or an index range."""


def tile_path(level: int | str, index: int, width: int = WIDTH) -> str:
    """`tile/<L>/<N>` with N in 3-digit groups, `x` before all but the last."""
    digits = f"{index:d}"
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    encoded = "/".join([f"x{g}" for g in groups[:-1]] + [groups[-1]])
    suffix = "" if width == WIDTH else f".p/{width}"
    return f"tile/{level}/{encoded}{suffix}"


def _bundle(events: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("!H", len(e)) + e for e in events)


def _encode(level: int | str, items: Sequence[bytes]) -> bytes:
    return _bundle(items) if level == "entries" else b"".join(items)


def _parse(note: bytes) -> Checkpoint:
    """The checkpoint in a signed note (its text ends at the blank line); ValueError."""
    return Checkpoint.parse((note.split(b"\n\n", 1)[0] + b"\n").decode())


def _tree_root(levels: list[list[bytes]]) -> bytes:
    """MTH of the tree whose partial tiles are `levels` (level 0 first).

    The hashes left of a level's partial tile are all in the partial tiles above it,
    and RFC 9162 splits a range at a multiple of 256**L, so each level's partial
    tile plus the root of everything right of it hashes like a row of leaves."""
    h: bytes | None = None
    for hashes in levels:
        items = hashes if h is None else [*hashes, h]
        if items:
            h = root(items)
    return EMPTY_ROOT if h is None else h


class _Stale(Exception):
    """The directory does not hold this log's tree: write it all."""


class _Directory:
    """Writes of one call: atomic replacements, public modes whatever the umask."""

    def __init__(self, base: Path) -> None:
        self.base = base
        if not base.is_dir():
            base.mkdir(parents=True)
            os.chmod(base, DIR_MODE)
        self._dirs = {base}

    def _mkdir(self, directory: Path) -> None:
        if directory in self._dirs:
            return
        if not directory.is_dir():
            self._mkdir(directory.parent)
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory)
                os.chmod(directory, DIR_MODE)
        self._dirs.add(directory)

    def put(self, relative: str, data: bytes) -> None:
        target = self.base / relative
        self._mkdir(target.parent)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), FILE_MODE)  # mkstemp makes 0600
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def tile(self, level: int | str, index: int, items: Sequence[bytes], *,
             prefixes: bool) -> None:
        """Write a tile; a full one drops its partial tiles. With `prefixes`, the
        other partial tiles of a partial one are rewritten as its prefixes (they may
        be foreign, or hold bodies retention removed) or deleted (wider ones)."""
        self.put(tile_path(level, index, len(items)), _encode(level, items))
        partials = self.base / f"{tile_path(level, index)}.p"
        if len(items) == WIDTH:
            shutil.rmtree(partials, ignore_errors=True)
            return
        if not prefixes or not partials.is_dir():
            return
        for name in os.listdir(partials):
            width = int(name) if name.isdecimal() else 0
            if 0 < width < len(items):
                self.put(tile_path(level, index, width), _encode(level, items[:width]))
            elif width > len(items):
                with contextlib.suppress(OSError):
                    os.unlink(partials / name)

    def read_hashes(self, level: int, index: int, width: int) -> list[bytes]:
        try:
            data = (self.base / tile_path(level, index, width)).read_bytes()
        except OSError:
            raise _Stale from None
        if len(data) != width * HASH_SIZE:
            raise _Stale
        return [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]


def _published(directory: _Directory, latest: StoredCheckpoint) -> Checkpoint | None:
    """The checkpoint the directory holds, if it can be extended to `latest`.

    Not for another origin or a larger tree, nor unreadable, nor written before tiles
    were public (0600 files: a full write fixes their modes)."""
    path = directory.base / "checkpoint"
    try:
        if not os.stat(path).st_mode & 0o004:
            return None
        held = _parse(path.read_bytes())
        ours = _parse(latest.note)
    except (OSError, ValueError):
        return None
    if held.origin != ours.origin or held.size > ours.size:
        return None
    return held


def _read_events(store: AuditStore, start: int, end: int) -> Iterator[tuple[bytes, bytes]]:
    """(leaf hash, body) of leaves start..end-1, in order; a missing row raises."""
    expected = start
    for leaf in store.leaves(start, end, batch=_READ_BATCH):
        if leaf.index != expected:
            break
        yield leaf.hash, b"" if leaf.event is None else leaf.event
        expected += 1
    if expected != end:
        raise NetfilterError(store.path, f"leaf {expected} is missing from the store")


def _refresh(store: AuditStore, directory: _Directory, size: int, lo: int, hi: int) -> None:
    """Rewrite the entry bundles of leaves lo..hi-1 published at `size`, and the older
    partial bundles beside the last one, so removed bodies leave every file."""
    first = max(0, lo) // WIDTH * WIDTH
    end = min(hi, size)
    if first >= end:
        return
    end = min(size, -(-end // WIDTH) * WIDTH)
    chunk: list[bytes] = []
    at = first
    for _, event in _read_events(store, first, end):
        chunk.append(event)
        if len(chunk) == WIDTH:
            directory.tile("entries", at // WIDTH, chunk, prefixes=True)
            at += WIDTH
            chunk = []
    if chunk:
        directory.tile("entries", at // WIDTH, chunk, prefixes=True)


def _write(store: AuditStore, directory: _Directory, latest: StoredCheckpoint,
           held: Checkpoint | None, refresh: Refresh) -> None:
    """Extend the tiles of `held` (None: from nothing) to `latest`, checkpoint last."""
    old, new = (held.size if held else 0), latest.size
    full = held is None
    start = old - old % WIDTH  # the partial tiles at `old` are written again, longer
    levels: list[list[bytes]] = [store.leaf_hashes(start, old)]
    index = [old // WIDTH]
    while old >> (8 * len(levels)):
        at = old >> (8 * len(levels))
        width = at % WIDTH
        levels.append(directory.read_hashes(len(levels), at // WIDTH, width) if width else [])
        index.append(at // WIDTH)
    if held is not None and _tree_root(levels) != held.root:
        raise _Stale  # tiles that do not hash to the checkpoint beside them
    if refresh and not full:
        lo, hi = refresh if isinstance(refresh, tuple) else (0, old)
        _refresh(store, directory, old, lo, hi)
    if held is not None and held.size == new:
        if held.root != latest.root:
            raise _Stale
        directory.put("checkpoint", with_cosignatures(store, latest))
        return
    before = [(i, len(hashes)) for i, hashes in zip(index, levels, strict=True)]
    levels[0] = []  # read again below, with the events

    def full_tile(level: int) -> None:
        """Write level's full tile; its root is the next hash one level up."""
        hashes = levels[level]
        directory.tile(level, index[level], hashes, prefixes=full)
        index[level] += 1
        levels[level] = []
        if level + 1 == len(levels):
            levels.append([])
            index.append(0)
        levels[level + 1].append(root(hashes))
        if len(levels[level + 1]) == WIDTH:
            full_tile(level + 1)

    events: list[bytes] = []
    for h, event in _read_events(store, start, new):
        events.append(event)
        levels[0].append(h)
        if len(events) == WIDTH:
            directory.tile("entries", index[0], events, prefixes=full)
            events = []
            full_tile(0)
    if _tree_root(levels) != latest.root:
        if not full:
            raise _Stale  # hashes on disk from another tree of the same origin
        raise NetfilterError(store.path, f"the leaves do not hash to checkpoint {new}")
    if events:
        directory.tile("entries", index[0], events, prefixes=full)
    for level, hashes in enumerate(levels):
        was = before[level] if level < len(before) else None
        if hashes and (full or was != (index[level], len(hashes))):
            directory.tile(level, index[level], hashes, prefixes=full)
    # last: readers never see tiles missing
    directory.put("checkpoint", with_cosignatures(store, latest))


def write_tiles(store: AuditStore, out: str | Path, *, refresh: Refresh = False) -> int:
    """Bring the directory to the latest checkpoint's tree; returns its size.

    Only the tiles that changed since the checkpoint the directory holds are written;
    a directory holding another tree is written anew. `refresh`: rewrite the entry
    bundles of leaves lo..hi-1 (True: all), after retention removed their bodies."""
    latest = store.latest_checkpoint()
    if latest is None:
        raise NetfilterError(store.path, "no signed checkpoint yet")
    directory = _Directory(Path(out))
    held = _published(directory, latest)
    if held is not None:
        try:
            _write(store, directory, latest, held, refresh)
            return latest.size
        except _Stale:
            pass
    _write(store, directory, latest, None, refresh)
    return latest.size
