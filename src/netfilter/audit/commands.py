"""`netfilter audit ...`: the auditor's commands over a node's log."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

from netfilter.audit import merkle
from netfilter.audit.note import Signer
from netfilter.audit.report import authority_export, build_report, render
from netfilter.audit.store import AuditStore
from netfilter.audit.tiles import write_tiles
from netfilter.audit.tileserver import serve_tiles
from netfilter.audit.verify import checkpoint_origin, verify_log
from netfilter.audit.witness import add_cosignatures, with_cosignatures
from netfilter.config import load_config, parse_hostport
from netfilter.errors import NetfilterError
from netfilter.keys import load_private_key, load_public_key

__all__ = ["run"]


def _store(args: argparse.Namespace) -> AuditStore:
    if args.log:
        return AuditStore(args.log, create=False)
    settings = load_config(args.config)
    if settings.audit is None:
        raise NetfilterError(args.config, "has no audit section")
    return AuditStore(settings.resolve(settings.audit.path), create=False)


def _export_signer(store: AuditStore, args: argparse.Namespace) -> Signer:
    """The node key and its name (the log's origin) that sign the authority export."""
    if args.key:
        latest = store.latest_checkpoint()
        if latest is None:
            raise NetfilterError(store.path, "no checkpoint yet to take the log's origin from")
        return Signer.from_private_key(checkpoint_origin(latest.note), load_private_key(args.key))
    if not args.config:
        raise NetfilterError("--key", "required with --log")
    settings = load_config(args.config)
    return Signer.from_private_key(settings.node.id,
                                   load_private_key(settings.resolve(settings.node.key)))


def _read_checkpoint_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise NetfilterError(path, "checkpoint file not found") from e
    except OSError as e:
        raise NetfilterError(path, f"cannot read the checkpoint ({e.strerror})") from e


def run(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.audit_cmd == "checkpoint":
        latest = store.latest_checkpoint()
        if latest is None:
            raise NetfilterError(store.path, "no signed checkpoint yet")
        sys.stdout.write(with_cosignatures(store, latest).decode())
        return 0
    if args.audit_cmd == "cosign":
        latest = store.latest_checkpoint()
        if latest is None:
            raise NetfilterError(store.path, "no signed checkpoint yet")
        keys = list(args.witness)
        if not keys and args.config:
            settings = load_config(args.config)
            keys = list(settings.audit.witnesses) if settings.audit else []
        text = sys.stdin.read() if args.signatures == "-" else Path(args.signatures).read_text()
        names = add_cosignatures(store, latest, text, keys)
        print(f"stored cosignatures of checkpoint {latest.size} by {', '.join(names)}")
        return 0
    if args.audit_cmd == "tiles":
        size = write_tiles(store, args.out)
        print(f"wrote tlog-tiles of {size} events to {args.out}")
        if args.listen:
            host, port = parse_hostport(args.listen)
            server = serve_tiles(args.out, host, port)
            print(f"serving {args.out} on http://{args.listen}/ (read-only)")
            try:
                server.serve_forever()
            finally:
                server.server_close()
        return 0
    if args.audit_cmd == "report":
        sys.stdout.write(render(build_report(store, args.start, args.end), args.format))
        return 0
    if args.audit_cmd == "export-authority":
        signer = _export_signer(store, args)
        sys.stdout.write(authority_export(store, args.start, args.end, signer).decode())
        return 0
    if args.audit_cmd == "verify":
        since = _read_checkpoint_file(args.since) if args.since else None
        report = verify_log(store, load_public_key(args.trust), since)
        summary = (f"{report.size} events, {report.checkpoints} signed checkpoints, "
                   f"{report.removed} event bodies removed by retention (leaf hashes kept)")
        if report.since is not None:
            summary += f", consistent with your checkpoint of size {report.since}"
        if report.ok:
            print(f"OK {store.path}: {summary}")
            return 0
        for problem in report.problems:
            print(f"FAIL {problem}")
        print(f"FAIL {store.path}: {len(report.problems)} problem(s); {summary}")
        return 1
    return _prove(store, args)


def _prove(store: AuditStore, args: argparse.Namespace) -> int:
    size = args.size
    if size is None:
        latest = store.latest_checkpoint()
        if latest is None:
            raise NetfilterError(store.path, "no signed checkpoint yet: give --size")
        size = latest.size
    if not 0 < size <= store.size():
        raise NetfilterError("--size", f"must be 1..{store.size()}")
    b64 = [base64.b64encode(h).decode() for h in _proof(store, args, size)]
    if args.index is not None:
        leaf = store.leaf(args.index)
        assert leaf is not None
        event = leaf.event.decode() if leaf.event is not None else None
        record = {"index": args.index, "tree_size": size, "event": event, "inclusion": b64}
    else:
        record = {"old_size": args.old_size, "tree_size": size, "consistency": b64}
    if args.json:
        print(json.dumps(record, ensure_ascii=False))
    else:
        for key, value in record.items():
            if isinstance(value, list):
                print(f"{key}:")
                for item in value:
                    print(f"  {item}")
            elif value is None:
                print(f"{key}: (removed by retention; its leaf hash is in the tree)")
            else:
                print(f"{key}: {value}")
    return 0


def _proof(store: AuditStore, args: argparse.Namespace, size: int) -> list[bytes]:
    try:
        if args.index is not None:
            return merkle.inclusion_proof(args.index, size, store)
        return merkle.consistency_proof(args.old_size, size, store)
    except ValueError as e:
        raise NetfilterError("--index" if args.index is not None else "--old-size",
                             str(e)) from e
