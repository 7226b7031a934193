"""Held versions: kept aside by the update sanity checks until an operator decides.

A verified candidate that `sanity.check_candidate` finds wrong is not installed: the
old version stays in force; the candidate is moved (not copied) from its stage into
`.held/NAME.vVERSION` beside the list (0644, as an installed bundle), recorded in the
state's `held` table (list id, version, manifest digest, trigger, reason, held_at)
and one `list-held` event (action: the trigger) and one error log line raise the
alarm. The record is durable: a restart finds the same version held and records
nothing again; a newer version from the source replaces the held one and is checked
in its turn; a version that installs cleanly drops an older held one.

`confirm` installs the held bundle through the same path as an update (the update
lock, verification against the list's trusted keys, stage, fsync, rename, record;
a version lower than the one in force, or the same version with another digest, is
refused) and records `list-confirmed`; `reject` drops it, records `list-rejected`,
and the same version from the source is then answered "rejected" by every check
(one line, no event). Both name the operator in the event's detail ("confirmed by
NAME") and where the decision was taken in its `frontend` (cli, or dashboard: NAME is
then the dashboard account).
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from netfilter.config import ListSettings
from netfilter.digest import read_hmac_key
from netfilter.errors import NetfilterError
from netfilter.events import Event
from netfilter.keys import PublicKey
from netfilter.listfile import Manifest, open_bundle
from netfilter.updates.install import BUNDLE_MODE, manifest_digest, place, stage, sync
from netfilter.updates.sanity import check_candidate, load_protected
from netfilter.updates.state import Held, Validators, VersionState

if TYPE_CHECKING:
    from netfilter.updates.updater import Updater, UpdateResult

__all__ = ["HELD_DIR", "Stopped", "confirm", "describe", "held_path", "held_versions",
           "operator", "reject", "screen"]

log = logging.getLogger(__name__)

HELD_DIR = ".held"


class Stopped(Exception):
    """A check that ends before the install: the candidate is held, or was rejected."""

    def __init__(self, result: UpdateResult) -> None:
        super().__init__(result.reason)
        self.result = result


def operator() -> str:
    """The login user's name (the default `--operator`)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def held_path(target: Path, version: int) -> Path:
    return target.parent / HELD_DIR / f"{target.name}.v{version}"


def held_versions(state: VersionState) -> list[Held]:
    """Every held version (for metrics: a gauge per list, 1 while one is held)."""
    return state.all_held()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep(staged: Path, target: Path, version: int) -> Path:
    """Move the verified stage to `.held/` (same file system: a rename)."""
    path = held_path(target, version)
    path.parent.mkdir(mode=0o755, exist_ok=True)
    os.chmod(staged, BUNDLE_MODE)
    os.replace(staged, path)
    _fsync_dir(path.parent)
    return path


def _hmac_key(updater: Updater, item: ListSettings, m: Manifest) -> bytes | None:
    if m.hash != "hmac-sha256" or item.hmac_key is None:
        return None
    return read_hmac_key(updater.settings.resolve(item.hmac_key))


def screen(updater: Updater, item: ListSettings, target: Path, location: str, staged: Path,
           keys: list[PublicKey] | tuple[PublicKey, ...], current: Manifest | None,
           m: Manifest, digest: str, validators: Validators) -> None:
    """Before the install of a new version (verified, judged new): return to install
    it, or raise Stopped (held now, still held, or rejected before)."""
    from netfilter.updates.updater import UpdateResult

    state, now = updater.state, updater.clock()
    in_force = current.version if current is not None else None
    stays = "nothing is in force" if in_force is None else f"version {in_force} stays in force"
    rejected = state.rejected(m.list_id, m.version)
    if rejected is not None:
        state.set_validators(location, validators, now)
        reason = (f"version {m.version} was rejected by {rejected.operator} at "
                  f"{rejected.rejected_at.isoformat(timespec='seconds')}; not installed")
        log.info("list %s: %s", m.list_id, reason)
        raise Stopped(UpdateResult(target, location, "rejected", m.list_id, in_force,
                                   reason=reason))
    held = state.held(m.list_id)
    if held is not None and (held.version, held.digest) == (m.version, digest) \
            and held.path.exists():
        state.set_validators(location, validators, now)
        log.error("list %s: version %s is still HELD for an operator (%s); %s",
                  m.list_id, m.version, held.reason, stays)
        raise Stopped(UpdateResult(target, location, "held", m.list_id, in_force,
                                   reason=held.reason, held=m.version))
    options = updater.options
    protected = (load_protected(updater.settings.resolve(options.protected_names))
                 if options.protected_names is not None else [])
    new = open_bundle(staged, keys)
    old = open_bundle(target, keys, allow_expired=True) if current is not None else None
    try:
        finding = check_candidate(new, old, max_change=options.max_entry_change,
                                  protected=protected, hmac_key=_hmac_key(updater, item, m))
    finally:
        new.close()
        if old is not None:
            old.close()
    if finding is None:
        if held is not None and held.version <= m.version:  # superseded by this one
            state.release(m.list_id)
            held.path.unlink(missing_ok=True)
        return
    path = _keep(staged, target, m.version)
    if held is not None and held.path != path:
        held.path.unlink(missing_ok=True)
    state.hold(Held(m.list_id, m.version, digest, finding.trigger, finding.reason, path, now))
    state.set_validators(location, validators, now)
    detail = (f"held version {m.version} from {location} ({stays}): {finding.reason}; "
              f"manifest-sha256={digest[:16]}")
    updater._emit(Event("list-held", updater.settings.node.id, list=m.list_id,
                        version=m.version, action=finding.trigger, detail=detail[:500]))
    log.error("list %s: update to version %s HELD for an operator, %s: %s (netfilter list "
              "confirm|reject %s %s)", m.list_id, m.version, stays, finding.reason, m.list_id,
              m.version)
    raise Stopped(UpdateResult(target, location, "held", m.list_id, in_force,
                               reason=finding.reason, held=m.version))


