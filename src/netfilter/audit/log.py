"""The audit log as the engine's event sink: batched appends on a writer thread.

Front-ends call `record` on their hot path; it only serialises the event and queues
it. A writer thread appends whole batches in one transaction and, every
`checkpoint_interval` seconds, signs a checkpoint of the tree as stored. The queue is
bounded: when it is full, `record` waits (back-pressure) and the wait is counted,
so no event is ever dropped silently.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from netfilter.audit.checkpoint import Checkpoint, sign_checkpoint
from netfilter.audit.merkle import CompactRange, leaf_hash
from netfilter.audit.note import Signer
from netfilter.audit.store import AuditStore, StoredCheckpoint
from netfilter.audit.tiles import write_tiles
from netfilter.errors import KeyFileError
from netfilter.events import Event
from netfilter.keys import PrivateKey, generate_keypair, load_private_key

__all__ = ["AuditLog", "load_node_key"]

log = logging.getLogger(__name__)
_STOP = b""


def load_node_key(path: Path) -> PrivateKey:
    """The node's Ed25519 key, created (NAME.key 0600 + NAME.pub) on first start."""
    if path.suffix != ".key":
        raise KeyFileError(path, "a node key must be a NAME.key file (NAME.pub beside it)")
    if not path.exists():
        generate_keypair(path.with_suffix(""))
        log.info("created node key %s", path)
    return load_private_key(path)


def frontier_bytes(compact: CompactRange) -> bytes:
    return b"".join(compact.hashes)


def frontier_range(size: int, data: bytes) -> CompactRange:
    return CompactRange(size, [data[i : i + 32] for i in range(0, len(data), 32)])


class AuditLog:
    """An EventSink that appends to the tamper-evident log."""

    def __init__(
        self,
        store: AuditStore,
        *,
        origin: str,
        key: PrivateKey,
        retention_days: int = 90,
        checkpoint_interval: float = 60.0,
        queue_size: int = 65536,
        batch_size: int = 4096,
        tiles: Path | None = None,
        linger: float = 0.25,
    ) -> None:
        """`tiles`: a directory kept up to date in the C2SP tlog-tiles layout.

        `linger`: after an event arrives, the writer waits this long for more before
        it commits them together. Each wake-up of the writer thread takes the GIL from
        the front-end's thread a few times (every SQLite call releases and retakes
        it); at a few blocks per second that cost a proxy ~2% of its throughput, one
        commit per event. Events are committed at most `linger` seconds after they
        were recorded; close() and flush() do not wait for it.
        """
        self.store = store
        self.origin = origin
        self.signer = Signer.from_private_key(origin, key)
        self.retention_days = retention_days
        self.checkpoint_interval = checkpoint_interval
        self.batch_size = batch_size
        self.linger = linger
        self._wake = threading.Event()  # set by close() and flush(): stop lingering
        self.queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_size)
        self.waits = 0  # record() calls that had to wait for room (a metric)
        self.appended = 0
        self._keys: dict[str, bytes] = {}
        self._closed = False
        self.tiles = tiles
        self._refresh_tiles = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ sink side

    def record(self, event: Event) -> None:
        if not event.time:
            event = replace(event, time=datetime.now(UTC).isoformat(timespec="milliseconds"))
        data = event.to_json().encode()
        if self._closed:  # late events (shutdown races) are written, never dropped
            self._append([data])
            return
        try:
            self.queue.put_nowait(data)
        except queue.Full:
            with self._lock:
                self.waits += 1
            self.queue.put(data)

    def pseudonym_key(self, day: str) -> bytes:
        """The key of `day` for client pseudonyms, shared through the store by every
        process of the node, and destroyed by retention with that day's events."""
        key = self._keys.get(day)
        if key is None:
            key = self._keys[day] = self.store.pseudonym_key(day, secrets.token_bytes(32))
        return key

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued event is committed."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        try:
            while self.queue.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            self._wake.clear()

    def close(self) -> None:
        """Commit what is queued, sign a last checkpoint, stop the writer."""
        self.queue.put(_STOP)
        self._wake.set()
        self._thread.join(timeout=60)
        self._closed = True
        self.checkpoint()

    # ------------------------------------------------------------ writer side

    def _run(self) -> None:
        next_checkpoint = time.monotonic() + self.checkpoint_interval
        self._apply_retention()
        while True:
            try:
                first = self.queue.get(timeout=min(1.0, self.checkpoint_interval))
            except queue.Empty:
                first = None
            if (first is not None and first != _STOP and self.linger > 0
                    and self.queue.qsize() < self.batch_size):  # busy: no waiting
                self._wake.wait(self.linger)
            batch = [] if first is None else [first]
            while first is not None and len(batch) < self.batch_size:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in batch
            events = [b for b in batch if b != _STOP]
            if events:
                self._append(events)
            for _ in batch:
                self.queue.task_done()
            if stop:
                return
            if time.monotonic() >= next_checkpoint:
                next_checkpoint = time.monotonic() + self.checkpoint_interval
                self._safely(self.checkpoint)
                self._safely(self._apply_retention)

    def _append(self, events: list[bytes]) -> None:
        rows = [(leaf_hash(e), e, e[e.find(b'"time":"') + 8 :][:10].decode()) for e in events]
        while True:
            try:
                self.store.append(rows)
                self.appended += len(rows)
                return
            except Exception:  # the disk or the database: keep the events, retry
                log.exception("audit: append failed; retrying in 1 s")
                time.sleep(1.0)

    @staticmethod
    def _safely(step: object) -> None:
        try:
            step()  # type: ignore[operator]
        except Exception:
            log.exception("audit: background step failed")

    def checkpoint(self) -> StoredCheckpoint | None:
        """Sign the tree as stored now (any process may; one per size is kept)."""
        size = self.store.size()
        if size == 0:
            return None
        latest = self.store.latest_checkpoint()
        if latest is not None and latest.size == size:
            return latest
        if latest is not None and latest.size < size:
            compact = frontier_range(latest.size, latest.frontier)
            start = latest.size
        else:
            compact, start = CompactRange(), 0
        for at in range(start, size, 1 << 16):
            compact.extend(self.store.leaf_hashes(at, min(size, at + (1 << 16))))
        root = compact.root()
        note = sign_checkpoint(Checkpoint(self.origin, size, root), self.signer)
        stored = StoredCheckpoint(size, root, note,
                                  datetime.now(UTC).isoformat(timespec="seconds"),
                                  frontier_bytes(compact))
        self.store.add_checkpoint(stored)
        if self.tiles is not None:
            write_tiles(self.store, self.tiles, refresh=self._refresh_tiles)
            self._refresh_tiles = False
        return stored

    def _apply_retention(self) -> None:
        cutoff = (datetime.now(UTC) - timedelta(days=self.retention_days)).strftime("%Y-%m-%d")
        removed = self.store.remove_before(cutoff, datetime.now(UTC).isoformat(timespec="seconds"))
        self._keys = {d: k for d, k in self._keys.items() if d >= cutoff}
        if removed:  # recorded by the writer itself: never wait on its own queue
            self._refresh_tiles = True  # removed bodies must leave the entry bundles too
            event = Event("retention", self.origin, action="remove",
                          time=datetime.now(UTC).isoformat(timespec="milliseconds"),
                          detail=f"removed={removed} before={cutoff}")
            self._append([event.to_json().encode()])
