"""`netfilter audit ...`: the auditor's commands over a node's log."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path

from netfilter.audit import merkle
from netfilter.audit.note import Signer
from netfilter.audit.proofs import proof_record
from netfilter.audit.report import authority_export, build_report, render
from netfilter.audit.store import AuditStore, keys_path
from netfilter.audit.tiles import write_tiles
from netfilter.audit.verify import VerifyReport, checkpoint_origin, verify_log
from netfilter.audit.witness import add_cosignatures, with_cosignatures
from netfilter.config import load_config, parse_hostport
from netfilter.errors import ListenError, NetfilterError
from netfilter.keys import load_private_key, load_public_key

__all__ = ["exit_status", "run"]

AUDITOR_COMMANDS = ("follow", "verify-proof")
"""Commands whose user mistakes exit 2 (the older ones keep their 1)."""


def exit_status(args: argparse.Namespace, error: NetfilterError) -> int:
    """1 when what was checked does not verify (or the node cannot be read); 2 for a
    mistake in the command of follow or verify-proof; 1 for the other commands."""
    if args.audit_cmd not in AUDITOR_COMMANDS and not getattr(args, "nodes", None):
        return 1
    from netfilter.audit.fetch import FetchError
    from netfilter.audit.proofs import VerificationError
    from netfilter.audit.tilereader import TileError

    return 1 if isinstance(error, FetchError | TileError | VerificationError
                           | merkle.ProofError) else 2


def _log_path(args: argparse.Namespace) -> Path:
    """The log named by --log or --config, checked to be an audit log before anything
    opens it for writing (the store would create the tables an edited file lacks)."""
    if args.log:
        path = Path(args.log)
    else:
        settings = load_config(args.config)
        if settings.audit is None:
            raise NetfilterError(args.config, "has no audit section")
        path = settings.resolve(settings.audit.path)
    if not path.exists():
        raise NetfilterError(path, "audit log not found")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {name for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.Error as e:
        raise NetfilterError(path, f"cannot open the audit log ({e})") from e
    missing = sorted({"leaves", "checkpoints"} - tables)
    if missing:
        raise NetfilterError(path, f"not an audit log: it has no {' or '.join(missing)} table")
    return path


def _store(path: Path, *, writes: bool = False) -> AuditStore:
    """The log, opened read only unless the command `writes` to it (cosign)."""
    try:
        return AuditStore(path, create=False, read_only=not writes)
    except sqlite3.Error as e:
        raise NetfilterError(path, f"cannot open the audit log ({e})") from e


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
    if getattr(args, "nodes", None):  # one auditor or witness over many nodes
        from netfilter.audit.manycommands import cosign_nodes_command, follow_nodes_command

        return (follow_nodes_command if args.audit_cmd == "follow"
                else cosign_nodes_command)(args)
    if args.audit_cmd == "follow":
        from netfilter.audit.auditor import follow_command

        return follow_command(args)
    if args.audit_cmd == "verify-proof":
        from netfilter.audit.auditor import verify_proof_command

        return verify_proof_command(args)
    path = _log_path(args)
    if args.audit_cmd == "export":
        return _export(path, Path(args.out), args.mode)
    store = _store(path, writes=args.audit_cmd == "cosign")
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
        if args.signatures is None:
            raise NetfilterError("cosign", "give the witness's signature FILE (- for stdin)")
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
            from netfilter.web.tiles import serve_tiles  # the web stack: only when serving

            host, port = parse_hostport(args.listen)
            try:
                server = serve_tiles(args.out, host, port)
            except OSError as e:
                raise ListenError.from_os_error("tiles", host, port, e) from None
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
        return _verify(store, verify_log(store, load_public_key(args.trust), since))
    return _prove(store, args)


def _verify(store: AuditStore, report: VerifyReport) -> int:
    """FAIL lines, then WARN lines (what no checkpoint covers), then the verdict: the
    latest checkpoint's size and time are printed to compare with one an auditor holds."""
    summary = (f"{report.size} events, {report.checkpoints} signed checkpoints, "
               f"{report.removed} event bodies removed by retention (leaf hashes kept)")
    if report.latest is not None:
        summary += f", latest checkpoint: size {report.latest[0]}, signed at {report.latest[1]}"
    if report.since_consistent:
        summary += f", consistent with your checkpoint of size {report.since}"
    for problem in report.problems:
        print(f"FAIL {problem}")
    for warning in report.warnings:
        print(f"WARN {warning}")
    if report.ok:
        print(f"OK {store.path}: {summary}")
        return 0
    print(f"FAIL {store.path}: {len(report.problems)} problem(s); {summary}")
    return 1


