"""The one object front-ends talk to: a URL or host in, a Verdict out.

The engine decides, records and reloads; front-ends only translate a Verdict into
their protocol (an RCODE and EDE, an HTTP status and stop page). Lists are swapped
atomically on reload; a bundle that fails verification leaves the old lists in force.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from netfilter.aggregate import BlockAggregator
from netfilter.canonical import InvalidURL, canonical_parts
from netfilter.config import Settings
from netfilter.errors import NetfilterError
from netfilter.events import Event, EventSink, NullSink
from netfilter.expiry import ExpiryWatch
from netfilter.listfile import Transparency
from netfilter.lists import Lists, ListSource, VersionFloor, load_lists
from netfilter.matcher import Match
from netfilter.memo import remember
from netfilter.privacy import ClientRecorder
from netfilter.ratelimit import RateLimit

__all__ = ["Action", "Answer", "Engine", "Verdict", "origin_hosts"]

log = logging.getLogger(__name__)


class Action(StrEnum):
    ALLOW = "allow"
    BLOCK = "block"


class Answer(StrEnum):
    """How a resolver answers a blocked name (per list, from the configuration)."""

    NXDOMAIN = "nxdomain"
    STOPPAGE = "stoppage"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Allow, or block with the matching entry, how to answer and the list's own text.

    An allowed verdict may still carry a `match`: a block lifted by a local exception.
    """

    action: Action
    match: Match | None = None
    answer: Answer | None = None
    transparency: Transparency | None = None

    @property
    def blocked(self) -> bool:
        return self.action is Action.BLOCK


ALLOW = Verdict(Action.ALLOW)


HOST_CACHE_SIZE = 1 << 17  # names; cleared wholesale when full
SINK_FAILURE_LOG_INTERVAL = 10.0  # seconds between two "event sink failed" lines


# `scheme://host[:port]` made only of characters whose canonical form is plain: a path
# appended to it cannot change its host.
_PLAIN_ORIGIN = re.compile(r"[a-z][a-z0-9+.\-]*://[A-Za-z0-9_.\-]+(?::[0-9]{1,5})?").fullmatch


def origin_hosts(*origins: str) -> tuple[str, ...] | None:
    """The canonical host of every URL `origin + path`, whatever the path, one per
    origin (`scheme://host[:port]`); None when an origin has characters (escapes,
    brackets, '@', ...) that call for the full check of each URL.

    What `Engine.urls_free` takes: front-ends keep these per origin without knowing
    how a URL is canonicalized."""
    hosts = []
    for origin in origins:
        if _PLAIN_ORIGIN(origin) is None:
            return None
        try:
            hosts.append(canonical_parts(origin + "/")[0])
        except InvalidURL:
            return None
    return tuple(hosts)


@dataclass(frozen=True)
class _State:
    lists: Lists
    answers: dict[str, Answer]
    # Resolvers see the same names again and again: remember each name's match for
    # as long as these lists are in force (a reload starts a new, empty cache).
    host_matches: dict[str, Match | None] = field(default_factory=dict)
    # Proxies see the same hosts again and again: whether any URL on them can match.
    urls_free: dict[str, bool] = field(default_factory=dict)


