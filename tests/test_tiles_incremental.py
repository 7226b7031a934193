"""write_tiles keeps a tlog-tiles directory current from the new leaves alone.

Held against the issue: after many checkpoints of growing sizes (across the level-1 and
level-2 boundaries, 256 and 65,536 leaves) the directory holds exactly what a fresh full
write holds; only the new leaves are read (a counting proxy of the store); a directory
holding another tree, a tampered or foreign checkpoint or tampered tiles is written
anew; files are 0644 and directories 0755 whatever the umask; `refresh` rewrites the
entry bundles of a removed range only; a full write holds no list of all leaves.
"""

from __future__ import annotations

import os
import stat
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netfilter.audit.checkpoint import Checkpoint, sign_checkpoint
from netfilter.audit.log import AuditLog, load_node_key
from netfilter.audit.merkle import CompactRange, leaf_hash
from netfilter.audit.note import Signer
from netfilter.audit.store import AuditStore, StoredCheckpoint, StoredLeaf
from netfilter.audit.tiles import tile_path, write_tiles
from netfilter.events import Event
from netfilter.keys import generate_keypair, load_private_key

ORIGIN = "gw-tiles.example"


class Log:
    """A store grown by direct appends (fast enough for 70,000 leaves) and signed."""

    def __init__(self, path: Path, origin: str = ORIGIN) -> None:
        self.store = AuditStore(path)
        self.signer = Signer.from_private_key(
            origin, load_private_key(generate_keypair(path.with_suffix(""))[0]))
        self.origin = origin
        self.compact = CompactRange()

    def grow(self, count: int, day: str = "2026-11-05") -> int:
        first = self.store.size()
        rows = []
        for i in range(first, first + count):
            event = b'{"i":%d,"origin":"%s"}' % (i, self.origin.encode())
            rows.append((leaf_hash(event), event, day))
        self.store.append(rows)
        self.compact.extend(h for h, _, _ in rows)
        return self.sign()

    def sign(self) -> int:
        size, root = self.compact.size, self.compact.root()
        note = sign_checkpoint(Checkpoint(self.origin, size, root), self.signer)
        self.store.add_checkpoint(StoredCheckpoint(size, root, note, "2026-11-05T00:00:00",
                                                   b"".join(self.compact.hashes)))
        return size


class Counting:
    """The store as write_tiles sees it, counting the leaf rows it reads."""

    def __init__(self, store: AuditStore) -> None:
        self.store, self.rows = store, 0
        self.path = store.path

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        out = self.store.leaf_hashes(start, end)
        self.rows += len(out)
        return out

    def leaves(self, *args: Any, **kwargs: Any) -> Iterator[StoredLeaf]:
        for leaf in self.store.leaves(*args, **kwargs):
            self.rows += 1
            yield leaf

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def write(store: AuditStore, out: Path, **kwargs: Any) -> int:
    """write_tiles through the counting proxy; returns the rows it read."""
    counting = Counting(store)
    write_tiles(counting, out, **kwargs)  # type: ignore[arg-type]
    return counting.rows


def files(base: Path) -> dict[str, bytes]:
    return {p.relative_to(base).as_posix(): p.read_bytes()
            for p in sorted(base.rglob("*")) if p.is_file()}


