"""The audit log as the engine's event sink: appends on their own thread, never waited on.

Front-ends call `record` on their hot path; it only serialises the event and queues
it, and never waits: when the queue is full (the store's lock held by another
process, a full disk) the event is shed, counted, logged loudly at most once per
`SHED_LOG_INTERVAL`, and the count itself is appended as a `shed` event once the
store takes writes again, so the log says what it lost. DNS and proxy answers go on.

Two threads, each with its own store connection: the appender only appends batches
(one transaction each, leaf indexes assigned inside it); the keeper signs a
checkpoint every `checkpoint_interval` seconds, keeps the tiles and applies
retention. Checkpoints and tiles can take seconds on a large log; on the appender's
thread they starved it, and a crash then lost far more than the linger.

What a kill -9 can lose is bounded by time and by count: events recorded in the last
`linger` seconds (0.25 s) plus, while the store is slow, at most `queue_size`
queued events. A checkpoint is signed at start when the log holds events that no
checkpoint covers (an unclean stop), so they are covered from then on.
"""

from __future__ import annotations

import logging
import queue
import secrets
import sqlite3
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from netfilter.audit.checkpoint import Checkpoint, sign_checkpoint
from netfilter.audit.merkle import CompactRange, leaf_hash
from netfilter.audit.note import Signer
from netfilter.audit.store import AuditStore, StoredCheckpoint
from netfilter.audit.tiles import Refresh, write_tiles
from netfilter.errors import KeyExistsError, KeyFileError
from netfilter.events import Event
from netfilter.keys import PrivateKey, generate_keypair, load_private_key
from netfilter.ratelimit import RateLimit

__all__ = ["AuditLog", "load_node_key"]

log = logging.getLogger(__name__)
_STOP = b""
SHED_LOG_INTERVAL = 10.0  # seconds between two "shedding" lines
RETRY_DELAY = 1.0  # seconds between two tries of a failed append


def load_node_key(path: Path) -> PrivateKey:
    """The node's Ed25519 key, created (NAME.key 0600 + NAME.pub) on first start."""
    if path.suffix != ".key":
        raise KeyFileError(path, "a node key must be a NAME.key file (NAME.pub beside it)")
    if not path.exists():
        try:
            generate_keypair(path.with_suffix(""))
            log.info("created node key %s", path)
        except KeyExistsError:  # another process of this node made it first: use that one
            pass
    return load_private_key(path)


def frontier_bytes(compact: CompactRange) -> bytes:
    return b"".join(compact.hashes)


