"""`netfilter user add NAME --config FILE`: make a dashboard account, or set a new
password for one (its sessions end); `user remove NAME` takes one away (its sessions
end at their next request); `user list` names them. The password is read from stdin
(one line; twice at a terminal, which does not echo it), never from an argument a
process listing would show."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from netfilter.errors import NetfilterError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `user` to `netfilter ...` (the top-level subparsers)."""
    user: argparse.ArgumentParser = subparsers.add_parser(
        "user", help="operator dashboard accounts")
    usub = user.add_subparsers(dest="user_cmd", required=True)
    add = usub.add_parser("add", help="make an account (or set its password); the password "
                                      "is read from stdin")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--config", required=True, help="the node's configuration")
    add.add_argument("--replace", action="store_true",
                     help="the account exists: give it this new password")
    remove = usub.add_parser("remove", help="take an account away; its sessions end")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--config", required=True, help="the node's configuration")
    listed = usub.add_parser("list", help="the account names")
    listed.add_argument("--config", required=True, help="the node's configuration")
    return user


def _password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise NetfilterError("password", "the two entries differ")
        return first
    from netfilter.web.accounts import MAX_PASSWORD

    try:
        return sys.stdin.readline(4 * MAX_PASSWORD).rstrip("\r\n")
    except UnicodeDecodeError:
        raise NetfilterError("stdin", "the password is not UTF-8") from None


def run(args: argparse.Namespace) -> int:
    from netfilter.config import load_config
    from netfilter.web.accounts import Accounts

    accounts = Accounts.for_settings(load_config(args.config))
    if args.user_cmd == "list":
        for name in accounts.names():
            print(name)
        return 0
    if args.user_cmd == "remove":
        accounts.remove(args.name)
        print(f"removed account {args.name} from {accounts.path}")
        return 0
    new = accounts.add(args.name, _password(), replace=args.replace)
    print(f"{'added' if new else 'new password for'} account {args.name} in {accounts.path}")
    return 0
