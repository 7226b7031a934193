"""One check of every list's source, and the periodic task `serve` runs.

Per list with a `source` (config `lists[].source`), one check:

1. the bundle in place is read (verified); if it is newer than the state's record
   (installed by hand, or a crash came after the rename), the record follows it;
2. the source is asked with the validators of its last good answer, but only while
   the bundle in place is the recorded one (else the whole bundle is fetched, to
   repair); "not modified" ends the check, nothing is written;
3. the body is staged beside the bundle in place, fsynced, and verified completely
   (signature against the list's trusted keys, every member's hash, expiry);
4. its version and manifest digest are judged against the record (state.py): a lower
   version, or the same version with another digest, is refused (`list-refused`)
   unless the operator forces it (`--allow-rollback`, recorded as `list-loaded` with
   action `allow-rollback` and the operator's user name);
   a new version then passes the update sanity checks (sanity.py) or is held for an
   operator (held.py: `list-held`; the list in place stays);
5. it is renamed over the old bundle (install.py), the record is updated, a
   `list-loaded` event (action `install`) is recorded, and, after all lists, the
   `on_install` callback runs once (serve passes its reload).

A crash before 5's rename leaves the old bundle in place and the record unchanged;
after it, the new bundle is whole and step 1 of the next run brings the record up.

Freeze (TUF): when a check finds nothing newer and the version in force was issued
more than `updates.max_age` ago, an error line is logged at every check and a
`list-expired` event with action `freeze` is recorded once per version.

Checks are serialized across processes by an exclusive lock file beside the state
(a `list update` while `serve` checks is told so and does nothing).
"""

from __future__ import annotations

import fcntl
import getpass
import logging
import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from netfilter.config import ListSettings, Settings, UpdateSettings
from netfilter.digest import hmac_key_id, read_hmac_key
from netfilter.errors import BundleError, BundleExpired, NetfilterError
from netfilter.events import Event, EventSink
from netfilter.keys import PublicKey, load_public_key
from netfilter.listfile import Manifest, open_bundle
from netfilter.updates.delta import NoDelta, apply_from_source, lags
from netfilter.updates.fetch import FetchError, bundle_location, fetch, probe
from netfilter.updates.held import Stopped, held_versions, screen
from netfilter.updates.install import clean_stages, manifest_digest, place, stage, sync
from netfilter.updates.state import Judgement, Validators, VersionState, judge, refusal, state_path

__all__ = ["STEPS", "Outcome", "UpdateResult", "Updater"]

log = logging.getLogger(__name__)

# held: the sanity checks hold the new version for an operator (held.py); rejected:
# an operator rejected this version before (the list in place stays, no event).
Outcome = Literal["installed", "current", "refused", "failed", "busy", "held", "rejected"]
# The points of an install a test may stop at (the `step` callback is called there).
STEPS = ("downloaded", "synced", "verified", "renamed", "recorded")


@dataclass(frozen=True)
class UpdateResult:
    """What one check of one list's source came to."""

    path: Path  # the configured bundle
    source: str  # where it was fetched from (URL or path)
    outcome: Outcome
    list_id: str | None = None
    version: int | None = None  # in force after the check
    previous: int | None = None  # in force before, when it changed
    reason: str = ""  # why refused or failed
    not_modified: bool = False  # the source said so (nothing was downloaded)
    forced: bool = False  # installed with --allow-rollback
    frozen: bool = False  # the freeze alarm is raised
    held: int | None = None  # a version held for an operator (sanity checks)

    def line(self) -> str:
        """One line for the operator."""
        name = self.list_id or self.path.name
        if self.outcome == "installed":
            was = f" (was {self.previous})" if self.previous is not None else ""
            how = ", ROLLBACK forced by --allow-rollback" if self.forced else ""
            text = f"{name}: installed version {self.version}{was}{how} from {self.source}"
        elif self.outcome == "current":
            how = "not modified" if self.not_modified else "same version"
            text = f"{name}: up to date, version {self.version} ({how})"
        elif self.outcome == "busy":
            text = f"{name}: skipped, {self.reason}"
        elif self.outcome == "held":
            stays = ("nothing is in force" if self.version is None
                     else f"version {self.version} stays in force")
            text = (f"{name}: HELD version {self.held} for an operator, {stays}: "
                    f"{self.reason} (netfilter list confirm|reject {name} {self.held})")
        elif self.outcome == "rejected":
            text = f"{name}: {self.reason}; version {self.version} stays in force"
        else:
            text = f"{name}: {self.outcome}: {self.reason}"
        if self.held is not None and self.outcome != "held":
            text += f"; version {self.held} is HELD for an operator"
        if self.frozen:
            text += "; FREEZE ALARM: nothing newer than updates.max_age"
        return text


