"""`netfilter audit follow` and `audit verify-proof`: reading the arguments and files,
printing the one line. The checks are `follow.follow` and `proofs.check_proof`."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from netfilter.audit import merkle
from netfilter.audit.checkpoint import CosignatureVerifier, new_cosignature_verifier
from netfilter.audit.follow import State, follow
from netfilter.audit.proofs import (
    MAX_PROOF_FILE,
    InputError,
    VerificationError,
    check_proof,
    parse_record,
)
from netfilter.errors import NetfilterError
from netfilter.keys import load_public_key

__all__ = ["follow_command", "verify_proof_command"]


def _witnesses(keys: list[str]) -> list[CosignatureVerifier]:
    out = []
    for vkey in keys:
        try:
            out.append(new_cosignature_verifier(vkey))
        except ValueError as e:
            raise NetfilterError("--witness", f"{vkey!r}: {e}") from None
    return out


def follow_command(args: argparse.Namespace) -> int:
    if args.url is None or args.key is None:
        raise NetfilterError("follow", "give URL and --key NODE.pub, or --nodes NODES.yaml")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= 600):
        raise NetfilterError("--timeout", "must be more than 0 and at most 600 seconds")
    result = follow(args.url, load_public_key(args.key), State(args.state),
                    allow_http=args.allow_http, entries=args.entries,
                    witnesses=_witnesses(args.witness), timeout=args.timeout)
    print(result.line())
    return 0


def _read(path: str, what: str, limit: int = MAX_PROOF_FILE) -> bytes:
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
    except FileNotFoundError:
        raise NetfilterError(path, f"{what} not found") from None
    except OSError as e:
        raise NetfilterError(path, f"cannot read the {what} ({e.strerror})") from None
    if len(data) > limit:
        raise NetfilterError(path, f"longer than {limit} bytes: not a {what}")
    return data


_GIVEN = ("index", "leaf_hash", "event", "old_size", "old_root", "size", "root", "proof")


def _from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON object of a proof given with --index/--old-size ... on the command line."""
    if args.proof is None:
        raise InputError("verify-proof", "give a proof FILE, or --proof with the fields "
                                         "(see --help)")
    if (args.index is None) == (args.old_size is None):
        raise InputError("verify-proof", "give exactly one of --index (inclusion) and "
                                         "--old-size (consistency)")
    if args.size is None:
        raise InputError("--size", "required with a proof on the command line")
    record: dict[str, Any] = {"tree_size": args.size}
    if args.index is not None:
        record.update(index=args.index, inclusion=args.proof)
        if args.leaf_hash is not None:
            record["leaf_hash"] = args.leaf_hash
        if args.event is not None:
            record["event"] = args.event
        if args.root is not None:
            record["root"] = args.root
    else:
        if args.leaf_hash is not None or args.event is not None:
            raise InputError("--old-size", "a consistency proof has no leaf")
        record.update(old_size=args.old_size, consistency=args.proof)
        if args.old_root is not None:
            record["old_root"] = args.old_root
        if args.root is not None:
            record["new_root"] = args.root
    return record


def verify_proof_command(args: argparse.Namespace) -> int:
    given = [name for name in _GIVEN if getattr(args, name) is not None]
    if (args.checkpoint or args.old_checkpoint) and not args.key:
        raise InputError("--key", "required to verify --checkpoint or --old-checkpoint")
    key = load_public_key(args.key) if args.key else None
    if args.file is not None:
        if given:
            raise InputError(f"--{given[0].replace('_', '-')}",
                             "a proof FILE or the fields on the command line, not both")
        where = "stdin" if args.file == "-" else args.file
        record = parse_record(_read(args.file, "proof file"), where)
    else:
        where = "verify-proof"
        record = _from_arguments(args)
    checkpoint = _read(args.checkpoint, "checkpoint") if args.checkpoint else None
    old = _read(args.old_checkpoint, "checkpoint") if args.old_checkpoint else None
    if old is not None and "consistency" not in record:
        raise InputError("--old-checkpoint", "only for a consistency proof")
    try:
        result = check_proof(record, where, key=key, checkpoint=checkpoint,
                             old_checkpoint=old)
    except merkle.ProofError:
        kind = "inclusion" if "inclusion" in record else "consistency"
        raise VerificationError(where, f"invalid transparency proof: the {kind} proof does "
                                       "not lead to the root") from None
    print(f"OK {result.kind} proof: {result.text}")
    return 0
