"""Lists that expire while in force: said, recorded and, if configured, stopped.

A bundle's `expires` is checked when it is loaded; a node that runs for weeks must
also notice the moment a list in force passes it, without a reload. While a list is
expired the node says so once an hour (a log line; the metric
`netfilter_list_expiry_seconds` goes negative at once), records one `list-expired`
event per list version, and follows the list's `on_expiry`: `enforce` keeps it in
force, `stop` reloads the lists, which leaves it out. Never silent either way.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from netfilter.events import Event
from netfilter.ratelimit import RateLimit

if TYPE_CHECKING:
    from netfilter.engine import Engine
    from netfilter.lists import Lists

__all__ = ["CHECK_INTERVAL", "LINE_INTERVAL", "ExpiryWatch"]

log = logging.getLogger("netfilter.engine")

CHECK_INTERVAL = 60.0  # seconds between two looks at the lists in force
LINE_INTERVAL = 3600.0  # seconds between two lines about one expired list


class ExpiryWatch:
    """Looks at the engine's lists every `interval` seconds on a daemon thread, once
    some list in force has an expiry date; `check()` is one look (tests call it)."""

    def __init__(self, engine: Engine, interval: float | None = None,
                 line_interval: float = LINE_INTERVAL) -> None:
        self.engine = engine
        self.interval = CHECK_INTERVAL if interval is None else interval
        self._lines = RateLimit(line_interval)
        self._recorded: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def loaded(self, lists: Lists) -> None:
        """Lists were loaded (the load said and recorded the expired ones already:
        that counts as this hour's line); watch them when one can expire."""
        watch = bool(lists.stopped)
        for bundle in lists.bundles:
            m = bundle.manifest
            if m.expires is not None:
                watch = True
                if bundle.expired:
                    self._recorded.add((m.list_id, m.version))
                    self._lines.due(m.list_id)
        for text in lists.stopped:
            self._lines.due(text)
        if watch:
            self.start()

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="list-expiry",
                                                daemon=True)
                self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # the watch must outlive a bad moment (a reload failing)
                log.exception("list expiry check failed")

    def check(self, now: datetime | None = None) -> list[str]:
        """Say, record and apply the expiry of lists in force; the ids expired now."""
        engine = self.engine
        policies = engine.expiry_policies()
        expired: list[str] = []
        stop = False
        for bundle in engine.lists.bundles:
            m = bundle.manifest
            if m.expires is None or not m.is_expired(now or datetime.now(UTC)):
                continue
            expired.append(m.list_id)
            policy = policies.get(m.list_id, "enforce")
            what = ("still enforced (on_expiry: enforce)" if policy == "enforce"
                    else "no longer enforced (on_expiry: stop)")
            text = (f"list {m.list_id} version {m.version} expired at "
                    f"{m.expires.isoformat()}; {what}")
            if (m.list_id, m.version) not in self._recorded:
                self._recorded.add((m.list_id, m.version))
                engine.record(Event("list-expired", engine.node_id, list=m.list_id,
                                    version=m.version, detail=text))
            if self._lines.due(m.list_id):
                log.warning("%s; install a newer version", text)
            stop = stop or policy == "stop"
        for text in engine.lists.stopped:  # left out already: said once an hour still
            if self._lines.due(text):
                log.warning("%s; install a newer version", text)
        if stop:
            engine.reload()  # leaves the expired lists under `stop` out
        return expired