@dataclass(frozen=True)
class _InPlace:
    manifest: Manifest
    digest: str


class _Refused(NetfilterError):
    """A candidate bundle that must not be installed (recorded as list-refused)."""

    def __init__(self, where: object, reason: str, *, list_id: str | None = None,
                 version: int | None = None, kind: str = "verify") -> None:
        super().__init__(where, reason)
        self.list_id, self.version, self.kind = list_id, version, kind


class Updater:
    """Checks every list with a source: `run_once()` now, or `start()` a thread that
    checks every `updates.interval` (with jitter, and back-off after failures) until
    `stop()`.

    `sink` records the events (serve: the engine's recorder; `list update`: the
    node's event sink). `on_install(list_ids)` runs after a check installed something
    (serve: reload). `step(name)` is called at each of STEPS (tests stop there)."""

    def __init__(self, settings: Settings, sink: EventSink, *,
                 state: VersionState | None = None,
                 on_install: Callable[[list[str]], object] | None = None,
                 step: Callable[[str], None] | None = None,
                 enforced: Callable[[], Mapping[str, int]] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 rng: random.Random | None = None) -> None:
        self.settings = settings  # may be replaced (a config re-read); read per check
        self.sink = sink
        self.state = state or VersionState(state_path(settings))
        self.on_install = on_install
        self.step = step
        self.enforced = enforced
        self._nudged: set[tuple[str, int]] = set()  # versions a reload was asked for
        self.clock = clock
        self.rng = rng or random.Random()
        self.counts: Counter[str] = Counter()  # outcomes, freeze alarms (for metrics)
        self.failures = 0  # consecutive failed checks (back-off)
        self.last_check: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Updater(state={self.state!r})"

    @property
    def options(self) -> UpdateSettings:
        return self.settings.updates or UpdateSettings()

    # ------------------------------------------------------------ one check

    def run_once(self, *, allow_rollback: bool = False,
                 only: Sequence[str] = ()) -> list[UpdateResult]:
        """Check each list with a source (`only`: those whose list id, bundle file name
        or configured path is named); then `on_install` once if anything was installed."""
        items = [i for i in self.settings.lists if i.source is not None]
        if only:
            items = [i for i in items if self._named(i, only)]
        results: list[UpdateResult] = []
        with self._locked() as held:
            for item in items:
                assert item.source is not None
                target = self.settings.resolve(item.path)
                location = bundle_location(item.source, item.path, self.settings.base)
                if not held:
                    results.append(UpdateResult(target, location, "busy",
                                                reason="another update is running"))
                    continue
                results.append(self._check(item, target, location, allow_rollback))
        self.last_check = self.clock()
        for r in results:
            self.counts[r.outcome] += 1
            self.counts["freeze"] += r.frozen
        installed = [r.list_id or r.path.name for r in results if r.outcome == "installed"]
        installed += self._not_enforced(results)
        if installed and self.on_install is not None:
            try:
                self.on_install(installed)
            except Exception:  # serve's reload says why itself; never end the task
                log.exception("after installing %s: the reload callback failed",
                              ", ".join(installed))
        return results

    def _not_enforced(self, results: Sequence[UpdateResult]) -> list[str]:
        """Lists whose bundle in place is not the version the engine enforces: installed
        by someone else (`list confirm`, `list update` from a shell) since the last
        reload. Asked once per version, so a bundle the engine refuses is not reloaded
        at every check."""
        if self.enforced is None:
            return []
        enforced = self.enforced()
        stale = []
        for r in results:
            if r.outcome == "installed" or r.list_id is None or r.version is None:
                continue
            if enforced.get(r.list_id) != r.version and (r.list_id, r.version) not in self._nudged:
                self._nudged.add((r.list_id, r.version))
                log.info("list %s: version %d is in place, the engine enforces %s: reloading",
                         r.list_id, r.version, enforced.get(r.list_id))
                stale.append(r.list_id)
        return stale

    def _named(self, item: ListSettings, names: Sequence[str]) -> bool:
        target = self.settings.resolve(item.path)
        if {str(item.path), item.path.name, target.stem, str(target)} & set(names):
            return True
        in_place = self._in_place(target, self._keys(item), quiet=True)
        return in_place is not None and in_place.manifest.list_id in names

    @contextmanager
    def _locked(self) -> Iterator[bool]:
        path = self.state.path.with_name(self.state.path.name + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    def _keys(self, item: ListSettings) -> list[PublicKey]:
        return [load_public_key(self.settings.resolve(k)) for k in item.trust]

    def _in_place(self, target: Path, keys: Sequence[PublicKey],
                  quiet: bool = False) -> _InPlace | None:
        """The verified bundle now at `target` (expired or not), or None."""
        if not target.exists():
            return None
        try:
            bundle = open_bundle(target, keys, allow_expired=True)
        except BundleError as e:
            if not quiet:
                log.warning("the bundle in place does not verify, fetching it whole: %s", e)
            return None
        try:
            return _InPlace(bundle.manifest, manifest_digest(bundle))
        finally:
            bundle.close()

    def _check(self, item: ListSettings, target: Path, location: str,
               allow_rollback: bool) -> UpdateResult:
        current: _InPlace | None = None
        in_force: Manifest | None
        try:
            keys = self._keys(item)
            clean_stages(target)
            current = self._in_place(target, keys)
            in_sync = self._follow(current)
            validators = self.state.validators(location) if in_sync else Validators()
            result, in_force = self._fetch_and_install(item, target, location, keys, current,
                                                       validators, allow_rollback)
        except Stopped as e:  # held, or rejected before: the list in place stays
            result = e.result
            in_force = current.manifest if current is not None else None
        except _Refused as e:
            self._emit(Event("list-refused", self.settings.node.id, list=e.list_id,
                             version=e.version, action=e.kind,
                             detail=f"update from {location}: {e.reason}"[:500]))
            log.error("list update refused, the list in place stays: %s", e)
            result = UpdateResult(target, location, "refused", e.list_id, reason=str(e))
            in_force = current.manifest if current is not None else None
        except (NetfilterError, OSError) as e:
            log.error("list update failed, the list in place stays: %s", e)
            result = UpdateResult(target, location, "failed", reason=str(e))
            in_force = current.manifest if current is not None else None
        if result.held is None and result.list_id is not None:
            held = self.state.held(result.list_id)
            if held is not None:
                result = replace(result, held=held.version)
        if in_force is None:
            return result
        if result.version is None:
            result = replace(result, list_id=in_force.list_id, version=in_force.version)
        return replace(result, frozen=self._freeze(in_force, location, result))

    def _follow(self, current: _InPlace | None) -> bool:
        """Bring the record up to a newer bundle in place; is the bundle the record's?"""
        if current is None:
            return False
        m = current.manifest
        verdict = self.state.follow(m.list_id, m.version, current.digest, m.issued,
                                    now=self.clock())
        return verdict in (Judgement.NEW, Judgement.SAME)

    def _fetch_and_install(self, item: ListSettings, target: Path, location: str,
                           keys: Sequence[PublicKey], current: _InPlace | None,
                           validators: Validators,
                           allow_rollback: bool) -> tuple[UpdateResult, Manifest]:
        updates = self.options
        ca = self.settings.resolve(updates.ca) if updates.ca is not None else None
        if current is not None:
            done = self._via_delta(item, target, location, keys, current, validators,
                                   allow_rollback, ca)
            if done is not None:
                return done
        out, staged = stage(target)
        try:
            with out:
                fetched = fetch(location, out, validators, updates, ca=ca)
                if fetched.modified:
                    self._step("downloaded")
                    sync(out)
                    self._step("synced")
            if not fetched.modified:
                if current is None:  # validators are only sent while in sync
                    raise FetchError(location, "said not modified, but nothing is in place")
                self.state.set_validators(location, fetched.validators, self.clock())
                m = current.manifest
                return UpdateResult(target, location, "current", m.list_id, m.version,
                                    not_modified=True), m
            return self._install(item, target, location, staged, keys, current,
                                 fetched.validators, allow_rollback)
        finally:
            staged.unlink(missing_ok=True)

    def _via_delta(self, item: ListSettings, target: Path, location: str,
                   keys: Sequence[PublicKey], current: _InPlace, validators: Validators,
                   allow_rollback: bool,
                   ca: Path | None) -> tuple[UpdateResult, Manifest] | None:
        """Has the full bundle changed (asked without its body)? Not modified: current.
        Modified: fetch `NAME.from-vN.delta.nfl` for the version N in force, apply it
        (updates/delta.py) and install the result through `_install` like a download,
        recording the full bundle's new validators (the next check is a 304). None:
        fetch the full bundle (no delta, or it failed: one log line, counted).

        A delta older than the full bundle beside it (`lags`: a mirror between two
        publications) is installed under the old validators, so the next check asks
        again instead of being a 304 on the delta's older version."""
        updates = self.options
        probed = probe(location, validators, updates, ca=ca)
        m = current.manifest
        if not probed.modified:
            self.state.set_validators(location, probed.validators, self.clock())
            return UpdateResult(target, location, "current", m.list_id, m.version,
                                not_modified=True), m
        out, staged = stage(target)
        out.close()
        try:
            try:
                applied = apply_from_source(location, target, keys, m.version, staged,
                                            updates, ca=ca, full_size=probed.size)
                with open(staged, "rb") as written:
                    sync(written)
            except NoDelta as e:
                self.counts["delta_skipped"] += 1
                log.info("list %s: %s; fetching the full bundle", m.list_id, e)
                return None
            except (NetfilterError, OSError) as e:
                self.counts["delta_failed"] += 1
                log.warning("list %s: the delta from version %s is not used, fetching the "
                            "full bundle: %s", m.list_id, m.version, e)
                return None
            self.counts["delta_applied"] += 1
            self._step("downloaded")
            self._step("synced")
            via = f" (via delta from version {m.version}, {applied.size:,} bytes)"
            record = probed.validators
            if lags(applied.last_modified, probed.validators.last_modified):
                log.info("list %s: the delta %s is older than the full bundle beside it (a "
                         "mirror between two publications?); the next check asks again",
                         m.list_id, applied.location)
                record = validators
            result = self._install(item, target, location, staged, keys, current, record,
                                   allow_rollback, via=via)
            if result[0].outcome == "installed":
                log.info("list %s: version %s came as a delta of %s bytes from %s%s",
                         m.list_id, result[0].version, f"{applied.size:,}", applied.location,
                         f" (the full bundle: {probed.size:,})" if probed.size else "")
            return result
        finally:
            staged.unlink(missing_ok=True)

    def _install(self, item: ListSettings, target: Path, location: str, staged: Path,
                 keys: Sequence[PublicKey], current: _InPlace | None,
                 validators: Validators, allow_rollback: bool,
                 *, via: str = "") -> tuple[UpdateResult, Manifest]:
        try:
            bundle = open_bundle(staged, keys)
        except BundleError as e:
            kind = "expired" if isinstance(e, BundleExpired) else "verify"
            raise _Refused(location, e.reason, kind=kind) from e
        try:
            m, digest = bundle.manifest, manifest_digest(bundle)
        finally:
            bundle.close()
        if current is not None and m.list_id != current.manifest.list_id:
            raise _Refused(location, f"serves list {m.list_id}, the bundle in place is list "
                                     f"{current.manifest.list_id}", list_id=m.list_id,
                           version=m.version, kind="list-id")
        self._check_list_key(item, m, location)
        recorded = self.state.installed(m.list_id)
        verdict = judge(recorded, m.version, digest)
        node = self.settings.node.id
        forced = False
        if verdict is Judgement.SAME and current is not None and current.digest == digest:
            self.state.set_validators(location, validators, self.clock())
            return UpdateResult(target, location, "current", m.list_id, m.version), m
        if verdict in (Judgement.ROLLBACK, Judgement.CONFLICT):
            assert recorded is not None
            reason = refusal(recorded, m.version, verdict)
            if not allow_rollback:
                raise _Refused(location, reason, list_id=m.list_id, version=m.version,
                               kind=verdict.value)
            forced = True
            log.warning("list %s: %s; installed anyway (--allow-rollback by %s)",
                        m.list_id, reason, _operator())
        elif verdict is Judgement.NEW:  # the sanity checks (a forced rollback is not checked)
            screen(self, item, target, location, staged, list(keys),
                   current.manifest if current is not None else None, m, digest, validators)
        self._step("verified")
        place(staged, target)
        self._step("renamed")
        self.state.record(m.list_id, m.version, digest, m.issued, forced=forced,
                          now=self.clock())
        self.state.set_validators(location, validators, self.clock())
        self._step("recorded")
        previous = current.manifest.version if current is not None else None
        detail = (f"installed {target.name} from {location}{via}: entries={m.entries} "
                  f"manifest-sha256={digest[:16]}")
        if forced:
            detail = (f"ROLLBACK forced with --allow-rollback by {_operator()}: was version "
                      f"{recorded.version if recorded else '-'}; {detail}")
        self._emit(Event("list-loaded", node, list=m.list_id, version=m.version,
                         action="allow-rollback" if forced else "install",
                         detail=detail[:500]))
        log.info("list %s: installed version %s (was %s) from %s", m.list_id, m.version,
                 previous, location)
        return UpdateResult(target, location, "installed", m.list_id, m.version, previous,
                            forced=forced), m

    def _check_list_key(self, item: ListSettings, m: Manifest, location: str) -> None:
        """A keyed list must be keyed with the configured list key, or it would not
        load (a node restarted on it would enforce nothing)."""
        if m.hash != "hmac-sha256":
            return
        reason = None
        if item.hmac_key is None:
            reason = "the list is hmac-sha256 keyed and no hmac_key is configured"
        else:
            have = hmac_key_id(read_hmac_key(self.settings.resolve(item.hmac_key)))
            if have != m.hmac_key_id:
                reason = (f"keyed with list key {m.hmac_key_id}, the configured hmac_key is "
                          f"{have} (configure the new key first)")
        if reason is not None:
            raise _Refused(location, reason, list_id=m.list_id, version=m.version,
                           kind="hmac-key")

    def _freeze(self, m: Manifest, location: str, result: UpdateResult) -> bool:
        """The freeze alarm: the version in force was issued more than max_age ago and
        the check brought nothing newer (TUF's freeze attack, or a blocked source)."""
        age = (self.clock() - m.issued).total_seconds()
        if age <= self.options.max_age:
            return False
        how = ("still serves" if result.outcome in ("current", "installed")
               else f"{result.outcome} ({result.reason[:200]}); in force is")
        text = (f"list {m.list_id}: {location} {how} version {m.version}, issued "
                f"{m.issued.isoformat()} ({age / 3600:.1f} h ago, more than "
                f"updates.max_age): a freeze attack, or the authority stopped publishing")
        log.error("%s", text)
        if self.state.mark_freeze_alarm(m.list_id, m.version):
            self._emit(Event("list-expired", self.settings.node.id, list=m.list_id,
                             version=m.version, action="freeze", detail=text[:500]))
        return True

    def _step(self, name: str) -> None:
        if self.step is not None:
            self.step(name)

    def _emit(self, event: Event) -> None:
        try:
            self.sink.record(event)
        except Exception as e:  # the audit log's trouble must not stop the updates
            log.error("event sink failed (%s: %s)", type(e).__name__, str(e)[:200])

    # ------------------------------------------------------------ the periodic task

    def next_delay(self, failed: bool) -> float:
        """Seconds to the next check: the interval with jitter; after failures, an
        exponential back-off from retry_min to retry_max (randomized in its upper half)."""
        o = self.options
        if failed:
            self.failures += 1
            wait = min(o.retry_max, o.retry_min * 2.0 ** min(self.failures - 1, 30))
            return self.rng.uniform(wait / 2, wait)
        self.failures = 0
        return max(1.0, o.interval + self.rng.uniform(-o.jitter, o.jitter))

    def stats(self) -> dict[str, int | float]:
        """For metrics: checks by outcome (installed, current, refused, failed, ...),
        freeze alarms, consecutive failures, versions held now (held_versions), and the
        time of the last check."""
        out: dict[str, int | float] = dict(self.counts)
        out["consecutive_failures"] = self.failures
        out["held_versions"] = len(held_versions(self.state))
        if self.last_check is not None:
            out["last_check_timestamp_seconds"] = self.last_check.timestamp()
        return out

    def start(self) -> None:
        """Check in a daemon thread: first after a random part of the jitter, then per
        `next_delay` until `stop()`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="list-updates", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        o = self.options
        delay = self.rng.uniform(0, min(o.jitter, o.interval))
        while not self._stop.wait(delay):
            try:
                results = self.run_once()
                failed = any(r.outcome in ("failed", "refused") for r in results)
            except Exception:  # never end the task: the next check may succeed
                log.exception("list update check failed")
                failed = True
            delay = self.next_delay(failed)

    def stop(self, timeout: float = 30.0) -> None:
        """End the thread (a check in progress finishes first, bounded by `timeout`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stop, then close the state file (the sink is the caller's)."""
        self.stop()
        self.state.close()


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"
