"""The `netfilter` command. User mistakes end in one line on stderr and exit 1 (2 for usage,
for a mistake `config check` finds, also when `serve` runs its checks first, and for a
part of `serve` that cannot listen; 3 when `list apply` holds another base than the
delta's: fetch the full bundle)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netfilter import __version__
from netfilter.errors import ListenError, NetfilterError
from netfilter.logsetup import ENV as LOG_ENV
from netfilter.logsetup import FORMATS, chosen_format, setup

if TYPE_CHECKING:
    from netfilter.keys import PrivateKey
    from netfilter.lists import Lists

# Each command imports what it needs when it runs: the matching core (numpy), the
# config model (pydantic) and mitmproxy cost a third of a second to import, and
# `--version`, `--help` or `keys generate` need none of them.

__all__ = ["main"]


class _Ordered(argparse.Action):
    """Keeps --list/--trust/--hmac-key in the order given, so each --trust pairs with its list."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = getattr(namespace, "ordered", None) or []
        items.append((self.dest, values))
        namespace.ordered = items


def _expires(text: str) -> datetime:
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date or time") from e
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _day(text: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from e


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netfilter", description=__doc__)
    p.add_argument("--version", action="version", version=f"netfilter {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.add_argument("--log-format", choices=FORMATS, default=None,
                   help="text (default) or json: one JSON object per line, for log "
                        f"collectors (default from {LOG_ENV}, else text)")
    sub = p.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="Ed25519 keys").add_subparsers(dest="keys_cmd",
                                                                         required=True)
    gen = keys.add_parser("generate", help="write NAME.key (0600) and NAME.pub")
    gen.add_argument("--out", required=True, metavar="DIR/NAME")

    lst = sub.add_parser("list", help="build, verify and inspect list bundles")
    lsub = lst.add_subparsers(dest="list_cmd", required=True)
    build = lsub.add_parser("build", help="hash a YAML/CSV source into a signed bundle")
    build.add_argument("source")
    build.add_argument("--key", required=True, help="authority private key (NAME.key)")
    build.add_argument("--list-id", required=True)
    build.add_argument("--version", required=True, type=int, dest="list_version")
    build.add_argument("--out", required=True)
    build.add_argument("--hash", choices=["sha256", "hmac-sha256"], default="sha256")
    build.add_argument("--hmac-key", help="list key file (with --hash hmac-sha256)")
    build.add_argument("--expires", type=_expires, help="ISO date or time (UTC if no zone)")
    build.add_argument("--no-host-index", action="store_true",
                       help="leave out the host index (matching then expands every host)")
    build.add_argument("--diff-from", metavar="OLD.nfl",
                       help="also write a signed delta from this previous bundle; --out then "
                            "gets the full bundle in the layout nodes derive from the delta")
    build.add_argument("--delta-out", metavar="FILE",
                       help="where the delta goes (default: beside --out, "
                            "NAME.from-vN.delta.nfl)")
    build.add_argument("--trust", action="append", metavar="PUB",
                       help="key(s) OLD.nfl is verified with (default: the --key's own)")
    apply = lsub.add_parser("apply", help="apply a delta to the bundle it was made from "
                                          "(exit 3: another base, fetch the full bundle)")
    apply.add_argument("delta")
    apply.add_argument("--base", required=True, metavar="OLD.nfl")
    apply.add_argument("--trust", action="append", required=True, metavar="PUB")
    apply.add_argument("--out", required=True, metavar="NEW.nfl")
    verify = lsub.add_parser("verify", help="verify a bundle against trusted keys")
    verify.add_argument("bundle")
    verify.add_argument("--trust", action="append", required=True, metavar="PUB")
    verify.add_argument("--allow-expired", action="store_true")
    from netfilter.updates.commands import add_held_parsers
    from netfilter.updates.commands import add_parser as add_update

    add_update(lsub)
    add_held_parsers(lsub)
    info = lsub.add_parser("info", help="show a bundle's manifest")
    info.add_argument("bundle")
    info.add_argument("--trust", action="append", metavar="PUB",
                      help="verify too (without it the signature is not checked)")

    check = sub.add_parser("check", help="check URLs against lists")
    check.add_argument("urls", nargs="+", metavar="URL")
    check.add_argument("--config", help="use the lists and local lists of this config")
    check.add_argument("--list", action=_Ordered, dest="list", metavar="BUNDLE")
    check.add_argument("--trust", action=_Ordered, dest="trust", metavar="PUB")
    check.add_argument("--hmac-key", action=_Ordered, dest="hmac_key", metavar="FILE")
    check.add_argument("--json", action="store_true", help="one JSON object per line")
    check.add_argument("--explain", action="store_true",
                       help="show the canonical URL and every expression tried")
    audit = sub.add_parser("audit", help="verify the tamper-evident audit log")
    asub = audit.add_subparsers(dest="audit_cmd", required=True)
    for name, text in (("checkpoint", "print the latest signed checkpoint (a C2SP signed note)"),
                       ("verify", "recompute the tree and check every signed checkpoint"),
                       ("prove", "print an inclusion or consistency proof"),
                       ("report", "aggregate counts for a period (never per person)"),
                       ("export-authority", "per entry: hits, first/last seen (signed)"),
                       ("tiles", "write (and optionally serve) the C2SP tlog-tiles layout"),
                       ("cosign", "store witness cosignatures of the latest checkpoint"),
                       ("export", "write a copy of the log for an auditor (no pseudonym keys)")):
        cmd = asub.add_parser(name, help=text)
        where = cmd.add_mutually_exclusive_group(required=True)
        where.add_argument("--log", help="the audit log (SQLite file)")
        where.add_argument("--config", help="use the audit log of this config")
        if name == "verify":
            cmd.add_argument("--trust", required=True, metavar="NODE.pub",
                             help="the node's public key")
            cmd.add_argument("--since", metavar="CHECKPOINT",
                             help="a checkpoint you kept earlier: the log must extend it")
        if name == "prove":
            which = cmd.add_mutually_exclusive_group(required=True)
            which.add_argument("--index", type=int, help="inclusion proof of event N")
            which.add_argument("--old-size", "--old", type=int,
                               help="consistency proof from size M")
            cmd.add_argument("--size", "--new", type=int,
                             help="tree size (default: the latest signed checkpoint's)")
            cmd.add_argument("--json", action="store_true",
                             help="the JSON object `audit verify-proof` reads")
        if name in ("report", "export-authority"):
            cmd.add_argument("--from", dest="start", type=_day, required=True,
                             metavar="YYYY-MM-DD")
            cmd.add_argument("--to", dest="end", type=_day, required=True, metavar="YYYY-MM-DD")
        if name == "report":
            cmd.add_argument("--format", choices=["text", "csv", "json", "html"],
                             default="text")
        if name == "cosign":
            cmd.add_argument("--witness", action="append", default=[], metavar="VKEY",
                             help="a trusted witness key (default: audit.witnesses)")
            cmd.add_argument("signatures", nargs="?", metavar="FILE",
                             help="the witness's signature line(s), - for stdin")
            from netfilter.audit_args import add_witness_arguments

            add_witness_arguments(cmd, where)  # the witness: --nodes instead of --log
        if name == "tiles":
            cmd.add_argument("--out", required=True, metavar="DIR")
            cmd.add_argument("--listen", metavar="HOST:PORT",
                             help="also serve DIR read-only over HTTP until interrupted")
        if name == "export-authority":
            cmd.add_argument("--key", metavar="NODE.key",
                             help="the node key (default: node.key of --config)")
        if name == "export":
            cmd.add_argument("--out", required=True, metavar="FILE")
            cmd.add_argument("--mode", default="0644", metavar="OCTAL",
                             help="file mode, 0644 or narrower (default 0644: an export is "
                                  "meant to be handed over; it holds no pseudonym keys)")
    from netfilter.audit_args import add_auditor_commands

    add_auditor_commands(asub)  # follow, verify-proof: no --log/--config

    cfg = sub.add_parser("config", help="check a configuration file")
    csub = cfg.add_subparsers(dest="config_cmd", required=True)
    ccheck = csub.add_parser("check", help="parse and validate only: keys, referenced "
                             "files, key permissions, lists, free listen addresses")
    ccheck.add_argument("file", metavar="FILE")

    from netfilter.web.usercmd import add_parser as add_user

    add_user(sub)
    srv = sub.add_parser("serve", help="run the configured parts (dns, proxy, stoppage, "
                                       "icap)")
    srv.add_argument("parts", nargs="*", metavar="PART",
                     help="dns, proxy, stoppage, icap: limit the start to these parts "
                          "(default: every configured one)")
    srv.add_argument("--config", help="without it: the embedded demo on loopback "
                     "(DNS :5353, DoT :8853, DoH :8443, proxy :8080, stop page :8081, "
                     "metrics :9108)")
    return p


