"""`netfilter audit follow --nodes NODES.yaml`: one auditor over many nodes' logs.

At scale each node keeps its own log (origin `<node.id>`, its own key), so an
auditor or a witness follows them all in one run: each node with `follow.follow`
and its own state directory (DIR/<name>), a few at a time, each response bounded
by the time-out. One line per node and a summary. A node whose log does not verify
(a fork: a checkpoint of the same size with another root, or one the kept one is
not part of) is named; a node that cannot be reached is named apart, because the
first is evidence against the node and the second may be the network.

    nodes:
      - name: gw-01                       # the state directory's name under DIR
        url: https://gw-01.example/log/   # the node's tlog-tiles base URL
        key: keys/gw-01.pub               # relative to NODES.yaml
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netfilter.audit import merkle
from netfilter.audit.checkpoint import CosignatureVerifier
from netfilter.audit.fetch import TIMEOUT, FetchError, base_url
from netfilter.audit.follow import FollowResult, State, follow
from netfilter.audit.proofs import VerificationError
from netfilter.audit.tilereader import TileError
from netfilter.errors import NetfilterError
from netfilter.keys import PublicKey, load_public_key
from netfilter.listsource import read_yaml_file

__all__ = ["JOBS", "MAX_NODES", "Node", "NodeResult", "Status", "exit_code",
           "follow_many", "load_nodes", "summary"]

MAX_NODES = 64
"""Nodes in one run unless --max-nodes says otherwise (a typo must not fan out)."""
JOBS = 4
"""Nodes followed at once: enough to hide round trips, few enough for a small host."""
MAX_JOBS = 16

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class Status(enum.Enum):
    """What one node's round showed, worst last (the exit code follows the worst)."""

    CONSISTENT = "consistent"
    UNREACHABLE = "UNREACHABLE"
    ERROR = "ERROR"  # the node's entry or its state directory: for the operator to fix
    NOT_CONSISTENT = "NOT CONSISTENT"


_EXIT = {Status.CONSISTENT: 0, Status.NOT_CONSISTENT: 1, Status.ERROR: 2,
         Status.UNREACHABLE: 3}


@dataclass(frozen=True)
class Node:
    """One entry of NODES.yaml, its key loaded and its URL checked."""

    name: str
    url: str
    key: PublicKey


@dataclass
class NodeResult:
    """A node's round: the follow result when it verified, else the reason."""

    node: Node
    status: Status
    result: FollowResult | None = None
    reason: str = ""

    def line(self) -> str:
        if self.result is not None:
            return f"{self.node.name}: {self.result.line()}"
        reason = self.reason.replace(f"{Status.NOT_CONSISTENT.value}: ", "")  # said once
        return f"{self.node.name}: {self.status.value}: {reason}"


def load_nodes(path: str | Path, *, allow_http: bool = False,
               max_nodes: int = MAX_NODES) -> list[Node]:
    """The nodes of NODES.yaml; every mistake (a key, a URL, a name) before any fetch."""
    raw: Any = read_yaml_file(path)
    entries = raw.get("nodes") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise NetfilterError(path, "want a list of nodes (name, url, key) under `nodes:`")
    if len(entries) > max_nodes:
        raise NetfilterError(path, f"{len(entries)} nodes, more than the {max_nodes} of "
                                   "one run (--max-nodes)")
    base = Path(path).parent
    nodes: list[Node] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries, 1):
        where = f"{path}: node {i}"
        if not isinstance(entry, dict) or set(entry) != {"name", "url", "key"}:
            raise NetfilterError(where, "want exactly the keys name, url and key")
        name, url, key = entry["name"], entry["url"], entry["key"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise NetfilterError(where, f"name {name!r}: letters, digits, '.', '_', '-' "
                                        "(it names the node's state directory)")
        if name.lower() in seen:
            raise NetfilterError(where, f"name {name!r} twice")
        seen.add(name.lower())
        if not isinstance(url, str) or not isinstance(key, str):
            raise NetfilterError(where, "url and key are strings")
        nodes.append(Node(name, base_url(url, allow_http=allow_http),
                          load_public_key(base / key)))
    return nodes


def _one(node: Node, state_dir: Path, witnesses: Sequence[CosignatureVerifier],
         timeout: float, entries: bool) -> NodeResult:
    """Follow one node; its failure is its line, never the run's."""
    try:
        result = follow(node.url, node.key, State(state_dir / node.name), allow_http=True,
                        entries=entries, witnesses=witnesses, timeout=timeout)
    except FetchError as e:
        return NodeResult(node, Status.UNREACHABLE, reason=str(e))
    except (VerificationError, TileError, merkle.ProofError) as e:
        return NodeResult(node, Status.NOT_CONSISTENT, reason=str(e))
    except NetfilterError as e:
        return NodeResult(node, Status.ERROR, reason=str(e))
    return NodeResult(node, Status.CONSISTENT, result)


def follow_many(nodes: Sequence[Node], state_dir: str | Path, *,
                witnesses: Sequence[CosignatureVerifier] = (), timeout: float = TIMEOUT,
                jobs: int = JOBS, entries: bool = False,
                after: Callable[[NodeResult, State], None] | None = None
                ) -> list[NodeResult]:
    """Every node's round, `jobs` at a time, in the order of `nodes`. `after` runs in
    the node's thread once its round is done (the witness cosigns there)."""
    directory = Path(state_dir)
    if directory.exists() and not directory.is_dir():
        raise NetfilterError(directory, "not a directory (the --state of follow)")

    def run(node: Node) -> NodeResult:
        outcome = _one(node, directory, witnesses, timeout, entries)
        if after is not None:
            try:
                after(outcome, State(directory / node.name))
            except NetfilterError as e:
                outcome = NodeResult(node, Status.ERROR, reason=str(e))
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, min(jobs, MAX_JOBS, len(nodes)))) as pool:
        return list(pool.map(run, nodes))


def exit_code(results: Sequence[NodeResult]) -> int:
    """0 all consistent; 1 a node's log does not verify (whatever else); 2 a node's
    entry or state is wrong; 3 only that some node could not be reached."""
    codes = {_EXIT[r.status] for r in results}
    for code in (1, 2, 3):
        if code in codes:
            return code
    return 0


def summary(results: Sequence[NodeResult]) -> str:
    """The last line: counts, and the nodes that were not consistent, by name."""
    parts = [f"{len(results)} nodes"]
    for status in Status:
        names = [r.node.name for r in results if r.status is status]
        if status is Status.CONSISTENT:
            parts.append(f"{len(names)} consistent")
        elif names:
            parts.append(f"{len(names)} {status.value} ({', '.join(names)})")
    return "; ".join(parts)
