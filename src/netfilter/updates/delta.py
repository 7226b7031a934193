"""Updating from a delta: the node that holds version N fetches `NAME.from-vN.delta.nfl`
beside the full bundle, applies it to the bundle in force and gets the authority's
full bundle of the new version, byte for byte (listdelta.py).

The delta is as untrusted as a full bundle: it is fetched with the same rules (TLS,
pinned CA, https only, `updates.max_size`), `apply_delta` verifies its signature, the
signature of the result manifest it carries and the result's checksum and members
before it writes anything, and the result then goes through the installer's
verification like any download. What goes wrong here only means "fetch the full
bundle": `NoDelta` when the source publishes none for this base (or one larger than
the full bundle, not worth it), anything else
(`DeltaBaseMismatch`, a bad delta, a failed fetch) a `NetfilterError`.

A mirror may be caught between two publications: the new full bundle there, the old
delta still beside it (or the other way round). A delta applied then gives a signed,
newer version, but not the one whose validators the full bundle's answer carried;
recording those would make the next check a 304 and hold the node on the delta's
version until the next publication. `lags` tells it by Last-Modified (a delta older
than the full bundle by more than a few minutes was not published with it); the
updater then keeps the old validators, so the next check asks again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from netfilter.config import UpdateSettings
from netfilter.errors import BundleError, NetfilterError
from netfilter.keys import PublicKey
from netfilter.listdelta import DeltaBaseMismatch, apply_delta, default_delta_path
from netfilter.listfile import open_bundle
from netfilter.updates.fetch import SourceAbsent, TooLarge, fetch, is_url
from netfilter.updates.install import stage, stage_prefix
from netfilter.updates.state import Validators

__all__ = ["DeltaApplied", "NoDelta", "apply_from_source", "delta_location", "lags"]

LAG_SLACK = 600.0  # seconds a delta may be older than its full bundle (copy order)


class NoDelta(NetfilterError):
    """The source publishes no delta from the version in force, or one larger than the
    full bundle (a small list's delta may well be: not worth it, not a fault)."""


@dataclass(frozen=True)
class DeltaApplied:
    """A delta fetched and applied (the result is written, not yet verified as a bundle
    nor installed)."""

    location: str  # where the delta was fetched from
    base_version: int
    size: int  # bytes of the delta
    last_modified: str | None = None  # the delta's, as its source said


def delta_location(location: str, base_version: int) -> str:
    """Where the delta from `base_version` lies beside the full bundle at `location`:
    `NAME.nfl` -> `NAME.from-vN.delta.nfl` (`netfilter list build --diff-from`'s name);
    a URL keeps its query."""
    if not is_url(location):
        return str(default_delta_path(location, base_version))
    parts = urlsplit(location)
    head, _, name = parts.path.rpartition("/")
    name = str(default_delta_path(name or "bundle", base_version))
    return urlunsplit(parts._replace(path=f"{head}/{name}", fragment=""))


def apply_from_source(location: str, target: Path, keys: Sequence[PublicKey],
                      base_version: int, out: Path, settings: UpdateSettings, *,
                      ca: Path | None = None, full_size: int = 0) -> DeltaApplied:
    """Fetch the delta from `base_version` that belongs beside the full bundle at
    `location`, apply it to the bundle at `target` (which must be that version) and
    write the result to `out` (atomically).

    The delta is staged beside `target` (as a download is) and removed afterwards. It
    may not be larger than `full_size`, the full bundle's size as its source states it
    (0: unknown): such a delta is worth less than the full bundle, and a hostile source
    cannot make the node read more into memory than the full bundle would cost.
    Raises NoDelta when there is none, NetfilterError (DeltaBaseMismatch, BundleError,
    FetchError) or OSError when it cannot be used; nothing is written to `out` then.
    """
    where = delta_location(location, base_version)
    f, staged = stage(target)
    try:
        with f:
            try:
                got = fetch(where, f, Validators(), settings, ca=ca,
                            max_size=full_size or None,
                            limit=f"the full bundle's size ({full_size:,} bytes)")
            except SourceAbsent as e:
                raise NoDelta(where, f"no delta from version {base_version}") from e
            except TooLarge as e:
                if not 0 < full_size < settings.max_size:
                    raise
                raise NoDelta(where, f"the delta from version {base_version} is larger "
                                     f"than the full bundle ({full_size:,} bytes)") from e
        base = open_bundle(target, keys, allow_expired=True)
        try:
            if base.manifest.version != base_version:
                raise NetfilterError(target, f"is version {base.manifest.version} now, not "
                                             f"{base_version}")
            # private until placed, named as a stage (a kill leaves nothing uncleaned)
            apply_delta(base, staged, list(keys), out, mode=0o600, prefix=stage_prefix(target))
        except BundleError as e:  # named by where it came from, not by its stage
            kind = DeltaBaseMismatch if isinstance(e, DeltaBaseMismatch) else BundleError
            raise kind(e.where.replace(str(staged), where, 1), e.reason) from e
        finally:
            base.close()
        return DeltaApplied(where, base_version, got.size, got.validators.last_modified)
    finally:
        staged.unlink(missing_ok=True)


def lags(delta_modified: str | None, full_modified: str | None,
         slack: float = LAG_SLACK) -> bool:
    """Was the delta last modified more than `slack` seconds before the full bundle
    (HTTP dates)? False when either date is absent or unreadable."""
    from email.utils import parsedate_to_datetime

    try:
        if delta_modified is None or full_modified is None:
            return False
        delta, full = parsedate_to_datetime(delta_modified), parsedate_to_datetime(full_modified)
        return (full - delta).total_seconds() > slack
    except (TypeError, ValueError):
        return False