class Engine:
    """Checks and records; thread-safe (the state is one immutable object)."""

    def __init__(self, settings: Settings, sink: EventSink | None = None, *,
                 pseudonym_key: Callable[[str], bytes] | None = None,
                 floor: VersionFloor | None = None) -> None:
        """`pseudonym_key(day)` shares the day's client-pseudonym key (the audit log's);
        `floor`, the node's durable record of installed versions, refuses a list older
        than one the node had in force before, also after a restart (node.make_engine).

        With an audit section, block events reach `sink` aggregated per
        `audit.aggregate_window` (aggregate.py); `close()` passes on what is pending."""
        self.settings = settings
        self.sink: EventSink = sink or NullSink()
        window = settings.audit.aggregate_window if settings.audit else 0.0
        self.recorder: EventSink = (BlockAggregator(self.sink, window) if window > 0
                                    else self.sink)
        self._sink_failures = 0
        # For metrics, plain counts (a dict increment per match, nothing per clean
        # check): matches by (front-end, list, category, action) and reloads by result.
        self.matches: Counter[tuple[str, str, str, str]] = Counter()
        # `+=` on a Counter is a read, an add and a store: two threads (Unbound's
        # workers) can lose a count between them. Taken per match only, never per
        # clean check; reloads count under _reload_lock.
        self._counts_lock = threading.Lock()
        self.reloads: Counter[str] = Counter()
        self._sink_failure_lines = RateLimit(SINK_FAILURE_LOG_INTERVAL)
        self.node_id = settings.node.id
        form = settings.audit.client if settings.audit else "pseudonym"
        self.clients = ClientRecorder(form, pseudonym_key)
        self.record_targets = bool(settings.audit and settings.audit.record_targets)
        if form == "full":
            self._emit(Event("config-changed", self.node_id, action="client=full",
                             detail="client addresses are recorded in full (audit.client)"))
        if self.record_targets:
            self._emit(Event("config-changed", self.node_id, action="record_targets=true",
                             detail="blocked URLs and names are recorded (audit.record_targets)"))
        self._reload_lock = threading.Lock()
        self.floor = floor
        self.expiry = ExpiryWatch(self)
        self._state = self._load({})
        # The host cache of the lists in force, for a resolver's fast path: a name
        # whose value here is None matches no entry, so it may be forwarded without a
        # call. Read-only for callers; replaced with the state on reload.
        self.host_cache: dict[str, Match | None] = self._state.host_matches

    # ------------------------------------------------------------ lists

    @staticmethod
    def _sources(s: Settings) -> list[ListSource]:
        return [
            ListSource(
                path=s.resolve(item.path),
                trusted_keys=[s.resolve(k) for k in item.trust],
                hmac_key=s.resolve(item.hmac_key) if item.hmac_key else None,
                on_expiry=item.on_expiry,
            )
            for item in s.lists
        ]

    def _load(self, installed: dict[str, int], settings: Settings | None = None) -> _State:
        s = settings or self.settings
        try:
            lists = load_lists(
                self._sources(s),
                local_block=s.resolve(s.local.block) if s.local.block else None,
                local_allow=s.resolve(s.local.allow) if s.local.allow else None,
                installed=installed,
                floor=self.floor,
            )
        except NetfilterError as e:
            self._emit(Event("list-refused", self.node_id, detail=str(e)[:500]))
            raise
        by_path = {s.resolve(item.path): Answer(item.action) for item in s.lists}
        answers = {b.manifest.list_id: by_path.get(b.path, Answer.STOPPAGE)
                   for b in lists.bundles}
        answers["local"] = Answer(s.local.action)
        for bundle in lists.bundles:
            m = bundle.manifest
            self._emit(Event("list-loaded", self.node_id, list=m.list_id, version=m.version,
                             detail=f"entries={m.entries} key={bundle.signer.id}"))
        for warning in lists.warnings:
            self._emit(Event("list-expired", self.node_id, detail=warning))
        self.expiry.loaded(lists)
        return _State(lists, answers)

    @property
    def lists(self) -> Lists:
        return self._state.lists

    def reload(self, settings: Settings | None = None, *, changed: str = "") -> bool:
        """Load the configured lists again; on any failure keep the lists in force.

        With `settings` (a config re-read on SIGHUP), the lists and local lists are
        those of the new settings, which are kept only when they load; `changed` names
        what changed, for the `config-changed` event recorded then. Node and audit
        settings are read once, at start: pass the ones in force for those."""
        with self._reload_lock:
            try:
                state = self._load(self._state.lists.versions(), settings)
            except NetfilterError as e:
                self.reloads["refused"] += 1
                log.error("list reload refused, previous lists stay in force: %s", e)
                return False
            if settings is not None and settings != self.settings:
                self.settings = settings
                self._emit(Event("config-changed", self.node_id, action="reload",
                                 detail=f"config re-read: {changed or 'applied'}"[:500]))
            self._state = state
            self.host_cache = state.host_matches
            self.reloads["ok"] += 1
            return True

    def off_fast_path(self, name: str) -> None:
        """Forget that `name` matches nothing, so a resolver's fast path (which forwards
        unasked only the names `host_cache` maps to None) hands its next query to the
        full path: for names a front-end answers itself, such as the canaries."""
        self.host_cache.pop(name, None)

    # ------------------------------------------------------------ checks

    def _verdict(self, match: Match | None, state: _State, frontend: str,
                 client: str | None, detail: str | None, checked: str | bytes) -> Verdict:
        if match is None:
            return ALLOW
        transparency = next((m.transparency for m in state.lists.blocking
                             if m.list_id == match.list_id), None)
        self._emit(self._event(match, frontend, client, detail, checked))
        if not match.blocks:
            self._count((frontend, match.list_id, match.category, "exception"))
            return Verdict(Action.ALLOW, match)
        answer = state.answers.get(match.list_id, Answer.STOPPAGE)
        self._count((frontend, match.list_id, match.category, answer.value))
        return Verdict(Action.BLOCK, match, answer, transparency)

    def _event(self, match: Match, frontend: str, client: str | None, detail: str | None,
               checked: str | bytes, count: int = 1) -> Event:
        """The block or override event of `count` identical checks."""
        target = None
        if self.record_targets:  # an operator's explicit choice (audit.record_targets)
            target = checked.decode("utf-8", "replace") if isinstance(checked, bytes) else checked
        now = datetime.now(UTC).isoformat(timespec="milliseconds") if count > 1 else ""
        return Event("block" if match.blocks else "override", self.node_id,
                     time=now, frontend=frontend, list=match.list_id,
                     version=match.list_version, ref=match.ref, category=match.category,
                     action="block" if match.blocks else "allow",
                     client=self.clients.record(client),
                     detail=detail if match.blocks else f"exception={match.allowed_by}",
                     target=target[:2000] if target else None,
                     count=count if count > 1 else None, first=now or None, last=now or None)

    def record_repeats(self, verdict: Verdict, checked: str, count: int, *,
                       frontend: str = "dns", client: str | None = None,
                       detail: str | None = None) -> None:
        """`count` more blocks of a `verdict` this engine gave for `checked`, answered
        without a check each (the C relay answers repeats from its cache, dns/udp.py):
        recorded as `count` checks would have been, as one event with a count that the
        aggregation folds like `count` single blocks, so the log's counts stay exact."""
        match = verdict.match
        if count < 1 or match is None or not verdict.blocked or verdict.answer is None:
            return
        self._emit(self._event(match, frontend, client, detail, checked, count))
        self._count((frontend, match.list_id, match.category, verdict.answer.value), count)

    def _count(self, key: tuple[str, str, str, str], count: int = 1) -> None:
        with self._counts_lock:
            self.matches[key] += count

    def check_url(self, url: str | bytes, *, frontend: str = "proxy",
                  client: str | None = None, detail: str | None = None) -> Verdict:
        """Verdict for a full URL; raises InvalidURL when it has no host."""
        state = self._state
        return self._verdict(state.lists.check_url(url), state, frontend, client, detail, url)

    def check_url_at(self, origin: str, path: str, *, frontend: str = "proxy",
                     client: str | None = None, detail: str | None = None) -> Verdict:
        """Verdict for the URL of a request's parts: `origin` (`scheme://host[:port]`)
        and its target `path` (with query; a missing leading '/' is added). The
        engine, not the front-end, canonicalizes; raises InvalidURL."""
        if not path.startswith("/"):
            path = f"/{path}"
        return self.check_url(origin + path, frontend=frontend, client=client, detail=detail)

    def check_host(self, name: str, *, frontend: str = "dns",
                   client: str | None = None, detail: str | None = None) -> Verdict:
        """Verdict for a host name from domain-level entries only (DNS, TLS SNI)."""
        state = self._state
        match = remember(state.host_matches, name, state.lists.check_host, HOST_CACHE_SIZE)
        return self._verdict(match, state, frontend, client, detail, name)

    def urls_free(self, hosts: tuple[str, ...]) -> bool:
        """True when no URL on any of these canonical hosts (`origin_hosts`) can
        match an entry under the lists in force: `check_url` would return ALLOW for
        every path and record nothing, so a proxy may skip it. Cached per list state."""
        state = self._state
        for host in hosts:
            if not remember(state.urls_free, host, state.lists.urls_free, HOST_CACHE_SIZE):
                return False
        return True

    def host_has_url_entries(self, name: str) -> bool:
        """First stage: should this host's URLs be looked at (proxy, DNS routing)?"""
        return self._state.lists.host_has_url_entries(name)

    def _emit(self, event: Event) -> None:
        try:
            self.recorder.record(event)
        except Exception as e:  # a failing sink must never take a front-end down
            with self._counts_lock:
                self._sink_failures += 1
            # one line per interval, not a traceback per event: a flood of blocks
            # against a broken sink must not become a flood of log
            if self._sink_failure_lines.due():
                log.error("event sink failed (%s: %s); %d failures in all", type(e).__name__,
                          str(e)[:200], self._sink_failures)

    def expiry_policies(self) -> dict[str, str]:
        """`on_expiry` of each list in force, by list id."""
        by_path = {self.settings.resolve(item.path): item.on_expiry
                   for item in self.settings.lists}
        return {b.manifest.list_id: by_path.get(b.path, "enforce")
                for b in self.lists.bundles}

    def record(self, event: Event) -> None:
        """An event of the node's own (a list expiring in force): to the sink, never
        raising."""
        self._emit(event)

    def record_refusal(self, reason: str) -> None:
        """A list refused before it reached the engine (a config re-read checks the
        bundles first): recorded as the engine's own refusals are."""
        self._emit(Event("list-refused", self.node_id, detail=reason[:500]))

    def stats(self) -> dict[str, int]:
        """For metrics: events the sink refused, and the aggregation's counts."""
        out = {"sink_failures": self._sink_failures}
        if isinstance(self.recorder, BlockAggregator):
            out.update(self.recorder.stats())
        return out

    def flush(self) -> None:
        """Pass on the counts of open aggregation windows now (tests, reports)."""
        if isinstance(self.recorder, BlockAggregator):
            self.recorder.flush()

    def close(self) -> None:
        """Pass on what aggregation holds, then close the sink (a last checkpoint): the
        aggregator's close does both; without one, the recorder is the sink."""
        self.expiry.close()
        self.recorder.close()
