"""The audit log at scale: a checkpoint with tiles at 1M and 10M events, and the latest
checkpoint among 130,000.

Checkpoint (`-m slow`): a store of N = 1M / 10M leaves is built by `AuditStore.append`
of synthetic canonical block events (229-238 bytes, as the engine writes them) in batches
of 100,000, with a signed checkpoint at N, in a temporary directory deleted after. Each
measured step runs in a fresh interpreter (this file run as a script) that reports its
wall time and its peak resident memory during the step (VmHWM, reset just before the
step through /proc/self/clear_refs):

- baseline: `write_tiles` into an empty directory, a full write (what a first start or
  a directory of another tree costs; streamed, so its memory is the new code's too);
- `AuditLog.checkpoint()` with tiles on after 1,000 new events: the incremental write
  (three rounds, each 1,000 more);
- the same checkpoint with the old `write_tiles` (below, as it was: every leaf hash
  and body of the log read into lists at every checkpoint) on the same directory.

Latest checkpoint (not slow): `AuditStore.latest_checkpoint()` with one checkpoint
stored (baseline) and with 130,000 (90 days at one a minute; notes and frontiers of
realistic size), and the old way, `checkpoints()[-1]`, which read them all.

Correctness is asserted (each write's size, the checkpoint file equals the store's
latest note); no timing is.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netfilter.audit.checkpoint import Checkpoint, sign_checkpoint
from netfilter.audit.log import AuditLog, frontier_bytes
from netfilter.audit.merkle import CompactRange, leaf_hash, root
from netfilter.audit.note import Signer
from netfilter.audit.store import AuditStore, StoredCheckpoint
from netfilter.audit.tiles import tile_path, write_tiles
from netfilter.events import Event
from netfilter.keys import PrivateKey, generate_keypair, load_private_key
from support import Figures

ORIGIN = "bench-node"
BATCH = 100_000
NEW_EVENTS = 1000
ROUNDS = 3  # incremental checkpoints measured at each size
CHECKPOINTS = 130_000  # 90 days at one a minute
MiB = 1 << 20
SIZES = [pytest.param(1_000_000, id="1M"), pytest.param(10_000_000, id="10M")]

_TEMPLATE = ('{"action":"block","category":"csam","client":"p:%024x","detail":"qtype=%s",'
             '"frontend":"dns","list":"authority-x","node":"bench-node","ref":"X-%d",'
             '"time":"%s","type":"block","version":7}')
_QTYPES = ("A", "AAAA", "HTTPS", "MX")


def events(first: int, count: int) -> list[tuple[bytes, bytes, str]]:
    """(leaf hash, canonical JSON, day) rows of events first..first+count: one every
    0.6 s from 2026-09-01, so 10M events span 70 days."""
    rows = []
    for i in range(first, first + count):
        ms = i * 600
        day = 1 + ms // 86_400_000
        s = ms // 1000 % 86_400
        when = (f"2026-{9 + (day - 1) // 30:02d}-{(day - 1) % 30 + 1:02d}T{s // 3600:02d}:"
                f"{s // 60 % 60:02d}:{s % 60:02d}.{ms % 1000:03d}+00:00")
        data = (_TEMPLATE % (i * 2654435761 % (1 << 96), _QTYPES[i % 4], i % 200_000,
                             when)).encode()
        rows.append((leaf_hash(data), data, when[:10]))
    return rows


def test_synthetic_events_are_the_engines() -> None:
    for h, data, day in events(9_999_998, 2):
        event = json.loads(data)
        assert Event(**event).to_json().encode() == data and leaf_hash(data) == h
        assert day == event["time"][:10] and 200 <= len(data) <= 250


def _signer(key: PrivateKey) -> Signer:
    return Signer.from_private_key(ORIGIN, key)


# ---------------------------------------------------------------- the child


class _Checkpointer(AuditLog):
    """AuditLog without its keeper thread: the checkpoint is taken when measured, and
    no retention scan runs beside it."""

    def _keep(self) -> None:
        return None


def _old_write_tiles(store: AuditStore, out: str | Path, *, refresh: bool = False) -> int:
    """write_tiles as it was before it became incremental (the baseline of the issue)."""
    latest = store.latest_checkpoint()
    assert latest is not None
    base = Path(out)

    def put(relative: str, data: bytes, keep: bool = False) -> None:
        target = base / relative
        if keep and target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)

    size = latest.size
    level_hashes = store.leaf_hashes(0, size)
    entries = [b"" if leaf.event is None else leaf.event for leaf in store.leaves(0, size)]
    for start in range(0, size, 256):
        chunk = entries[start : start + 256]
        put(tile_path("entries", start // 256, len(chunk)),
            b"".join(struct.pack("!H", len(e)) + e for e in chunk),
            keep=len(chunk) == 256 and not refresh)
    level = 0
    while level_hashes:
        for start in range(0, len(level_hashes), 256):
            chunk = level_hashes[start : start + 256]
            put(tile_path(level, start // 256, len(chunk)), b"".join(chunk),
                keep=len(chunk) == 256)
        complete = len(level_hashes) // 256
        level_hashes = [root(level_hashes[i * 256 : (i + 1) * 256]) for i in range(complete)]
        level += 1
    put("checkpoint", latest.note)
    return size


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One measured step in this fresh interpreter: "full", "incremental" or "old"."""
    store = AuditStore(cfg["store"])
    out = Path(cfg["tiles"])
    log = None
    if cfg["step"] != "full":
        if cfg["step"] == "old":
            import netfilter.audit.log

            netfilter.audit.log.write_tiles = _old_write_tiles  # type: ignore[assignment]
        log = _Checkpointer(store, origin=ORIGIN, key=load_private_key(Path(cfg["key"])),
                            checkpoint_interval=3600, tiles=out)
    store.latest_checkpoint()  # the connection open, the schema read
    before = _rss()["VmRSS"]
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        reset = True
    except OSError:
        reset = False
    start = time.perf_counter()
    if log is None:
        size = write_tiles(store, out)
    else:
        stored = log.checkpoint()
        assert stored is not None
        size = stored.size
    seconds = time.perf_counter() - start
    peak = _rss()["VmHWM"] if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if log is not None:
        log.close()
    return {"seconds": seconds, "size": size, "rss_before": before, "peak": peak,
            "hwm_reset": reset}


