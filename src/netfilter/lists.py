"""The set of lists a node enforces: signed bundles, local blocks, local exceptions.

Immutable once built: a reload builds a new `Lists` and swaps one reference, so a
check in flight always sees one consistent set.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

from netfilter.canonical import canonical_parts, name_suffixes
from netfilter.digest import read_hmac_key
from netfilter.errors import BundleError
from netfilter.keys import load_public_key
from netfilter.listfile import Bundle, open_bundle
from netfilter.listsource import read_source
from netfilter.matcher import ListMatcher, Match

__all__ = ["ListSource", "Lists", "load_lists"]

log = logging.getLogger(__name__)
ExpiryPolicy = Literal["enforce", "stop"]


class VersionFloor(Protocol):
    """The durable record of installed versions (updates.state.VersionState): what a
    node installed before is a floor its lists never go below, across restarts."""

    def check_bundle(self, bundle: Bundle) -> str | None: ...

    def follow_bundle(self, bundle: Bundle) -> object: ...


@dataclass(frozen=True)
class ListSource:
    """Where a signed bundle is and how to trust it."""

    path: str | Path
    trusted_keys: Sequence[str | Path]
    hmac_key: str | Path | None = None
    on_expiry: ExpiryPolicy = "enforce"


@dataclass(frozen=True)
class Lists:
    """Loaded lists in precedence order, plus the operator's exceptions."""

    blocking: tuple[ListMatcher, ...]
    exceptions: ListMatcher | None = None
    bundles: tuple[Bundle, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    # the lines of expired lists left out under `on_expiry: stop`
    stopped: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        # With one list and no exceptions (the common case) skip a layer of calls.
        single = self.blocking[0] if len(self.blocking) == 1 and self.exceptions is None else None
        object.__setattr__(self, "_single", single)

    def _lift(self, match: Match, suffixes: Sequence[str], host: str,
              path: str | None) -> Match:
        if self.exceptions is None:
            return match
        if path is None:
            allow = self.exceptions.check_host_suffixes(suffixes, None)
        else:
            allow = self.exceptions.check_parts(host, path, None)
        return match if allow is None else replace(match, allowed_by=allow.ref)

    def check_parts(self, host: str, path: str, tried: list[str] | None = None) -> Match | None:
        """Check a canonical host and path; the hot path of the proxy."""
        single: ListMatcher | None = self._single  # type: ignore[attr-defined]
        if single is not None:
            return single.check_parts(host, path, tried)
        for matcher in self.blocking:
            match = matcher.check_parts(host, path, tried)
            if match is not None:
                return self._lift(match, (), host, path)
        return None

    def check_url(self, url: str | bytes, tried: list[str] | None = None) -> Match | None:
        """The entry that blocks `url` (or a lifted one), or None; InvalidURL if no host."""
        host, path = canonical_parts(url)
        return self.check_parts(host, path, tried)

    def check_host(self, name: str, tried: list[str] | None = None) -> Match | None:
        """Domain-level entries only, for a DNS name or a TLS server name."""
        suffixes = name_suffixes(name)
        single: ListMatcher | None = self._single  # type: ignore[attr-defined]
        if single is not None:
            return single.check_host_suffixes(suffixes, tried)
        for matcher in self.blocking:
            match = matcher.check_host_suffixes(suffixes, tried)
            if match is not None:
                return self._lift(match, suffixes, suffixes[0], None)
        return None

    def host_has_url_entries(self, name: str) -> bool:
        """First stage: does any list hold URL-level entries for this host or a parent?"""
        suffixes = name_suffixes(name)
        return any(m.has_url_entries_on(suffixes) for m in self.blocking)

    def urls_free(self, host: str) -> bool:
        """No URL on this canonical host can match any list (exceptions only ever
        lift a match, so they cannot change that)."""
        return all(m.urls_free(host) for m in self.blocking)

    def versions(self) -> dict[str, int]:
        return {m.list_id: m.version for m in self.blocking if m.source == "authority"}

    def __len__(self) -> int:
        return sum(m.entry_count for m in self.blocking)


def _load_bundle(source: ListSource, installed: Mapping[str, int],
                 floor: VersionFloor | None) -> tuple[Bundle, str | None]:
    keys = [load_public_key(k) for k in source.trusted_keys]
    bundle = open_bundle(source.path, keys, allow_expired=True)
    m = bundle.manifest
    reason = floor.check_bundle(bundle) if floor is not None else None
    if reason is not None:
        bundle.close()
        raise BundleError(source.path, f"{reason}; to accept it, `netfilter list update "
                                       "--allow-rollback` from its source")
    previous = installed.get(m.list_id)
    if previous is not None and m.version < previous:
        raise BundleError(source.path, f"version {m.version} is older than the installed "
                                       f"version {previous} of list {m.list_id} "
                                       "(rollback refused)")
    warning = None
    if bundle.expired:
        assert m.expires is not None
        enforced = ("still enforced (on_expiry: enforce)" if source.on_expiry == "enforce"
                    else "NOT enforced (on_expiry: stop)")
        warning = (f"list {m.list_id} version {m.version} expired at "
                   f"{m.expires.isoformat()}; {enforced}")
        log.warning("%s", warning)
    return bundle, warning


def load_lists(
    sources: Sequence[ListSource],
    *,
    local_block: str | Path | None = None,
    local_allow: str | Path | None = None,
    installed: Mapping[str, int] | None = None,
    floor: VersionFloor | None = None,
) -> Lists:
    """Verify and load every list; any failure raises and nothing is half-loaded.

    `installed` maps list ids to the versions in force, so a reload refuses rollbacks;
    `floor`, the node's durable record, refuses them across restarts too, and is
    raised to what loaded.
    """
    matchers: list[ListMatcher] = []
    bundles: list[Bundle] = []
    warnings: list[str] = []
    stopped: list[str] = []
    seen: set[str] = set()
    for source in sources:
        bundle, warning = _load_bundle(source, installed or {}, floor)
        list_id = bundle.manifest.list_id
        if list_id in seen:
            raise BundleError(source.path, f"list id {list_id} is loaded twice")
        seen.add(list_id)
        if warning:
            warnings.append(warning)
        if bundle.expired and source.on_expiry == "stop":
            stopped.append(warning or list_id)
            continue
        key = read_hmac_key(source.hmac_key) if source.hmac_key is not None else None
        matchers.append(ListMatcher.from_bundle(bundle, key))
        bundles.append(bundle)
    if local_block is not None:
        _, entries = read_source(local_block, local=True, default_category="local")
        matchers.append(ListMatcher.from_entries("local", entries, source="local"))
    exceptions = None
    if local_allow is not None:
        _, entries = read_source(local_allow, local=True, default_category="exception")
        exceptions = ListMatcher.from_entries("local-allow", entries, source="exception")
    _return_freed_memory()
    if floor is not None:
        for bundle in bundles:
            floor.follow_bundle(bundle)
    return Lists(tuple(matchers), exceptions, tuple(bundles), tuple(warnings), tuple(stopped))


def _return_freed_memory() -> None:
    """Give the build's temporary arrays back to the system (glibc keeps them otherwise).

    A 10M-entry load frees a few hundred MB of temporaries; without this the heap keeps
    them and the node's resident size is ~2x what the lists need.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