def _cmd_serve(args: argparse.Namespace) -> int:
    from netfilter.config import load_config
    from netfilter.configcheck import check_config
    from netfilter.serve import serve

    if args.config is None:
        from netfilter.demo import demo

        run = demo(args.parts)
        return serve(run.settings, args.parts, config_path=run.config_path,
                     ready=run.ready(args.parts))
    try:  # the checks of `config check` first, so nothing starts half-way
        settings = load_config(args.config)
        check_config(settings, args.parts, listen=False)
    except NetfilterError as e:
        return _fail(e, 2)
    return serve(settings, args.parts, config_path=Path(args.config).resolve(),
                 reread=True)


def _cmd_user(args: argparse.Namespace) -> int:
    """`user add|remove|list`: a mistake (the config, the name, the password) exits 2."""
    from netfilter.web.usercmd import run

    try:
        return run(args)
    except NetfilterError as e:
        return _fail(e, 2)


def _cmd_config(args: argparse.Namespace) -> int:
    from netfilter.config import load_config
    from netfilter.configcheck import check_config

    try:
        settings = load_config(args.file)
        check_config(settings)
    except NetfilterError as e:
        return _fail(e, 2)
    parts = [p for p in ("dns", "proxy", "stoppage", "icap", "audit", "metrics")
             if getattr(settings, p) is not None]
    print(f"OK {args.file}: {len(settings.lists)} list(s); "
          f"sections: {', '.join(parts) or 'none'}")
    return 0


