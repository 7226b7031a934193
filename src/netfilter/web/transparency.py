"""What the public transparency page shows, as one JSON-ready snapshot (`/transparency.json`
is it as it is; `/transparency` renders it in en/de/fr).

The lists in force (from their signed manifests: issuer, legal basis, appeal address,
reporting hotline, entry counts by kind and category, dates, signing key id), versions
held for an operator (only that one is held: never its reason or content), the latest
signed checkpoint with its witness cosignatures, how to verify it, and blocks per day,
list and category. Nothing about a client or a blocked name is ever read into it: the
audit log is read only through `blockstats` (list, category, count) and its checkpoints.
A snapshot is made off the event loop, at most once a minute (`TTL`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from netfilter.audit.store import AuditStore
from netfilter.config import Settings
from netfilter.engine import Engine
from netfilter.errors import NetfilterError
from netfilter.listfile import Bundle
from netfilter.web.blockstats import BlockStats

__all__ = ["TTL", "TransparencySource"]

log = logging.getLogger(__name__)

TTL = 60.0  # seconds a snapshot is served before the next is made
MAX_CATEGORY_COUNT_ENTRIES = 50_000_000  # larger lists: counts by kind only


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _by_category(bundle: Bundle) -> dict[str, int]:
    """Entries per category, from the bundle's entry records (category index byte)."""
    manifest = bundle.manifest
    if manifest.entries > MAX_CATEGORY_COUNT_ENTRIES or "entries.bin" not in bundle.spans:
        return {}
    counts: Counter[str] = Counter()
    for chunk in bundle.chunks("entries.bin"):
        for index, count in Counter(chunk["category"].tolist()).items():
            if 0 <= index < len(manifest.categories):
                counts[manifest.categories[index]] += count
    return dict(sorted(counts.items()))


class TransparencySource:
    """Makes and caches the snapshot; one worker thread does all reading."""

    def __init__(self, settings: Settings, engine: Engine, *,
                 tiles_url: str | None = None, ttl: float = TTL) -> None:
        self.settings = settings
        self.engine = engine
        self.tiles_url = tiles_url
        self.ttl = ttl
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transparency")
        self._snapshot: dict[str, Any] | None = None
        self._made = 0.0
        self._pending: asyncio.Future[dict[str, Any]] | None = None
        self._categories: dict[tuple[str, int], dict[str, int]] = {}
        self._stats: BlockStats | None = None

    async def snapshot(self) -> dict[str, Any]:
        """The current snapshot (made now when older than the TTL; one at a time)."""
        if self._snapshot is not None and time.monotonic() - self._made < self.ttl:
            return self._snapshot
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().run_in_executor(self._worker, self.make)
        snapshot = await asyncio.shield(self._pending)
        self._snapshot, self._made = snapshot, time.monotonic()
        return snapshot

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ in the worker

    def make(self, now: datetime | None = None) -> dict[str, Any]:
        now = now or datetime.now(UTC)
        settings = self.settings
        stoppage = settings.stoppage
        data: dict[str, Any] = {
            "node": settings.node.id,
            "generated": _iso(now),
            "operator": {"name": stoppage.operator if stoppage else None,
                         "url": stoppage.operator_url if stoppage else None},
            "lists": self._lists(),
            "held": self._held(),
            "checkpoint": None,
            "blocks": None,
            "verify": self._verify(),
        }
        store = self._store()
        if store is not None:
            try:
                data["checkpoint"] = self._checkpoint(store)
                data["blocks"] = self._blocks(store, now)
            except Exception as e:  # the page goes on without them; said once per make
                log.warning("transparency: the audit log could not be read: %s", e)
        return data

    def _lists(self) -> list[dict[str, Any]]:
        out = []
        for bundle in self.engine.lists.bundles:
            m = bundle.manifest
            key = (m.list_id, m.version)
            if key not in self._categories:
                try:
                    self._categories[key] = _by_category(bundle)
                except (OSError, ValueError):  # a bundle swapped out and closed meanwhile
                    self._categories[key] = {}
            text = m.transparency
            out.append({
                "id": m.list_id, "version": m.version,
                "issuer": text.issuer, "legal_basis": text.legal_basis,
                "contact": text.contact, "appeal": text.appeal_url, "hotline": text.hotline_url,
                "translations": {lang: t.model_dump(exclude_none=True)
                                 for lang, t in sorted(text.translations.items())},
                "entries": {"total": m.entries, "domain": m.domain_entries,
                            "url": m.url_entries, "by_category": self._categories[key]},
                "published": _iso(m.issued), "expires": _iso(m.expires),
                "expired": bundle.expired, "signing_key_id": bundle.signer.id,
            })
        in_force = {(item["id"], item["version"]) for item in out}
        for key in [k for k in self._categories if k not in in_force]:
            del self._categories[key]  # versions replaced since: not kept forever
        return out

    def _held(self) -> list[dict[str, Any]]:
        from netfilter.updates.state import VersionState, state_path

        path = state_path(self.settings)
        if not path.exists():
            return []
        try:
            state = VersionState(path)
        except NetfilterError as e:  # the page goes on without them, and says so once
            log.warning("transparency: the list state could not be read: %s", e)
            return []
        try:
            return [{"list": h.list_id, "version": h.version, "held_since": _iso(h.held_at)}
                    for h in state.all_held()]
        finally:
            state.close()

    def _store(self) -> AuditStore | None:
        audit = self.settings.audit
        if audit is None:
            return None
        path = self.settings.resolve(audit.path)
        if not Path(path).exists():
            return None
        if self._stats is None:
            self._stats = BlockStats(AuditStore(path, create=False))
        return self._stats.store

    @staticmethod
    def _checkpoint(store: AuditStore) -> dict[str, Any] | None:
        latest = store.latest_checkpoint()
        if latest is None:
            return None
        return {"size": latest.size, "created": latest.created,
                "note": latest.note.decode("utf-8", "replace"),
                "cosignatures": [{"witness": w, "line": line}
                                 for w, line in store.cosignatures(latest.size)]}

    def _blocks(self, store: AuditStore, now: datetime) -> dict[str, Any]:
        assert self._stats is not None
        counts = self._stats.refresh(now)
        return {"days": self._stats.days, "complete": counts.complete,
                "counted_leaves": counts.counted, "log_size": counts.size,
                "per_day": [{"day": d, "list": li, "category": c, "count": n}
                            for (d, li, c), n in sorted(counts.counts.items(), reverse=True)]}

    def _verify(self) -> dict[str, Any]:
        from netfilter.audit.log import AuditLog

        sink = self.engine.sink
        vkey = sink.signer.verifier().vkey if isinstance(sink, AuditLog) else None
        node = self.settings.node.id
        url = self.tiles_url or "URL"
        return {
            "node_key": vkey,
            "tiles": self.tiles_url,
            "commands": [
                f"netfilter audit follow {url} --key {node}.pub --state DIR",
                f"netfilter audit verify --log FILE --trust {node}.pub",
            ],
        }