def entries(bundle: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(bundle):
        (length,) = struct.unpack_from("!H", bundle, at)
        out.append(bundle[at + 2 : at + 2 + length])
        at += 2 + length
    return out


def assert_same_tree(kept: Path, fresh: Path) -> None:
    """Every file of a fresh full write, byte for byte, and nothing else but the older
    partial tiles of a tile still partial (the spec's MUST: they serve older
    checkpoints), each a prefix of the current one."""
    ours, theirs = files(kept), files(fresh)
    for name, data in theirs.items():
        assert ours.get(name) == data, name
    for name in ours.keys() - theirs.keys():
        tile, _, width = name.partition(".p/")
        current = [n for n in theirs if n.startswith(f"{tile}.p/")]
        assert width.isdecimal() and len(current) == 1, name
        if tile.startswith("tile/entries/"):
            assert entries(ours[name]) == entries(theirs[current[0]])[: int(width)], name
        else:
            assert ours[name] == theirs[current[0]][: 32 * int(width)], name


def assert_public(base: Path) -> None:
    for path in [base, *base.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


@pytest.fixture
def narrow_umask() -> Iterator[None]:
    """The node's umask may be 077: the tiles must be public all the same."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


SIZES = (1, 2, 255, 256, 257, 300, 511, 512, 513, 1000, 65_535, 65_536, 65_537, 65_800,
         66_047, 66_048, 66_049, 70_001)


def test_many_checkpoints_equal_a_fresh_write(tmp_path: Path, narrow_umask: None) -> None:
    log = Log(tmp_path / "audit.sqlite")
    kept = tmp_path / "kept"
    for size in SIZES:
        before = log.store.size()
        log.grow(size - before)
        rows = write(log.store, kept)
        # the new leaves, and the partial tile's leaves read again (hashes and bodies)
        assert rows <= (size - before) + 2 * (before % 256), (size, rows)
        if size < 2000 or size == SIZES[-1]:
            fresh = tmp_path / f"fresh-{size}"
            assert write(log.store, fresh) == size  # a full write reads each leaf once
            assert_same_tree(kept, fresh)
    assert (kept / "checkpoint").read_bytes() == log.store.latest_checkpoint().note
    assert (kept / tile_path(2, 0, 1)).stat().st_size == 32  # 70,001 leaves: level 2
    assert not (kept / "tile/0/000.p").exists()  # full: its partial tiles are gone
    assert not (kept / "tile/1/000.p").exists()
    # still partial: the tiles of older checkpoints are kept (65,800 .. 70,001 leaves)
    assert sorted(os.listdir(kept / "tile/1/001.p"), key=int) == ["1", "2", "17"]
    assert_public(kept)


def test_audit_log_checkpoints_keep_the_tiles(tmp_path: Path, narrow_umask: None) -> None:
    """Through AuditLog.checkpoint(), as `netfilter serve` keeps them."""
    store = AuditStore(tmp_path / "audit.sqlite")
    out = tmp_path / "tiles"
    log = AuditLog(store, origin=ORIGIN, key=load_node_key(tmp_path / "node.key"),
                   checkpoint_interval=3600, tiles=out)
    for i in range(700):
        log.record(Event("block", ORIGIN, list="demo", ref=f"R-{i}", action="block"))
        if i % 97 == 0:
            log.flush()
            log.checkpoint()
    log.close()
    fresh = tmp_path / "fresh"
    write_tiles(store, fresh)
    assert_same_tree(out, fresh)
    assert_public(out)


def test_incremental_write_reads_only_new_leaves(tmp_path: Path) -> None:
    log = Log(tmp_path / "audit.sqlite")
    out = tmp_path / "tiles"
    log.grow(70_000)
    assert write(log.store, out) == 70_000
    log.grow(1000)  # 70,000 = 273 * 256 + 112: 112 leaves of the partial tile again
    assert write(log.store, out) == 1000 + 2 * 112
    log.grow(168)  # 71,000 = 277 * 256 + 88; now on a tile boundary
    assert write(log.store, out) == 168 + 2 * 88
    log.grow(1)
    assert write(log.store, out) == 1 + 2 * 0
    assert write(log.store, out) == 1  # nothing new: the partial tile's hash, checked
    fresh = tmp_path / "fresh"
    write_tiles(log.store, fresh)
    assert_same_tree(out, fresh)


def _full_rewrite_after(tmp_path: Path, spoil: Any) -> None:
    log = Log(tmp_path / "audit.sqlite")
    out = tmp_path / "tiles"
    log.grow(66_000)
    write(log.store, out)
    log.grow(50)
    spoil(out)
    assert write(log.store, out) >= 66_050  # every leaf: a full write
    fresh = tmp_path / "fresh"
    write_tiles(log.store, fresh)
    assert_same_tree(out, fresh)
    assert_public(out)


def _edit_checkpoint(edit: Any) -> Any:
    def spoil(out: Path) -> None:
        path = out / "checkpoint"
        path.write_bytes(edit(path.read_bytes()))
    return spoil


@pytest.mark.parametrize("spoil", [
    _edit_checkpoint(lambda note: note.replace(ORIGIN.encode(), b"other.example")),
    _edit_checkpoint(lambda note: note.replace(b"\n66000\n", b"\n99999\n")),  # larger
    _edit_checkpoint(lambda note: note.replace(b"\n66000\n", b"\n65000\n")),  # wrong root
    _edit_checkpoint(lambda note: b"not a checkpoint"),
    lambda out: (out / "checkpoint").unlink(),
    lambda out: (out / "checkpoint").chmod(0o600),  # written before tiles were public
    lambda out: (out / tile_path(2, 0, 1)).write_bytes(b"\x00" * 32),
    lambda out: (out / tile_path(1, 1, 1)).unlink(),  # 66,000 leaves: 257 level-1 hashes
], ids=["origin", "larger", "smaller", "garbage", "missing", "mode-0600",
        "tampered-tile", "missing-tile"])
def test_a_spoiled_directory_is_written_anew(tmp_path: Path, spoil: Any) -> None:
    _full_rewrite_after(tmp_path, spoil)


def test_a_damaged_signature_is_written_again(tmp_path: Path) -> None:
    """The text still names this tree and the tiles hash to its root: only the
    checkpoint file needs writing again."""
    log = Log(tmp_path / "audit.sqlite")
    out = tmp_path / "tiles"
    log.grow(1000)
    write_tiles(log.store, out)
    (out / "checkpoint").write_bytes((out / "checkpoint").read_bytes()[:-40])
    log.grow(10)
    assert write(log.store, out) == 10 + 2 * (1000 % 256)
    assert (out / "checkpoint").read_bytes() == log.store.latest_checkpoint().note


def test_another_tree_of_the_same_origin_is_replaced(tmp_path: Path) -> None:
    """A log started again (same node id, a new store): its old tiles must all go."""
    other = Log(tmp_path / "old.sqlite")
    other.store.append([(leaf_hash(b"x%d" % i), b"x%d" % i, "2026-01-01")
                        for i in range(3)])  # shifts every leaf after them
    other.compact.extend(leaf_hash(b"x%d" % i) for i in range(3))
    other.grow(66_000)
    out = tmp_path / "tiles"
    write_tiles(other.store, out)
    log = Log(tmp_path / "audit.sqlite")
    for size in (66_003, 66_003 + 256 * 3):  # aligned like the old one, then larger
        log.grow(size - log.store.size())
        write_tiles(log.store, out)
        fresh = tmp_path / f"fresh-{size}"
        write_tiles(log.store, fresh)
        assert_same_tree(out, fresh)


def test_refresh_rewrites_the_removed_range_only(tmp_path: Path) -> None:
    log = Log(tmp_path / "audit.sqlite")
    out = tmp_path / "tiles"
    log.grow(1000, day="2026-01-01")
    log.grow(2000, day="2026-03-01")
    for more in (10, 20):  # two partial bundles of the last tile (3,010 and 3,030)
        log.grow(more, day="2026-01-01")
        write_tiles(log.store, out)
    assert log.store.remove_before("2026-02-01", "2026-05-01T00:00:00") == 1030
    partial = 3030 - 2816  # the last tile's leaf hashes, read to check the directory
    rows = write(log.store, out, refresh=(0, 1000))
    assert rows == partial + 1024  # and the 4 entry bundles of leaves 0..999
    assert entries((out / tile_path("entries", 3)).read_bytes())[:232] == [b""] * 232
    assert entries((out / tile_path("entries", 3)).read_bytes())[232] != b""
    rows = write(log.store, out, refresh=(3000, 3030))
    assert rows == partial + partial  # the last bundle, read once for all its widths
    for width in (3010 - 2816, 3030 - 2816):
        bundle = entries((out / tile_path("entries", 11, width)).read_bytes())
        assert bundle[184:] == [b""] * (width - 184) and b"" not in bundle[:184]
    log.grow(5)
    assert write(log.store, out, refresh=True) == partial + 3030 + (3035 - 2816)
    fresh = tmp_path / "fresh"
    write_tiles(log.store, fresh)
    assert_same_tree(out, fresh)


def test_a_full_write_holds_a_few_tiles_not_the_log(tmp_path: Path) -> None:
    log = Log(tmp_path / "audit.sqlite")
    sizes: list[int] = []
    for count in (20_000, 60_000):
        log.grow(count - log.store.size())
        tracemalloc.start()
        write_tiles(log.store, tmp_path / f"tiles-{count}")
        sizes.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # the hashes and bodies of 60,000 leaves as Python objects would be ~7.5 MB: the
    # peak is the store's read batch, the same at 20,000 and at 60,000 leaves
    assert sizes[1] < 4_000_000 and sizes[1] < 1.25 * sizes[0], sizes
