"""The arguments of `netfilter audit follow` and `audit verify-proof`: commands an
auditor runs without the node's log, so they take no --log/--config. Outside the
`audit` package, whose import loads the signature code (~0.2 s): every start of
`netfilter` builds these parsers."""

from __future__ import annotations

import argparse

__all__ = ["FORMAT", "add_auditor_commands", "add_witness_arguments"]

EXIT = """exit status: 0 verified; 1 it does not verify (or the node cannot be read);
2 a mistake in the command (an argument, a file), said in one line."""

FORMAT = """\
A proof is one JSON object, as `netfilter audit prove ... --json` prints it:

  inclusion:   {"index": N, "tree_size": M, "event": "<canonical JSON>" or null,
                "leaf_hash": H, "inclusion": [H, ...], "root": H,
                "checkpoint": "<the node's signed checkpoint of size M>"}
  consistency: {"old_size": M, "old_root": H, "tree_size": N, "new_root": H,
                "consistency": [H, ...], "checkpoint": "<signed checkpoint of size N>",
                "old_checkpoint": "<signed checkpoint of size M>"}

H is a SHA-256 hash: base64 of its 32 bytes (44 characters) or 64 hex digits. An
"event" is hashed (RFC 9162 leaf hash) and must give "leaf_hash"; one of them is
enough. Without --key the roots are taken from the file and the proof only shows
something against a root you trust; with --key the node's signed checkpoint (the
file's "checkpoint", or --checkpoint) gives the root, and its "old_checkpoint" (or
--old-checkpoint) the old root. The same fields can be given on the command line
instead of FILE:
  verify-proof --index 9 --size 16 --leaf-hash H --proof H H H H --root H
  verify-proof --old-size 5 --old-root H --size 16 --root H --proof H H H

"""


def _follow(asub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = asub.add_parser(
        "follow", help="fetch a node's checkpoint and tiles, check it extends the one kept",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fetch URL/checkpoint, verify it with the node's key, prove from "
                    "URL/tile/... that it extends the checkpoint kept in DIR, and keep "
                    "it. One line per run: old size -> new size, consistent, cosigners.",
        epilog="A rewritten or forked log: one line, exit 1; the kept checkpoint stays,\n"
               "the other is saved beside it as DIR/conflicting-checkpoint. An older\n"
               "checkpoint of the same history (a cache that lags): exit 0, the kept one\n"
               "stays.\n\n" + MANY + EXIT)
    cmd.add_argument("url", nargs="?", metavar="URL", help="the log's tlog-tiles base URL "
                     "(https://; http:// only on loopback)")
    cmd.add_argument("--key", metavar="NODE.pub", help="the node's public key (PEM)")
    cmd.add_argument("--state", required=True, metavar="DIR",
                     help="where the last verified checkpoint is kept (created 0700); "
                          "with --nodes, DIR/NAME per node")
    _many(cmd)
    cmd.add_argument("--entries", action="store_true",
                     help="also check the new entry bundles against the level-0 tiles")
    cmd.add_argument("--witness", action="append", default=[], metavar="VKEY",
                     help="a witness's cosigner key: its cosignature is verified")
    cmd.add_argument("--allow-http", action="store_true",
                     help="allow http:// to a host that is not a loopback address")
    cmd.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                     help="for each whole response (default 10)")


MANY = """With --nodes NODES.yaml (instead of URL and --key), every node listed
  nodes:
    - {name: gw-01, url: "https://gw-01.example/log/", key: keys/gw-01.pub}
is followed (a few at once), one line each and a summary; exit 1 if a node's log
does not verify (named), 3 if the others verified but a node could not be read.

"""


def _many(cmd: argparse.ArgumentParser) -> None:
    """The options of one run over several nodes (follow, and the witness's cosign)."""
    cmd.add_argument("--nodes", metavar="NODES.yaml",
                     help="follow every node listed (name, url, key): one line each")
    cmd.add_argument("--jobs", type=int, default=4, metavar="N",
                     help="with --nodes: nodes followed at once (1-16, default 4)")
    cmd.add_argument("--max-nodes", type=int, default=64, metavar="N",
                     help="with --nodes: refuse a file listing more (default 64)")


def add_witness_arguments(cmd: argparse.ArgumentParser,
                          where: argparse._MutuallyExclusiveGroup) -> None:
    """`audit cosign --nodes`: the witness's side of cosign (no --log/--config)."""
    where.add_argument("--nodes", metavar="NODES.yaml",
                       help="as a witness: follow every node listed, cosign what verifies")
    cmd.add_argument("--state", metavar="DIR", help="with --nodes: DIR/NAME per node, "
                     "its kept checkpoint and the witness's cosignature of it")
    cmd.add_argument("--witness-key", metavar="FILE.key",
                     help="with --nodes: the witness's Ed25519 key (created 0600 if missing)")
    cmd.add_argument("--name", metavar="NAME",
                     help="with --nodes: the witness's name in its cosignatures")
    cmd.add_argument("--jobs", type=int, default=4, metavar="N",
                     help="with --nodes: nodes followed at once (1-16, default 4)")
    cmd.add_argument("--max-nodes", type=int, default=64, metavar="N",
                     help="with --nodes: refuse a file listing more (default 64)")
    cmd.add_argument("--allow-http", action="store_true",
                     help="allow http:// to a host that is not a loopback address")
    cmd.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                     help="for each whole response (default 10)")


def _verify_proof(asub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = asub.add_parser(
        "verify-proof", help="check an inclusion or consistency proof",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check an inclusion or a consistency proof of a node's log "
                    "(RFC 9162 2.1.3.2 and 2.1.4.2).", epilog=FORMAT + EXIT)
    cmd.add_argument("file", nargs="?", metavar="FILE",
                     help="the proof as JSON (- for stdin)")
    cmd.add_argument("--key", metavar="NODE.pub",
                     help="the node's public key: take the root from its signed checkpoint")
    cmd.add_argument("--checkpoint", metavar="FILE",
                     help="the node's signed checkpoint of the (new) tree size")
    cmd.add_argument("--old-checkpoint", metavar="FILE",
                     help="the node's signed checkpoint of the old size (consistency)")
    given = cmd.add_argument_group("a proof on the command line (instead of FILE)")
    given.add_argument("--index", type=int, help="inclusion: the leaf's index")
    given.add_argument("--leaf-hash", metavar="H", help="inclusion: the leaf hash")
    given.add_argument("--event", metavar="TEXT", help="inclusion: the event's canonical "
                       "JSON (hashed to its leaf hash)")
    given.add_argument("--old-size", type=int, help="consistency: the old tree size")
    given.add_argument("--old-root", metavar="H", help="consistency: the old root")
    given.add_argument("--size", type=int, help="the tree size")
    given.add_argument("--root", metavar="H", help="the root at --size")
    given.add_argument("--proof", nargs="*", metavar="H", help="the proof's hashes, in order")


def add_auditor_commands(asub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `follow` and `verify-proof` to the `audit` subcommands."""
    _follow(asub)
    _verify_proof(asub)
