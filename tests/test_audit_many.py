"""One auditor and one witness over several nodes' logs (issue 17, "One auditor,
many nodes"): three nodes, each its own key and origin, served by `netfilter audit
tiles --listen` on loopback, followed twice as they grow with `audit follow --nodes`;
one node rewritten (and one forked at the same size) is caught and named, the others
fine; a node that is not listening is reported as unreachable, with its own exit
code; the witness (`audit cosign --nodes`) cosigns what it verified and never a fork,
and its cosignature verifies with its public key, at the node too once stored there.
Traffic only to loopback.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from netfilter.audit.checkpoint import Checkpoint, new_cosignature_verifier
from netfilter.audit.note import open_note
from netfilter.keys import generate_keypair
from tests.test_audit_follow import Log, TileNode

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("gw-a", "gw-b", "gw-c")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[dict[str, Log], dict[str, TileNode], Path]]:
    """Three nodes (10, 20, 30 events), served, and NODES.yaml naming them."""
    logs = {name: Log(tmp_path / name, f"{name}.example") for name in NAMES}
    for i, log in enumerate(logs.values(), 1):
        log.grow(10 * i)
    nodes = {name: TileNode(log) for name, log in logs.items()}
    listing = tmp_path / "nodes.yaml"
    listing.write_text(yaml.safe_dump({"nodes": [
        {"name": name, "url": nodes[name].url, "key": str(logs[name].pub.relative_to(
            tmp_path))} for name in NAMES]}))
    yield logs, nodes, listing
    for server in nodes.values():
        server.stop()


def audit(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netfilter.cli", "audit", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def lines(result: subprocess.CompletedProcess[str], status: int) -> dict[str, str]:
    """The report by node name, with "summary" for the last line."""
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr, result.stderr
    out = result.stdout.splitlines()
    by_name = {line.split(":", 1)[0]: line for line in out[:-1] if ":" in line}
    by_name["summary"] = out[-1]
    return by_name


def test_follow_many_as_they_grow_and_a_fork_named(
        fleet: tuple[dict[str, Log], dict[str, TileNode], Path], tmp_path: Path) -> None:
    logs, _, listing = fleet
    state = tmp_path / "auditor"
    report = lines(audit("follow", "--nodes", listing, "--state", state), 0)
    for i, name in enumerate(NAMES, 1):
        assert f"{name}: {name}.example at " in report[name]
        assert f": 0 -> {10 * i}, consistent" in report[name]
    assert report["summary"] == "3 nodes; 3 consistent"
    assert stat.S_IMODE(os.stat(state / "gw-a").st_mode) == 0o700
    for log in logs.values():
        log.grow(300)  # across a full tile
    report = lines(audit("follow", "--nodes", listing, "--state", state), 0)
    assert ": 10 -> 310, consistent" in report["gw-a"]
    assert ": 30 -> 330, consistent" in report["gw-c"]
    kept = (state / "gw-b" / "checkpoint").read_bytes()
    logs["gw-b"].rewrite(keep=100, count=250)  # 350 events, signed with gw-b's own key
    report = lines(audit("follow", "--nodes", listing, "--state", state), 1)
    assert report["gw-b"].startswith("gw-b: NOT CONSISTENT: ")
    assert report["gw-b"].count("NOT CONSISTENT") == 1
    assert "rewritten or forked" in report["gw-b"]
    assert ": 310 -> 310, consistent" in report["gw-a"]
    assert report["summary"] == "3 nodes; 2 consistent; 1 NOT CONSISTENT (gw-b)"
    assert (state / "gw-b" / "checkpoint").read_bytes() == kept
    assert (state / "gw-b" / "conflicting-checkpoint").exists()
    assert not (state / "gw-a" / "conflicting-checkpoint").exists()


def test_same_size_other_root_is_a_fork(
        fleet: tuple[dict[str, Log], dict[str, TileNode], Path], tmp_path: Path) -> None:
    logs, _, listing = fleet
    state = tmp_path / "auditor"
    lines(audit("follow", "--nodes", listing, "--state", state), 0)
    logs["gw-c"].rewrite(keep=29, count=1)  # size 30 again, another root
    report = lines(audit("follow", "--nodes", listing, "--state", state), 1)
    assert "NOT CONSISTENT" in report["gw-c"] and "size 30" in report["gw-c"]
    assert report["summary"].endswith("1 NOT CONSISTENT (gw-c)")


def test_unreachable_node_has_its_own_status(
        fleet: tuple[dict[str, Log], dict[str, TileNode], Path], tmp_path: Path) -> None:
    logs, nodes, listing = fleet
    state = tmp_path / "auditor"
    nodes["gw-a"].stop()
    report = lines(audit("follow", "--nodes", listing, "--state", state, "--jobs", "2"), 3)
    assert report["gw-a"].startswith("gw-a: UNREACHABLE: ") and "cannot fetch" in report["gw-a"]
    assert report["summary"] == "3 nodes; 2 consistent; 1 UNREACHABLE (gw-a)"
    logs["gw-c"].rewrite(keep=5, count=40)
    report = lines(audit("follow", "--nodes", listing, "--state", state), 1)  # worst wins
    assert report["summary"] == ("3 nodes; 1 consistent; 1 UNREACHABLE (gw-a); "
                                 "1 NOT CONSISTENT (gw-c)")


def test_witness_cosigns_what_it_verified_and_never_a_fork(
        fleet: tuple[dict[str, Log], dict[str, TileNode], Path], tmp_path: Path) -> None:
    logs, _, listing = fleet
    state = tmp_path / "witness"
    key = tmp_path / "witness.key"
    args = ("cosign", "--nodes", listing, "--state", state, "--witness-key", key,
            "--name", "witness.example")
    first = audit(*args)
    report = lines(first, 0)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    vkey = first.stdout.splitlines()[0].removeprefix("witness ")
    verifier = new_cosignature_verifier(vkey)
    assert "witness.example (cosigned now)" in report["gw-a"]
    for name, log in logs.items():
        cosigned = (state / name / "cosigned-checkpoint").read_bytes()
        note = open_note(cosigned, [verifier, log.signer.verifier()])
        assert {s.name for s in note.sigs} == {"witness.example", f"{name}.example"}
        line = (state / name / "cosignature").read_text()
        assert line.startswith("— witness.example ") and cosigned.endswith(line.encode())
    # the node stores the line (its existing `audit cosign --log`), and serves it
    stored = audit("cosign", "--log", logs["gw-a"].path, "--witness", vkey,
                   state / "gw-a" / "cosignature")
    assert stored.returncode == 0 and "by witness.example" in stored.stdout, stored
    served = audit("checkpoint", "--log", logs["gw-a"].path)
    open_note(served.stdout.encode(), [verifier])
    # a fork is caught and not cosigned: the old cosignature stays, nothing new
    before = (state / "gw-b" / "cosignature").read_bytes()
    logs["gw-b"].rewrite(keep=10, count=15)
    logs["gw-a"].grow(5)
    report = lines(audit(*args), 1)
    assert "NOT CONSISTENT" in report["gw-b"] and "cosigned" not in report["gw-b"]
    assert report["summary"].endswith("1 NOT CONSISTENT (gw-b)")
    assert (state / "gw-b" / "cosignature").read_bytes() == before
    note = open_note((state / "gw-a" / "cosigned-checkpoint").read_bytes(), [verifier])
    assert Checkpoint.parse(note.text).size == 15
    # an auditor following with the witness key sees the stored cosignature verified
    (logs["gw-a"].tiles / "checkpoint").write_bytes(
        (state / "gw-a" / "cosigned-checkpoint").read_bytes())
    report = lines(audit("follow", "--nodes", listing, "--state", tmp_path / "auditor",
                         "--witness", vkey), 0)  # a new auditor: first sight of each
    assert "witness.example (verified)" in report["gw-a"]


def test_user_mistakes_one_line_exit_2(
        fleet: tuple[dict[str, Log], dict[str, TileNode], Path], tmp_path: Path) -> None:
    _, nodes, listing = fleet
    state = tmp_path / "state"
    bad = tmp_path / "bad.yaml"
    cases: list[tuple[tuple[str | Path, ...], str, str]] = [
        (("follow", "--nodes", tmp_path / "none.yaml", "--state", state), "", "not found"),
        (("follow", "--nodes", listing, "--state", state, "--jobs", "0"), "", "--jobs"),
        (("follow", "--nodes", listing, "--state", state, "--max-nodes", "2"), "",
         "more than the 2"),
        (("follow", "--nodes", listing, "--state", state, "--key", listing), "", "either"),
        (("follow", "--state", state), "", "give URL and --key"),
        (("follow", "--nodes", bad, "--state", state), "[]", "want a list of nodes"),
        (("follow", "--nodes", bad, "--state", state),
         "nodes: [{name: ../x, url: 'http://127.0.0.1/', key: k.pub}]", "name '../x'"),
        (("follow", "--nodes", bad, "--state", state),
         "nodes: [{name: x, url: 'http://node.example/', key: k.pub}]", "loopback"),
        (("follow", "--nodes", bad, "--state", state),
         "nodes: [{name: x, url: 'http://127.0.0.1/', key: none.pub}]", "not found"),
        (("follow", "--nodes", bad, "--state", state),
         "nodes: [{name: x, url: 'http://127.0.0.1/'}]", "name, url and key"),
        (("cosign", "--nodes", listing, "--state", state), "", "--witness-key"),
        (("cosign", "--nodes", listing, "--state", state, "--witness-key",
          tmp_path / "w.key", "--name", "a b"), "", "--name"),
    ]
    for args, text, needle in cases:
        bad.write_text(text)
        result = audit(*args)
        assert result.returncode == 2, result
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("netfilter: error: ") and needle in line, line
        assert result.stdout == ""
    assert not state.exists()
    loose = tmp_path / "loose.key"
    generate_keypair(tmp_path / "loose")
    loose.chmod(0o644)
    result = audit("cosign", "--nodes", listing, "--state", state, "--witness-key", loose,
                   "--name", "witness.example")
    assert result.returncode == 2 and "0644" in result.stderr, result
    assert nodes  # the nodes ran: no mistake above reached them


def test_state_of_another_node_is_an_error_not_a_fork(
        fleet: tuple[dict[str, Log], dict[str, TileNode], Path], tmp_path: Path) -> None:
    """A kept checkpoint that the node's key does not verify (state directories swapped,
    or altered) is for the operator to fix: exit 2, named, nothing kept over it."""
    _, _, listing = fleet
    state = tmp_path / "auditor"
    lines(audit("follow", "--nodes", listing, "--state", state), 0)
    a, b = state / "gw-a" / "checkpoint", state / "gw-b" / "checkpoint"
    other = b.read_bytes()
    a.write_bytes(other)
    report = lines(audit("follow", "--nodes", listing, "--state", state), 2)
    assert report["gw-a"].startswith("gw-a: ERROR: ") and "does not verify" in report["gw-a"]
    assert report["summary"] == "3 nodes; 2 consistent; 1 ERROR (gw-a)"
    assert a.read_bytes() == other