def run_child(cfg: dict[str, Any], directory: Path) -> dict[str, Any]:
    path = directory / "child.json"
    path.write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, __file__, str(path)], capture_output=True,
                          text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- checkpoint + tiles


@pytest.fixture
def scratch() -> Iterator[Path]:
    """On disk (the store of 10M events is ~3 GiB, its tiles ~2.5 GiB); deleted after."""
    directory = Path(tempfile.mkdtemp(prefix="netfilter-audit-scale-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def build_store(path: Path, size: int, key: PrivateKey) -> float:
    """A store of `size` synthetic events and a signed checkpoint at `size`."""
    store = AuditStore(path)
    compact = CompactRange()
    start = time.perf_counter()
    for at in range(0, size, BATCH):
        rows = events(at, min(BATCH, size - at))
        store.append(rows)
        compact.extend(h for h, _, _ in rows)
    note = sign_checkpoint(Checkpoint(ORIGIN, size, compact.root()), _signer(key))
    store.add_checkpoint(StoredCheckpoint(size, compact.root(), note, "2026-11-01T00:00:00",
                                          frontier_bytes(compact)))
    built = time.perf_counter() - start
    store.close()
    return built


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() \
        else sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_checkpoint_with_tiles(size: int, scratch: Path, figures: Figures) -> None:
    key_path, _ = generate_keypair(scratch / "node")
    key = load_private_key(key_path)
    db, tiles = scratch / "audit.sqlite", scratch / "tiles"
    built = build_store(db, size, key)
    label = f"{size // 1_000_000}M"
    table = f"audit checkpoint + tiles at {label} events, {NEW_EVENTS:,} new"
    memory = f"audit checkpoint + tiles at {label} events: peak RSS of the step (child)"
    figures.row(memory, "the store", f"built in {built:.0f} s (append + one checkpoint), "
                f"{_disk(db) / MiB:,.0f} MiB on disk")
    cfg = {"store": str(db), "tiles": str(tiles), "key": str(key_path)}

    def measured(step: str, name: str, note: str, *, baseline: bool = False) -> float:
        result = run_child({**cfg, "step": step}, scratch)
        store = AuditStore(db, create=False)
        latest = store.latest_checkpoint()
        assert latest is not None and result["size"] == latest.size == store.size()
        assert (tiles / "checkpoint").read_bytes() == latest.note
        store.close()
        figures.time(table, name, result["seconds"], baseline=baseline, unit="checkpoint",
                     note=note)
        grew = (result["peak"] - result["rss_before"]) / MiB
        figures.row(memory, name, f"peak {result['peak'] / MiB:,.0f} MiB "
                    f"(+{grew:,.0f} MiB over the {result['rss_before'] / MiB:.0f} MiB before)",
                    value=result["peak"])
        return float(result["seconds"])

    measured("full", "write_tiles, full write (empty directory)", "streamed", baseline=True)
    figures.row(memory, "the tiles directory", f"{_disk(tiles) / MiB:,.0f} MiB")
    rounds = []
    for n in range(ROUNDS):
        _append(db, NEW_EVENTS)
        rounds.append(measured("incremental", f"AuditLog.checkpoint(), incremental ({n + 1})",
                               "write_tiles reads the 1,000 new leaves"))
    _append(db, NEW_EVENTS)
    measured("old", "AuditLog.checkpoint(), old write_tiles", "reads every leaf and body")
    figures.row(memory, "incremental rounds", ", ".join(f"{s * 1000:.0f} ms" for s in rounds))


def _append(db: Path, count: int) -> None:
    store = AuditStore(db, create=False)
    store.append(events(store.size(), count))
    store.close()


# ---------------------------------------------------------------- latest checkpoint


def _fill_checkpoints(path: Path, count: int, key: PrivateKey) -> None:
    """`count` checkpoints of realistic size (one signed note reused for its length:
    latest_checkpoint reads, it does not verify), in one transaction."""
    AuditStore(path).close()
    signature = sign_checkpoint(Checkpoint(ORIGIN, 1, bytes(32)), _signer(key))
    signature = signature[signature.index(b"\n\n"):]
    db = sqlite3.connect(path)
    rows = []
    for i in range(1, count + 1):
        size = i * 77  # 10M events over 90 days
        h = hashlib.sha256(b"%d" % i).digest()
        note = b"%s\n%d\n%s\n" % (ORIGIN.encode(), size, base64.b64encode(h)) + signature
        rows.append((size, h, note, "2026-11-01T00:00:00", h * size.bit_count()))
    db.executemany("INSERT INTO checkpoints (size, root, note, created, frontier)"
                   " VALUES (?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()


def _per_call(fn: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best


def test_latest_checkpoint(tmp_path: Path, figures: Figures) -> None:
    key = load_private_key(generate_keypair(tmp_path / "node")[0])
    one, many = tmp_path / "one.sqlite", tmp_path / "many.sqlite"
    _fill_checkpoints(one, 1, key)
    _fill_checkpoints(many, CHECKPOINTS, key)
    table = f"audit latest_checkpoint(), {CHECKPOINTS:,} checkpoints stored"
    small, big = AuditStore(one, create=False), AuditStore(many, create=False)
    latest = big.latest_checkpoint()
    assert latest is not None and latest.size == CHECKPOINTS * 77
    figures.time(table, "latest_checkpoint(), 1 stored", _per_call(small.latest_checkpoint,
                                                                  1000),
                 baseline=True, unit="call")
    figures.time(table, f"latest_checkpoint(), {CHECKPOINTS:,} stored",
                 _per_call(big.latest_checkpoint, 1000), unit="call")
    tracemalloc.start()
    start = time.perf_counter()
    assert big.checkpoints()[-1] == latest
    old = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    start = time.perf_counter()
    big.checkpoints()
    untraced = time.perf_counter() - start
    figures.time(table, f"old: checkpoints()[-1], {CHECKPOINTS:,} stored", untraced,
                 unit="call", note=f"held {peak / MiB:,.0f} MiB at its peak (tracemalloc)")
    figures.row(f"{table}: the store", "size on disk",
                f"{many.stat().st_size / MiB:,.0f} MiB; tracemalloc'd old call {old:.2f} s")


if __name__ == "__main__":
    print(json.dumps(child(json.loads(Path(sys.argv[1]).read_text()))))
