"""Update sanity checks: does a verified candidate look wrong enough to hold it?

Two rules, run by the updater after verification and before the atomic install:

- entry count: the candidate's entry count moves by more than `updates.max_entry_change`
  (a fraction, 0.2 = 20 %) either way from the version in force. Not applied to the
  first install of a list (there is nothing to compare with).
- protected names: the candidate covers a name of the operator's protected list
  (`updates.protected_names`) that the version in force does not: one of its
  domain-level entries blocks the name or a parent domain (the matcher's
  `check_host`), or its host index says the name or a parent carries URL-level
  entries (`host_has_url_entries`: the proxy would intercept it, the resolver route
  it). An entry already in force is not news. Applied to the first install too
  (nothing in force covers anything): a first list that blocks an essential name is
  as wrong as a later one. A candidate without a host index is checked for its
  domain-level entries only (without the index every host "may" carry URL entries).

A private protected name (`{name: ..., private: true}`) is named `protected[N]` (its
position in the file, from 0) in every event, log line and output, never in plain text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from netfilter.canonical import host_expressions
from netfilter.errors import NetfilterError
from netfilter.listfile import Bundle, Manifest
from netfilter.lists import Lists
from netfilter.listsource import read_yaml_file
from netfilter.matcher import ListMatcher

__all__ = ["ENTRY_CHANGE", "PROTECTED", "Finding", "ProtectedName", "check_candidate",
           "check_entry_change", "covering", "load_protected"]

ENTRY_CHANGE = "entry-change"  # the trigger names, in events and the state
PROTECTED = "protected-name"


@dataclass(frozen=True)
class ProtectedName:
    """One name of the protected list; `label` is what events and logs may show."""

    name: str
    position: int
    private: bool = False

    @property
    def label(self) -> str:
        return f"protected[{self.position}]" if self.private else self.name

    def __repr__(self) -> str:  # never the plain text of a private name
        return f"ProtectedName({self.label!r}, private={self.private})"


@dataclass(frozen=True)
class Finding:
    """Why a candidate is held: the trigger and one line that names no private name."""

    trigger: str  # ENTRY_CHANGE | PROTECTED
    reason: str


def load_protected(path: Path) -> list[ProtectedName]:
    """The protected list: YAML, a list whose items are plain names or mappings
    `{name: NAME, private: true|false}`. Each name must be a host name (checked as
    its host expressions). Any mistake is one NetfilterError naming the item."""
    raw = read_yaml_file(path)  # a SourceError (a NetfilterError) names the file
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise NetfilterError(path, "expected a list of names (or {name: ..., private: true})")
    out: list[ProtectedName] = []
    for i, item in enumerate(raw):
        where = f"{path}: [{i}]"
        private = False
        if isinstance(item, dict):
            unknown = sorted(set(map(str, item)) - {"name", "private"})
            if unknown:
                raise NetfilterError(where, f"unknown key {unknown[0]!r} (name, private)")
            private = item.get("private", False)
            if not isinstance(private, bool):
                raise NetfilterError(where, "private must be true or false")
            item = item.get("name")
        if not isinstance(item, str) or not item.strip():
            raise NetfilterError(where, "expected a host name")
        name = item.strip()
        try:
            expressions = host_expressions(name)
        except ValueError as e:
            # a private name is not echoed back even in the error
            raise NetfilterError(where, f"not a host name ({'private' if private else e})"
                                 ) from e
        if not expressions:
            raise NetfilterError(where, "not a host name")
        out.append(ProtectedName(expressions[0][:-1], i, private))
    return out


def check_entry_change(old: Manifest | None, new: Manifest,
                       max_change: float) -> Finding | None:
    """The count rule; None for a first install or a change within the bound."""
    if old is None:
        return None
    before, after = old.entries, new.entries
    moved = abs(after - before) / before if before else (float("inf") if after else 0.0)
    if moved <= max_change:
        return None
    change = "+inf" if moved == float("inf") else f"{(after - before) / before:+.0%}"
    return Finding(ENTRY_CHANGE, f"entries {before} -> {after} ({change}, more than "
                                 f"updates.max_entry_change {max_change:.0%})")


def _lists(bundle: Bundle | None, hmac_key: bytes | None) -> Lists | None:
    if bundle is None:
        return None
    return Lists(blocking=(ListMatcher.from_bundle(bundle, hmac_key),))


def covering(lists: Lists, url_index: bool, name: str) -> str | None:
    """How `lists` cover `name` (one phrase), or None."""
    match = lists.check_host(name)
    if match is not None and match.blocks:
        return f"blocked by domain entry {match.ref} ({match.expression})"
    if url_index and lists.host_has_url_entries(name):
        return "in the host index (carries URL-level entries)"
    return None


def covered_names(new: Bundle, old: Bundle | None, names: Sequence[ProtectedName],
                  hmac_key: bytes | None) -> list[tuple[ProtectedName, str]]:
    """The protected names `new` covers and `old` (the version in force) does not."""
    candidate = _lists(new, hmac_key)
    assert candidate is not None
    in_force = _lists(old, hmac_key)
    new_index = candidate.blocking[0].has_host_index
    old_index = in_force is not None and in_force.blocking[0].has_host_index
    out = []
    for p in names:
        how = covering(candidate, new_index, p.name)
        if how is None:
            continue
        # without a host index the version in force cannot say a host carries URL
        # entries (it would say "maybe" of every host): its domain entries only
        if in_force is not None and covering(in_force, old_index, p.name) is not None:
            continue
        out.append((p, how))
    return out


def check_candidate(new: Bundle, old: Bundle | None, *, max_change: float,
                    protected: Sequence[ProtectedName],
                    hmac_key: bytes | None) -> Finding | None:
    """Both rules: None (install it), or the finding that holds the candidate (both
    triggers, joined by `+`, when both rules hold it)."""
    findings = []
    count = check_entry_change(old.manifest if old is not None else None, new.manifest,
                               max_change)
    if count is not None:
        findings.append(count)
    covered = covered_names(new, old, protected, hmac_key) if protected else []
    if covered:
        shown = "; ".join(f"{p.label} {how}" if not p.private else
                          f"{p.label} {how.split(' (')[0]}" for p, how in covered[:10])
        more = f"; and {len(covered) - 10} more" if len(covered) > 10 else ""
        findings.append(Finding(PROTECTED, f"covers {len(covered)} protected name(s) not "
                                           f"covered by the version in force: {shown}{more}"))
    if not findings:
        return None
    return Finding("+".join(f.trigger for f in findings),
                   "; ".join(f.reason for f in findings))
