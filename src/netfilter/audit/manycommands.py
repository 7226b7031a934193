"""`audit follow --nodes` and `audit cosign --nodes`: reading the arguments, printing
one line per node and the summary. The rounds are `many.follow_many`; the witness's
cosigning is `cosign.Witness`."""

from __future__ import annotations

import argparse
import math

from netfilter.audit.auditor import _witnesses
from netfilter.audit.many import MAX_JOBS, NodeResult, exit_code, follow_many, load_nodes, summary
from netfilter.errors import NetfilterError

__all__ = ["cosign_nodes_command", "follow_nodes_command"]


def _check(args: argparse.Namespace) -> None:
    """The mistakes of the command line, before any file is read."""
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= 600):
        raise NetfilterError("--timeout", "must be more than 0 and at most 600 seconds")
    if not 1 <= args.jobs <= MAX_JOBS:
        raise NetfilterError("--jobs", f"must be 1..{MAX_JOBS}")
    if not 1 <= args.max_nodes <= 10_000:
        raise NetfilterError("--max-nodes", "must be 1..10000")


def _print(results: list[NodeResult]) -> int:
    for outcome in results:
        print(outcome.line())
    print(summary(results))
    return exit_code(results)


def follow_nodes_command(args: argparse.Namespace) -> int:
    """`audit follow --nodes NODES.yaml --state DIR`."""
    if args.url is not None or args.key is not None:
        raise NetfilterError("--nodes", "give either URL and --key, or --nodes (whose "
                                        "entries name each node's URL and key)")
    if args.entries:
        raise NetfilterError("--entries", "one node at a time (without --nodes)")
    _check(args)
    witnesses = _witnesses(args.witness)
    nodes = load_nodes(args.nodes, allow_http=args.allow_http, max_nodes=args.max_nodes)
    return _print(follow_many(nodes, args.state, witnesses=witnesses,
                              timeout=args.timeout, jobs=args.jobs))


def cosign_nodes_command(args: argparse.Namespace) -> int:
    """`audit cosign --nodes NODES.yaml --state DIR --witness-key FILE --name NAME`."""
    from netfilter.audit.cosign import Witness, load_witness

    for option, value in (("--state", args.state), ("--witness-key", args.witness_key),
                          ("--name", args.name)):
        if not value:
            raise NetfilterError(option, "required with --nodes")
    if args.signatures is not None:
        raise NetfilterError(args.signatures, "a witness signs; FILE is for a node's "
                                              "--log/--config")
    _check(args)
    witnesses = _witnesses(args.witness)
    nodes = load_nodes(args.nodes, allow_http=args.allow_http, max_nodes=args.max_nodes)
    witness = Witness(load_witness(args.witness_key, args.name))
    results = follow_many(nodes, args.state, witnesses=witnesses, timeout=args.timeout,
                          jobs=args.jobs, after=witness)
    print(f"witness {witness.signer.verifier().vkey}")
    return _print(results)
