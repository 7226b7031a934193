"""Events the engine hands to a sink: blocks, overrides, list loads and refusals.

The sink is a two-method protocol (record, close) so the audit log can replace the
interim JSON-lines writer without the engine changing. Events carry no blocked URL in
plain text: the list and entry reference identify what was blocked.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal, Protocol

__all__ = ["Event", "EventSink", "EventType", "JsonLinesSink", "MemorySink", "NullSink"]

# list-held: an update the sanity checks hold for an operator; list-confirmed and
# list-rejected: the operator's decision on it (the detail names the operator).
EventType = Literal["block", "override", "list-loaded", "list-refused", "list-expired",
                    "list-held", "list-confirmed", "list-rejected", "config-changed",
                    "retention", "shed"]


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    node: str
    time: str = ""
    # who decided: dns, proxy, stoppage, squid, icap; cli or dashboard for a held version
    frontend: str | None = None
    list: str | None = None
    version: int | None = None
    ref: str | None = None
    category: str | None = None
    action: str | None = None
    client: str | None = None  # in the configured form (privacy.py)
    detail: str | None = None  # non-personal protocol detail: qtype, HTTP method, reason
    target: str | None = None  # the blocked URL or name: only with audit.record_targets
    # An aggregated block (aggregate.py): this many identical blocks between first and
    # last; absent on a single block, which counts as one.
    count: int | None = None
    first: str | None = None
    last: str | None = None

    def to_json(self) -> str:
        """One JSON object, sorted keys, None fields left out, `time` now when empty."""
        # getattr over the names: `asdict` deep-copies every value and cost most of this.
        data = {k: v for k in _FIELDS if (v := getattr(self, k)) is not None}
        data["time"] = self.time or datetime.now(UTC).isoformat(timespec="milliseconds")
        return _ENCODER.encode(data)


_FIELDS = tuple(f.name for f in fields(Event))
# What json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False) builds per call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class EventSink(Protocol):
    def record(self, event: Event) -> None:
        """Take an event; must not block the caller on disk for long."""

    def close(self) -> None:
        """Commit what was taken and release the sink (the audit log signs a last
        checkpoint); every sink has it, so a caller never has to ask."""


class NullSink:
    """Records nothing (a `check` from the command line)."""

    def record(self, event: Event) -> None:
        return None

    def close(self) -> None:
        return None


class MemorySink:
    """Keeps events in a list (tests, `--explain`)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def record(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        """Nothing to release: the events stay readable after close."""


class JsonLinesSink:
    """One JSON object per line, appended and flushed per event (interim audit log)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def record(self, event: Event) -> None:
        line = event.to_json() + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
