"""`netfilter list update`: one check of every configured list's source, now.

Exit status: 0 when every list is installed or up to date, 1 when one was refused or
could not be fetched (the list in place stays), 4 when all is well but a freeze alarm
is raised (a source serves nothing newer than `updates.max_age`). Events go to the
node's audit log (`list-loaded`, `list-refused`, `list-expired` for a freeze).
"""

from __future__ import annotations

import argparse
from typing import Any

from netfilter.errors import NetfilterError

__all__ = ["FREEZE_STATUS", "add_parser", "run"]

FREEZE_STATUS = 4


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
    if any(r.outcome != "installed" and r.outcome != "current" for r in results):
        return 1
    return FREEZE_STATUS if any(r.frozen for r in results) else 0