def _export(source: Path, out: Path, octal: str) -> int:
    """A consistent copy of the log for an auditor: sqlite3's backup API (what a running
    node has only in its WAL is included), one file (no -wal), no pseudonym keys (an
    old-format log's table is dropped and the file rebuilt, so no freed page keeps them).
    It is meant to be handed over, so it may be readable by others (0644 by default)."""
    try:
        mode = int(octal, 8)
    except ValueError:
        raise NetfilterError("--mode", f"{octal!r} is not an octal file mode") from None
    if not 0 <= mode <= 0o644 or mode & ~0o644:
        raise NetfilterError("--mode", f"{octal} grants more than 0644")
    if out.resolve() in (source.resolve(), keys_path(source).resolve()):
        raise NetfilterError(out, "is the log itself (or its keys): give another file")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        dst = sqlite3.connect(tmp, isolation_level=None)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")
            dst.execute("PRAGMA secure_delete=ON")
            dst.execute("DROP TABLE IF EXISTS pseudonym_keys")
            dst.execute("VACUUM")
            if dst.execute("SELECT 1 FROM sqlite_master WHERE name = 'pseudonym_keys'"
                           ).fetchone() is not None:
                raise NetfilterError(tmp, "pseudonym keys are still in the export")
            (size,) = dst.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM leaves").fetchone()
            (signed,) = dst.execute("SELECT MAX(size) FROM checkpoints").fetchone()
        finally:
            dst.close()
            src.close()
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except sqlite3.Error as e:
        raise NetfilterError(source, f"cannot export the audit log ({e})") from e
    except OSError as e:
        raise NetfilterError(out, f"cannot write the export ({e.strerror or e})") from e
    finally:
        for name in (tmp, Path(f"{tmp}-journal"), Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            name.unlink(missing_ok=True)
    readable = "readable by every local user" if mode & 0o004 else "not world-readable"
    print(f"wrote {out}: {size} events, the latest signed checkpoint of size {signed or 0}; "
          f"no pseudonym keys; mode {mode:04o} ({readable})")
    return 0


def _prove(store: AuditStore, args: argparse.Namespace) -> int:
    """The proof as `verify-proof` reads it (--json), or as `key: value` lines."""
    size = args.size
    if size is None:
        latest = store.latest_checkpoint()
        if latest is None:
            raise NetfilterError(store.path, "no signed checkpoint yet: give --size")
        size = latest.size
    if not 0 < size <= store.size():
        raise NetfilterError("--size", f"must be 1..{store.size()}")
    try:
        record = proof_record(store, size, index=args.index, old_size=args.old_size)
    except ValueError as e:
        raise NetfilterError("--index" if args.index is not None else "--old-size",
                             str(e)) from e
    if args.json:
        print(json.dumps(record, ensure_ascii=False))
        return 0
    for key, value in record.items():
        if key in ("checkpoint", "old_checkpoint"):
            continue  # signed notes of several lines: in --json only
        if isinstance(value, list):
            print(f"{key}:")
            for item in value:
                print(f"  {item}")
        elif value is None:
            print(f"{key}: (removed by retention; its leaf hash is in the tree)")
        else:
            print(f"{key}: {value}")
    return 0