def frontier_range(size: int, data: bytes) -> CompactRange:
    return CompactRange(size, [data[i : i + 32] for i in range(0, len(data), 32)])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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
        queue_size: int = 16384,
        batch_size: int = 4096,
        tiles: Path | None = None,
        linger: float = 0.25,
    ) -> None:
        """`tiles`: a directory kept up to date in the C2SP tlog-tiles layout.

        `queue_size`: events held in memory for the appender; past it, events are
        shed (counted), never waited for. It bounds what a crash can lose by count.

        `linger`: after an event arrives, the appender waits this long for more before
        it commits them together. Each wake-up of the appender takes the GIL from
        the front-end's thread a few times (every SQLite call releases and retakes
        it); at a few blocks per second that cost a proxy ~2% of its throughput, one
        commit per event. Events are committed at most `linger` seconds after they
        were recorded (while the store takes writes); close() and flush() cut it short.
        """
        self.store = store
        self.origin = origin
        self.signer = Signer.from_private_key(origin, key)
        self.retention_days = retention_days
        self.checkpoint_interval = checkpoint_interval
        self.batch_size = min(batch_size, queue_size)  # in memory: two queues' worth at most
        self.linger = linger
        self._wake = threading.Event()  # set by close() and flush(): stop lingering
        self._stop = threading.Event()  # tells the keeper to end
        self.queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_size)
        self.shed = 0  # events dropped because the queue was full (a metric)
        self.shed_blocks = 0  # the blocks those events counted (aggregated ones weigh more)
        self._blocks_recorded = 0
        self._shed_recorded = 0  # the count the log itself already says it lost
        self._shed_since = ""  # when the first event not yet recorded as shed was shed
        self._shed_lines = RateLimit(SHED_LOG_INTERVAL)  # the loud line, rate-limited
        self.append_failures = 0  # failed append transactions, retried (a metric)
        self.appended = 0
        # time.time() when this process last found the stored tree covered by a signed
        # checkpoint (signed here or by another writer, or empty); 0.0: not yet (a metric)
        self.last_checkpoint_time = 0.0
        self._keys: dict[str, bytes] = {}
        self._closed = False
        self.tiles = tiles
        self._refresh_tiles: Refresh = False
        # the witness lines the tiles' checkpoint file carries, by checkpoint size
        self._published_cosignatures: dict[int, list[tuple[str, str]]] = {}
        self._retained_day = ""  # the UTC day retention last ran
        self._lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._appender = threading.Thread(target=self._append_loop, name="audit-appender",
                                          daemon=True)
        self._keeper = threading.Thread(target=self._keep, name="audit-keeper", daemon=True)
        self._appender.start()
        self._keeper.start()

    # ------------------------------------------------------------ sink side

    def record(self, event: Event) -> None:
        if not event.time:
            event = replace(event, time=_now())
        data = event.to_json().encode()
        if self._closed:  # late events (shutdown races) are written, never dropped
            self._append([data])
            return
        try:
            self.queue.put_nowait(data)
        except queue.Full:
            self._count_shed((event.count or 1) if event.type == "block" else 0)

    def _count_shed(self, blocks: int) -> None:
        with self._lock:
            self.shed += 1
            self.shed_blocks += blocks
            if not self._shed_since:
                self._shed_since = _now()
        new = self._shed_lines.due()
        if not new:
            return
        log.error("audit: the log is not taking writes (store locked or disk full?): "
                  "%d events shed since the last report, %d in all; answers go on",
                  new, self.shed)

    def pseudonym_key(self, day: str) -> bytes:
        """The key of `day` for client pseudonyms, shared through the store by every
        process of the node, and destroyed by retention with that day's events.

        If the key store cannot be reached (locked, disk full), a key of this process
        serves for the day: pseudonyms then differ between processes, but no answer
        waits on the disk."""
        key = self._keys.get(day)
        if key is None:
            fresh = secrets.token_bytes(32)
            try:
                key = self.store.pseudonym_key(day, fresh)
            except Exception as e:  # the disk or the database: never the front-end's problem
                log.error("audit: cannot keep the pseudonym key of %s (%s); using a key of "
                          "this process for the day", day, e)
                key = fresh
            self._keys[day] = key
        return key

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, int]:
        """Counters for metrics and the shutdown line."""
        return {"appended": self.appended, "queued": self.queue.qsize(), "shed": self.shed,
                "shed_blocks": self.shed_blocks, "append_failures": self.append_failures}

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
        """Commit what is queued, sign a last checkpoint, stop both threads."""
        self._stop.set()
        self.queue.put(_STOP)  # the appender takes it after what is queued
        self._wake.set()
        self._appender.join(timeout=60)
        self._keeper.join(timeout=60)
        self._closed = True
        self._record_shed()
        self.checkpoint()
        log.info("audit: %s", " ".join(f"{k}={v}" for k, v in sorted(self.stats().items())))
        if self.shed:
            log.error("audit: %d events were shed in all while the log took no writes",
                      self.shed)

    # ------------------------------------------------------------ the appender

    def _append_loop(self) -> None:
        while True:
            try:
                first = self.queue.get(timeout=1.0)
            except queue.Empty:
                self._record_shed()
                continue
            if first != _STOP and self.linger > 0 and self.queue.qsize() < self.batch_size:
                self._wake.wait(self.linger)  # busy: no waiting
            batch = [first]
            while len(batch) < self.batch_size:
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
            self._record_shed()

    def _record_shed(self) -> None:
        """Once the store takes writes again, the log itself says how much it lost."""
        with self._lock:
            lost, since = self.shed - self._shed_recorded, self._shed_since
            blocks = self.shed_blocks - self._blocks_recorded
            self._shed_recorded, self._blocks_recorded = self.shed, self.shed_blocks
            self._shed_since = ""
        if lost:  # count: the blocks lost, so reports can still add up every answer
            event = Event("shed", self.origin, action="drop", time=_now(),
                          detail=f"events={lost} blocks={blocks} since={since}", count=blocks)
            self._append([event.to_json().encode()])

    def _append(self, events: list[bytes]) -> None:
        rows = [(leaf_hash(e), e, e[e.find(b'"time":"') + 8 :][:10].decode()) for e in events]
        while True:
            try:
                self.store.append(rows)
                self.appended += len(rows)
                return
            except Exception as e:  # the disk or the database: keep the events, retry
                self.append_failures += 1
                if self.append_failures == 1 or self.append_failures % 60 == 0:
                    log.error("audit: append failed (%s); retrying every %.0f s, events "
                              "queue meanwhile and are shed when the queue is full",
                              e, RETRY_DELAY)
                time.sleep(RETRY_DELAY)

    # ------------------------------------------------------------ the keeper

    def _keep(self) -> None:
        """Checkpoints every interval; retention at start and when the UTC day turns
        (it works in whole days, and finding what to remove reads the whole table)."""
        self._safely(self._checkpoint_after_unclean_stop)
        self._safely(self._apply_retention)
        while not self._stop.wait(self.checkpoint_interval):
            self._safely(self.checkpoint)
            if datetime.now(UTC).strftime("%Y-%m-%d") != self._retained_day:
                self._safely(self._apply_retention)

    def _checkpoint_after_unclean_stop(self) -> None:
        latest = self.store.latest_checkpoint()
        size = self.store.size()
        if size and (latest is None or latest.size < size):
            # after an unclean stop, or another writer of the node's just now: either way
            # they are covered from here on
            log.info("audit: signing a checkpoint over %d events no checkpoint covers yet",
                     size - (latest.size if latest else 0))
            self.checkpoint()
        elif latest is not None and self.tiles is not None:
            # a kill between signing and writing the tiles leaves them behind the
            # checkpoint until the next event: bring them up now (only what changed)
            with self._checkpoint_lock:
                write_tiles(self.store, self.tiles, refresh=self._refresh_tiles)

    @staticmethod
    def _safely(step: object) -> None:
        try:
            step()  # type: ignore[operator]
        except (sqlite3.OperationalError, OSError) as e:
            # the store not taking writes (locked, disk full): an operator's fault, said
            # in one line; the next interval tries again
            log.error("audit: background step failed (%s), tried again at the next "
                      "interval: %s", getattr(step, "__name__", "?").lstrip("_"), e)
        except Exception:
            log.exception("audit: background step failed")

    def checkpoint(self) -> StoredCheckpoint | None:
        """Sign the tree as stored now (any process may; one per size is kept)."""
        with self._checkpoint_lock:
            return self._checkpoint()

    def _checkpoint(self) -> StoredCheckpoint | None:
        size = self.store.size()
        if size == 0:
            self.last_checkpoint_time = time.time()  # nothing to cover
            return None
        latest = self.store.latest_checkpoint()
        if latest is not None and latest.size == size:
            self.last_checkpoint_time = time.time()
            self._publish_cosignatures(latest)
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
        self.last_checkpoint_time = time.time()
        if self.tiles is not None:
            write_tiles(self.store, self.tiles, refresh=self._refresh_tiles)
            self._refresh_tiles = False
            self._published_cosignatures = {size: self.store.cosignatures(size)}
        return stored

    def _publish_cosignatures(self, latest: StoredCheckpoint) -> None:
        """Witness lines stored since the tiles were written (`audit cosign` runs in
        another process) go out with the checkpoint file at the next interval; only this
        keeper writes the tiles, so a cosigning command never races it."""
        if self.tiles is None:
            return
        lines = self.store.cosignatures(latest.size)
        if lines != self._published_cosignatures.get(latest.size):
            write_tiles(self.store, self.tiles, refresh=self._refresh_tiles)
            self._refresh_tiles = False
            self._published_cosignatures = {latest.size: lines}

    def _apply_retention(self) -> None:
        """Remove the bodies of events older than the retention period.

        The `retention` event is appended first, naming what is about to go: a crash
        in between leaves an announced removal still to do, never bodies gone without
        the log saying so (which `verify` would call a targeted deletion)."""
        now = datetime.now(UTC)
        cutoff = (now - timedelta(days=self.retention_days)).strftime("%Y-%m-%d")
        self._keys = {d: k for d, k in self._keys.items() if d >= cutoff}
        due = self.store.removable_before(cutoff)
        if due:  # recorded directly: never wait on the queue
            event = Event("retention", self.origin, action="remove", time=_now(),
                          detail=f"removed={due} before={cutoff}")
            self._append([event.to_json().encode()])
        when = now.isoformat(timespec="seconds")
        if self.store.remove_before(cutoff, when):
            # removed bodies must leave the entry bundles too: only those bundles
            self._refresh_tiles = self.store.removed_range(when) or True
        self._retained_day = now.strftime("%Y-%m-%d")
