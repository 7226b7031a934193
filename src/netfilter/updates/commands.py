"""`netfilter list update`: one check of every configured list's source, now; and
`netfilter list held|confirm|reject`: the operator's decision on held versions.

Exit status of `update`: 0 when every list is installed or up to date (or the source
still serves a version an operator rejected), 1 when one was refused or could not be
fetched (the list in place stays), 4 when all is well but a freeze alarm is raised (a
source serves nothing newer than `updates.max_age`), 5 when all is well but a version
is held for an operator (update sanity checks: held.py). Events go to the node's audit
log (`list-loaded`, `list-refused`, `list-expired` for a freeze, `list-held`;
`list-confirmed` and `list-rejected` from `confirm` and `reject`).
"""

from __future__ import annotations

import argparse
from typing import Any

from netfilter.errors import NetfilterError

__all__ = ["FREEZE_STATUS", "HELD_STATUS", "add_held_parsers", "add_parser", "run",
           "run_held"]

FREEZE_STATUS = 4
HELD_STATUS = 5
HELD_COMMANDS = ("held", "confirm", "reject")


def add_parser(list_subparsers: Any) -> argparse.ArgumentParser:
    """Add `update` to `netfilter list ...` (the subparsers of `list`)."""
    update: argparse.ArgumentParser = list_subparsers.add_parser(
        "update", help="fetch, verify and install newer versions from each list's source "
                       f"(exit 1: a list refused or not fetched; {FREEZE_STATUS}: freeze alarm)")
    update.add_argument("--config", required=True, help="the node's configuration")
    update.add_argument("--list", action="append", dest="only", metavar="LIST",
                        help="only this list (its id, bundle file name or configured path); "
                             "repeatable")
    update.add_argument("--allow-rollback", action="store_true",
                        help="install a lower version, or the same version with another "
                             "digest (recorded in the audit log with your user name)")
    return update


def run(args: argparse.Namespace) -> int:
    """Check now; one line per list on stdout (a refusal's reason too)."""
    from netfilter.config import load_config
    from netfilter.node import event_sink
    from netfilter.updates.updater import Updater

    settings = load_config(args.config)
    sourced = [item for item in settings.lists if item.source is not None]
    if not sourced:
        raise NetfilterError(args.config, "no list has a source (lists[].source)")
    sink = event_sink(settings)
    try:
        updater = Updater(settings, sink)
        try:
            results = updater.run_once(allow_rollback=args.allow_rollback,
                                       only=args.only or ())
        finally:
            updater.close()
    finally:
        sink.close()
    if args.only and not results:
        raise NetfilterError("--list", f"no list with a source is named {', '.join(args.only)}")
    for result in results:
        print(result.line())
    if any(r.outcome not in ("installed", "current", "held", "rejected") for r in results):
        return 1
    if any(r.frozen for r in results):
        return FREEZE_STATUS
    return HELD_STATUS if any(r.held is not None for r in results) else 0


def add_held_parsers(list_subparsers: Any) -> None:
    """Add `held`, `confirm` and `reject` to `netfilter list ...`."""
    held = list_subparsers.add_parser(
        "held", help="show the versions held for an operator by the update sanity checks")
    held.add_argument("--config", required=True, help="the node's configuration")
    for name, what in (("confirm", "install the held version (recorded: list-confirmed)"),
                       ("reject", "drop the held version; the source's same version is "
                                  "not installed (recorded: list-rejected)")):
        p = list_subparsers.add_parser(name, help=what)
        p.add_argument("list_id", metavar="LIST_ID")
        p.add_argument("held_version", metavar="VERSION", type=int)
        p.add_argument("--config", required=True, help="the node's configuration")
        p.add_argument("--operator", help="your name in the audit event (default: your "
                                          "login user name)")


def run_held(args: argparse.Namespace) -> int:
    """`held`: one line per held version (none: says so); `confirm`, `reject`: one line."""
    from netfilter.config import load_config
    from netfilter.node import event_sink
    from netfilter.updates.held import confirm, describe, held_versions, operator, reject
    from netfilter.updates.updater import Updater

    settings = load_config(args.config)
    if args.list_cmd == "held":
        from netfilter.updates.state import VersionState, state_path

        state = VersionState(state_path(settings))
        try:
            held = held_versions(state)
        finally:
            state.close()
        for h in held:
            print(describe(h))
        if not held:
            print("no version is held")
        return 0
    who = (args.operator or "").strip() or operator()
    if len(who) > 64 or not who.isprintable():
        raise NetfilterError("--operator", "must be a printable name of at most 64 characters")
    sink = event_sink(settings)
    try:
        updater = Updater(settings, sink)
        try:
            decide = confirm if args.list_cmd == "confirm" else reject
            print(decide(updater, args.list_id, args.held_version, who))
        finally:
            updater.close()
    finally:
        sink.close()
    return 0