def _the_held(state: VersionState, list_id: str, version: int) -> Held:
    held = state.held(list_id)
    if held is None:
        raise NetfilterError(list_id, "no version of this list is held "
                                      "(netfilter list held shows what is)")
    if held.version != version:
        raise NetfilterError(f"{list_id} {version}", f"not held: the held version of list "
                                                     f"{list_id} is {held.version}")
    return held


def _item(updater: Updater, held: Held) -> ListSettings:
    """The configured list the held bundle was kept beside."""
    for item in updater.settings.lists:
        if held_path(updater.settings.resolve(item.path), held.version) == held.path:
            return item
    for item in updater.settings.lists:
        if updater._named(item, [held.list_id]):
            return item
    raise NetfilterError(held.list_id, "no configured list (lists[]) is this list")


def confirm(updater: Updater, list_id: str, version: int, who: str, *,
            frontend: str = "cli") -> str:
    """Install the held version (the operator `who` decided, from `frontend`: cli or
    dashboard); one line of what was done."""
    state, node = updater.state, updater.settings.node.id
    item = _item(updater, _the_held(state, list_id, version))
    target = updater.settings.resolve(item.path)
    with updater._locked() as locked:
        if not locked:
            raise NetfilterError(list_id, "another update is running; try again")
        held = _the_held(state, list_id, version)  # decided meanwhile?
        keys = updater._keys(item)
        bundle = open_bundle(held.path, keys)
        try:
            m, digest = bundle.manifest, manifest_digest(bundle)
        finally:
            bundle.close()
        if (m.list_id, m.version, digest) != (held.list_id, held.version, held.digest):
            raise NetfilterError(held.path, "is not the bundle that was held (another "
                                            "manifest); reject it and wait for the source")
        recorded = state.installed(list_id)
        if recorded is not None and version < recorded.version:
            raise NetfilterError(f"{list_id} {version}",
                                 f"lower than version {recorded.version} in force "
                                 "(rollback refused); reject it")
        if recorded is not None and version == recorded.version and digest != recorded.digest:
            raise NetfilterError(f"{list_id} {version}", "version in force with another "
                                                         "manifest digest; reject it")
        previous = recorded.version if recorded is not None else None
        out, staged = stage(target)
        try:
            with out, open(held.path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                sync(out)
            check = open_bundle(staged, keys)
            check.close()
            place(staged, target)
        finally:
            staged.unlink(missing_ok=True)
        state.record(m.list_id, m.version, digest, m.issued, now=updater.clock())
        state.release(list_id)
        held.path.unlink(missing_ok=True)
    detail = (f"confirmed by {who}: installed {target.name} version {version} (was "
              f"{previous}), held for {held.trigger}: {held.reason}; entries={m.entries} "
              f"manifest-sha256={digest[:16]}")
    updater._emit(Event("list-confirmed", node, frontend=frontend, list=list_id,
                        version=version, action="confirm", detail=detail[:500]))
    log.warning("list %s: held version %s confirmed by %s and installed (was %s)",
                list_id, version, who, previous)
    if updater.on_install is not None:
        updater.on_install([list_id])
    return (f"{list_id}: confirmed by {who}, installed version {version} (was {previous}) "
            f"at {target}; a running netfilter serve loads it at its next check "
            "(updates.interval), or at once on SIGHUP (systemctl reload)")


def reject(updater: Updater, list_id: str, version: int, who: str, *,
           frontend: str = "cli") -> str:
    """Drop the held version (the operator `who` decided, from `frontend`: cli or
    dashboard); one line of what was done."""
    state = updater.state
    _the_held(state, list_id, version)
    with updater._locked() as locked:
        if not locked:
            raise NetfilterError(list_id, "another update is running; try again")
        held = _the_held(state, list_id, version)
        state.reject(held, who, updater.clock())
        held.path.unlink(missing_ok=True)
    detail = f"rejected by {who}: held for {held.trigger}: {held.reason}"
    updater._emit(Event("list-rejected", updater.settings.node.id, frontend=frontend,
                        list=list_id, version=version, action="reject", detail=detail[:500]))
    log.warning("list %s: held version %s rejected by %s", list_id, version, who)
    in_force = state.installed(list_id)
    stays = ("nothing is in force" if in_force is None
             else f"version {in_force.version} stays in force")
    return (f"{list_id}: version {version} rejected by {who}; {stays} and this version "
            "will not be installed from the source")


def describe(held: Held) -> str:
    """One line for `netfilter list held`."""
    return (f"{held.list_id} version {held.version}: held since "
            f"{held.held_at.isoformat(timespec='seconds')} for {held.trigger}: {held.reason} "
            f"({held.path})")