def _fail(error: NetfilterError, status: int) -> int:
    """The one line a user mistake gets (a JSON record under --log-format json)."""
    if chosen_format() == "json":
        logging.getLogger("netfilter.cli").error("%s", error)
    else:
        print(f"netfilter: error: {error}", file=sys.stderr)
    return status


def _cmd_audit(args: argparse.Namespace) -> int:
    from netfilter.audit.commands import exit_status, run

    try:
        return run(args)
    except NetfilterError as e:
        return _fail(e, exit_status(args, e))


def _cmd_keys(args: argparse.Namespace) -> int:
    from netfilter.keys import generate_keypair, load_public_key

    key_path, pub_path = generate_keypair(args.out)
    pub = load_public_key(pub_path)
    print(f"wrote {key_path} (private, mode 0600) and {pub_path}; key id {pub.id}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from netfilter.digest import read_hmac_key
    from netfilter.keys import load_private_key, load_public_key
    from netfilter.listfile import build_bundle, open_bundle

    if args.list_cmd == "build":
        if (args.hash == "hmac-sha256") != bool(args.hmac_key):
            raise NetfilterError("--hmac-key", "required with --hash hmac-sha256, and only then")
        if args.list_version < 1:
            raise NetfilterError("--version", "must be 1 or more")
        key = load_private_key(args.key)
        hmac_key = read_hmac_key(args.hmac_key) if args.hmac_key else None
        if args.diff_from:
            return _build_delta(args, key, hmac_key)
        if args.delta_out or args.trust:
            raise NetfilterError("--delta-out" if args.delta_out else "--trust",
                                 "only with --diff-from")
        manifest, dups = build_bundle(
            args.source, args.out, key=key, list_id=args.list_id, version=args.list_version,
            hash_name=args.hash, hmac_key=hmac_key, expires=args.expires,
            host_index=not args.no_host_index, progress=sys.stderr.isatty(),
        )
        note = f", {dups} duplicate entries dropped" if dups else ""
        print(f"wrote {args.out}: list={manifest.list_id} version={manifest.version} "
              f"entries={manifest.entries}{note}; signed by {key.public.id}")
        return 0
    if args.list_cmd == "apply":
        return _apply_delta(args)
    if args.list_cmd == "update":
        from netfilter.updates.commands import run

        return run(args)
    if args.list_cmd in ("held", "confirm", "reject"):
        from netfilter.updates.commands import run_held

        return run_held(args)
    if args.list_cmd == "verify":
        bundle = open_bundle(args.bundle, [load_public_key(k) for k in args.trust],
                             allow_expired=args.allow_expired)
        print(f"OK {args.bundle}: {bundle.summary()}")
        return 0
    if args.trust:
        bundle = open_bundle(args.bundle, [load_public_key(k) for k in args.trust],
                             allow_expired=True)
        manifest, verified = bundle.manifest, f"verified, key {bundle.signer.id}"
    else:
        from netfilter.listfile import read_manifest_unverified

        manifest, verified = read_manifest_unverified(args.bundle), "signature NOT checked"
    print(f"# {args.bundle} ({verified})")
    sys.stdout.write(manifest.to_yaml().decode())
    return 0


def _build_delta(args: argparse.Namespace, key: PrivateKey, hmac_key: bytes | None) -> int:
    from netfilter.keys import load_public_key
    from netfilter.listdelta import build_delta, default_delta_path
    from netfilter.listfile import open_bundle

    trusted = [load_public_key(k) for k in args.trust] if args.trust else [key.public]
    base = open_bundle(args.diff_from, trusted, allow_expired=True)
    try:
        delta_out = args.delta_out or default_delta_path(args.out, base.manifest.version)
        manifest, delta, dups = build_delta(
            args.source, base, args.out, delta_out, key=key, list_id=args.list_id,
            version=args.list_version, hash_name=args.hash, hmac_key=hmac_key,
            expires=args.expires, host_index=not args.no_host_index,
            progress=sys.stderr.isatty())
    finally:
        base.close()
    note = f", {dups} duplicate entries dropped" if dups else ""
    print(f"wrote {args.out}: list={manifest.list_id} version={manifest.version} "
          f"entries={manifest.entries}{note}; signed by {key.public.id}")
    print(f"wrote {delta_out}: delta from version {delta.base.version}: +{delta.added} "
          f"-{delta.removed} entries, result checksum {delta.result.checksum[:16]}...")
    return 0


def _apply_delta(args: argparse.Namespace) -> int:
    from netfilter.keys import load_public_key
    from netfilter.listdelta import DeltaBaseMismatch, apply_delta
    from netfilter.listfile import open_bundle

    trusted = [load_public_key(k) for k in args.trust]
    base = open_bundle(args.base, trusted, allow_expired=True)
    try:
        out = apply_delta(base, args.delta, trusted, args.out)
    except DeltaBaseMismatch as e:
        return _fail(e, 3)
    finally:
        base.close()
    result = open_bundle(out, trusted, allow_expired=True)
    result.close()
    print(f"wrote {out}: {result.summary()} (from version {base.manifest.version} + delta, "
          "result checksum matches)")
    return 0


def _lists_from_args(args: argparse.Namespace) -> Lists:
    from netfilter.config import load_config
    from netfilter.lists import ListSource, load_lists

    if args.config:
        if getattr(args, "ordered", None):
            raise NetfilterError("--config", "use either --config or --list/--trust, not both")
        from netfilter.engine import Engine

        return Engine(load_config(args.config)).lists
    sources: list[dict[str, Any]] = []
    for dest, value in getattr(args, "ordered", None) or []:
        if dest == "list":
            sources.append({"path": value, "trusted_keys": [], "hmac_key": None})
        elif not sources:
            raise NetfilterError(f"--{dest.replace('_', '-')}", "must follow a --list")
        elif dest == "trust":
            sources[-1]["trusted_keys"].append(value)
        else:
            sources[-1]["hmac_key"] = value
    if not sources:
        raise NetfilterError("check", "no lists: give --config FILE or --list BUNDLE --trust PUB")
    for source in sources:
        if not source["trusted_keys"]:
            raise NetfilterError(source["path"], "no --trust key given for this --list")
    return load_lists([ListSource(**s) for s in sources])


def _cmd_check(args: argparse.Namespace) -> int:
    from netfilter.canonical import InvalidURL, canonicalize

    lists = _lists_from_args(args)
    status = 0
    for url in args.urls:
        tried: list[str] = []
        try:
            match = lists.check_url(url, tried)
            canonical = canonicalize(url)
        except InvalidURL as e:
            print(f"netfilter: error: {e}", file=sys.stderr)
            status = 1
            continue
        blocked = match is not None and match.blocks
        tried = list(dict.fromkeys(tried))
        if args.json:
            record: dict[str, Any] = {
                "url": url, "verdict": "block" if blocked else "allow",
                "list": match.list_id if match else None, "ref": match.ref if match else None,
                "category": match.category if match else None,
                "kind": match.kind if match else None,
            }
            if match is not None and not match.blocks:
                record["exception"] = match.allowed_by
            if args.explain:
                record.update(canonical=canonical, expressions=tried,
                              matched=match.expression if match else None)
            print(json.dumps(record, ensure_ascii=False))
            continue
        if match is None:
            print(f"ALLOW {url}")
        elif match.blocks:
            print(f"BLOCK {url} list={match.list_id} ref={match.ref}")
        else:
            print(f"ALLOW {url} exception={match.allowed_by} "
                  f"(lifts list={match.list_id} ref={match.ref})")
        if args.explain:
            print(f"  canonical: {canonical}")
            print(f"  tried:     {' '.join(tried)}")
            if match is not None:
                print(f"  matched:   {match.expression} ({match.kind}-level entry, "
                      f"category {match.category}, list version {match.list_version}, "
                      f"{match.source})")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    verbose = args.verbose or args.command == "serve"
    setup(logging.INFO if verbose else logging.WARNING, chosen_format(args.log_format))
    handlers = {"keys": _cmd_keys, "list": _cmd_list, "check": _cmd_check,
                "serve": _cmd_serve, "audit": _cmd_audit, "config": _cmd_config,
                "user": _cmd_user}
    try:
        return handlers[args.command](args)
    except NetfilterError as e:
        return _fail(e, 2 if isinstance(e, ListenError) else 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
