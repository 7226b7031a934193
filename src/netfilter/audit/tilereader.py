"""A node's tree read from its tlog-tiles, each tile checked against a signed root.

The right-edge tiles of every level hash to the checkpoint's root (as in
`tiles._tree_root`); any other tile is full, and its root must be the hash its parent
tile holds for it, up to an edge tile. So every hash handed out is one the signed root
commits to, and a proof computed from them (`merkle.consistency_proof` through
`subtree_hash`) fails only if the log itself is inconsistent. Only the tiles a
question needs are fetched, each once.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from netfilter.audit import merkle
from netfilter.audit.tiles import WIDTH, tile_path
from netfilter.errors import NetfilterError

__all__ = ["Get", "TileError", "TileReader", "parse_bundle"]

Get = Callable[[str, int], "bytes | None"]
"""(path below the log's URL, byte limit) -> body, None when the file is absent."""


class TileError(NetfilterError):
    """A tile or entry bundle does not match the signed checkpoint."""


def parse_bundle(data: bytes, count: int, where: str) -> list[bytes]:
    """The entries of a tlog-tiles entry bundle: big-endian uint16 length, then bytes."""
    out: list[bytes] = []
    at = 0
    while at < len(data):
        if at + 2 > len(data):
            raise TileError(where, "an entry bundle cut inside a length")
        (length,) = struct.unpack_from("!H", data, at)
        at += 2
        if at + length > len(data):
            raise TileError(where, "an entry bundle cut inside an entry")
        out.append(data[at : at + length])
        at += length
    if len(out) < count:
        raise TileError(where, f"an entry bundle of {len(out)} entries, not {count}")
    return out[:count]


class TileReader:
    """The hashes of the tree of `size` leaves whose root is `root`, from tiles.

    A `merkle.SubtreeHashReader`; raises TileError for a tile that is missing, of the
    wrong length, or does not hash to the root."""

    def __init__(self, get: Get, size: int, root: bytes) -> None:
        self._get = get
        self.size = size
        self._counts: list[int] = []  # hashes at tree level 8*L, per tile level L
        n = size
        while n:
            self._counts.append(n)
            n >>= 8
        self._checked: dict[tuple[int, int], list[bytes]] = {}
        self._check_edge(root)

    def _width(self, level: int, index: int) -> int:
        return min(WIDTH, self._counts[level] - index * WIDTH)

    def _fetch(self, level: int | str, index: int, width: int, limit: int) -> bytes:
        """A tile of `width` items, or its full tile when the partial one is gone
        (c2sp.org/tlog-tiles: a log may delete partial tiles once the full one exists)."""
        path = tile_path(level, index, width)
        data = self._get(path, limit)
        if data is None and width < WIDTH:
            path = tile_path(level, index)
            data = self._get(path, limit if level == "entries" else WIDTH * merkle.HASH_SIZE)
        if data is None:
            raise TileError(path, "not served (404)")
        return data

    def _hashes(self, level: int, index: int) -> list[bytes]:
        """A hash tile's hashes, unchecked: exactly its width (or a full tile's)."""
        width = self._width(level, index)
        data = self._fetch(level, index, width, width * merkle.HASH_SIZE)
        if len(data) < width * merkle.HASH_SIZE or (
                len(data) != width * merkle.HASH_SIZE and len(data) != WIDTH * merkle.HASH_SIZE):
            raise TileError(tile_path(level, index, width),
                            f"{len(data)} bytes, not {width} hashes")
        size = merkle.HASH_SIZE
        return [data[i : i + size] for i in range(0, width * size, size)]

    def _check_edge(self, root: bytes) -> None:
        """Fetch the right-edge tile of each level and fold them to the root: every
        other tile is then checked against a parent that is checked."""
        h: bytes | None = None
        for level, count in enumerate(self._counts):
            width = count % WIDTH
            hashes = self._hashes(level, count // WIDTH) if width else []
            if width:
                self._checked[(level, count // WIDTH)] = hashes
            items = hashes if h is None else [*hashes, h]
            if items:
                h = merkle.root(items)
        if (h or merkle.EMPTY_ROOT) != root:
            edge = ", ".join(tile_path(level, count // WIDTH, count % WIDTH)
                             for level, count in enumerate(self._counts) if count % WIDTH)
            raise TileError(edge or "tile/", "the tiles do not hash to the checkpoint's "
                                             "root (tampered or stale tiles)")

    def tile(self, level: int, index: int) -> list[bytes]:
        """The hashes of tile (level, index), checked against its parent."""
        done = self._checked.get((level, index))
        if done is not None:
            return done
        if not 0 <= level < len(self._counts) or not 0 <= index < -(-self._counts[level]
                                                                    // WIDTH):
            raise ValueError(f"tiles: no tile ({level}, {index}) in a tree of {self.size}")
        hashes = self._hashes(level, index)
        assert len(hashes) == WIDTH, "tiles: bad math (an edge tile left unchecked)"
        parent = self.tile(level + 1, index // WIDTH)
        if merkle.root(hashes) != parent[index % WIDTH]:
            raise TileError(tile_path(level, index), "does not hash to the hash its parent "
                                                     f"tile {tile_path(level + 1, index // WIDTH)}"
                                                     " holds (tampered tile)")
        self._checked[(level, index)] = hashes
        return hashes

    # merkle.SubtreeHashReader
    def subtree_hash(self, level: int, index: int) -> bytes:
        tile_level, sub = divmod(level, 8)
        start = index << sub  # its first hash at tree level 8 * tile_level
        hashes = self.tile(tile_level, start // WIDTH)
        at = start % WIDTH
        part = hashes[at : at + (1 << sub)]
        if len(part) != 1 << sub:
            raise ValueError(f"tiles: no complete subtree ({level}, {index})")
        return merkle.root(part)

    def leaf_hashes(self, start: int, end: int) -> Sequence[bytes]:
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"tiles: leaves [{start}, {end}) not in a tree of {self.size}")
        out: list[bytes] = []
        for index in range(start // WIDTH, -(-end // WIDTH)):
            lo = index * WIDTH
            out.extend(self.tile(0, index)[max(start, lo) - lo : min(end, lo + WIDTH) - lo])
        return out

    def entries(self, index: int, limit: int) -> list[bytes]:
        """The entry bundle of leaves 256*index.., as many entries as the tree has."""
        width = self._width(0, index)
        data = self._fetch("entries", index, width, limit)
        return parse_bundle(data, width, tile_path("entries", index, width))
