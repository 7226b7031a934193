"""`netfilter audit prove --json` and `audit verify-proof`: the proofs an operator and
an auditor exchange.

Every proof `prove` makes over a log verifies (in-process, over every index and size;
through the command for a few), roots taken from the node's signed checkpoints with
--key; a flipped byte anywhere (a proof hash, the leaf hash, the event, a root, the
checkpoint) is refused with exit 1; transparency-dev's published vectors verify
through the command line form; user mistakes are one line with exit 2.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from netfilter.audit import merkle
from netfilter.audit.proofs import InputError, check_proof, parse_hash, proof_record
from netfilter.audit.store import AuditStore
from netfilter.keys import load_public_key
from tests.test_audit_cli import SIZES, Node, build_log, rewritten_log
from tests.test_audit_merkle import (
    CONSISTENCY_VECTORS,
    INCLUSION_VECTORS,
    LEAF_HASHES,
    ROOT_HASHES,
)

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netfilter.cli", "audit", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, input=stdin)


def run_all(cases: Sequence[Sequence[str | Path]]) -> list[subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: run(*args), cases))


def one_line(result: subprocess.CompletedProcess[str], status: int, *needles: str) -> None:
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netfilter: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Node:
    n = Node(tmp_path_factory.mktemp("proofs"))
    build_log(n.log, n.key)
    return n


def _flip(value: str) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[7] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


# ---------------------------------------------------------------- in-process, every proof
def test_every_proof_of_prove_verifies(node: Node) -> None:
    store = AuditStore(node.log, create=False)
    key = load_public_key(node.pub)
    for size in range(1, 38):
        for index in range(size):
            record = proof_record(store, size, index=index)
            assert check_proof(record, "t").kind == "inclusion"
            if size in SIZES:  # a signed checkpoint of that size gives the root
                assert "signed by" in check_proof(record, "t", key=key).text
            if record["inclusion"]:
                bad = dict(record, inclusion=[_flip(record["inclusion"][0]),
                                              *record["inclusion"][1:]])
                with pytest.raises(merkle.ProofError):
                    check_proof(bad, "t")
        for old in range(1, size + 1):
            record = proof_record(store, size, old_size=old)
            assert check_proof(record, "t").kind == "consistency"
            if record["consistency"]:
                bad = dict(record, consistency=[*record["consistency"][:-1],
                                                _flip(record["consistency"][-1])])
                with pytest.raises(merkle.ProofError):
                    check_proof(bad, "t")


def test_hashes_in_base64_or_hex() -> None:
    h = bytes(range(32))
    assert parse_hash(h.hex(), "x") == h == parse_hash(h.hex().upper(), "x")
    assert parse_hash(base64.b64encode(h).decode(), "x") == h
    for bad in ("", h.hex()[:-1], base64.b64encode(h[:31]).decode(), "=" * 44, 12, None):
        with pytest.raises(InputError):
            parse_hash(bad, "x")


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION_VECTORS)
def test_transparency_dev_inclusion_vectors(index: int, size: int, proof: list[bytes]) -> None:
    record: dict[str, Any] = {"index": index, "tree_size": size,
                              "leaf_hash": LEAF_HASHES[index].hex(),
                              "inclusion": [p.hex() for p in proof],
                              "root": ROOT_HASHES[size].hex()}
    check_proof(record, "vector")
    with pytest.raises(merkle.ProofError):
        check_proof(dict(record, root=ROOT_HASHES[size - 1].hex()), "vector")


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY_VECTORS)
def test_transparency_dev_consistency_vectors(old: int, new: int, proof: list[bytes]) -> None:
    record: dict[str, Any] = {"old_size": old, "old_root": ROOT_HASHES[old].hex(),
                              "tree_size": new, "new_root": ROOT_HASHES[new].hex(),
                              "consistency": [p.hex() for p in proof]}
    check_proof(record, "vector")
    with pytest.raises(merkle.ProofError):
        check_proof(dict(record, old_root=ROOT_HASHES[old - 1].hex()), "vector")


# ---------------------------------------------------------------- through the commands
def test_prove_then_verify_proof(node: Node, tmp_path: Path) -> None:
    made = run_all([("prove", "--log", node.log, "--index", "9", "--size", "16", "--json"),
                    ("prove", "--log", node.log, "--old", "5", "--new", "37", "--json"),
                    ("prove", "--log", node.log, "--index", "20", "--size", "30", "--json")])
    for result in made:
        assert result.returncode == 0, result
    inclusion, consistency, unsigned = (tmp_path / n for n in ("i.json", "c.json", "u.json"))
    for path, result in zip((inclusion, consistency, unsigned), made, strict=True):
        path.write_text(result.stdout)
    record = json.loads(inclusion.read_text())
    tampered = tmp_path / "t.json"
    tampered.write_text(json.dumps(dict(record, inclusion=[
        _flip(record["inclusion"][0]), *record["inclusion"][1:]])))
    event = tmp_path / "e.json"
    event.write_text(json.dumps(dict(record, event=record["event"].replace("R-9", "R-8"))))
    forged = tmp_path / "f.json"
    forged.write_text(json.dumps(dict(record, checkpoint=record["checkpoint"].replace(
        "\n16\n", "\n17\n"))))
    other_root = tmp_path / "r.json"
    other_root.write_text(json.dumps(dict(record, root=_flip(record["root"]))))
    results = run_all([
        ("verify-proof", inclusion),
        ("verify-proof", inclusion, "--key", node.pub),
        ("verify-proof", consistency, "--key", node.pub),
        ("verify-proof", unsigned, "--key", node.pub),
        ("verify-proof", tampered),
        ("verify-proof", event),
        ("verify-proof", forged, "--key", node.pub),
        ("verify-proof", other_root, "--key", node.pub),
        ("verify-proof", other_root),
    ])
    assert results[0].returncode == 0 and results[0].stdout.startswith(
        "OK inclusion proof: event 9 is in the tree of size 16"), results[0]
    assert "given in the file (unsigned)" in results[0].stdout
    assert results[1].returncode == 0 and "signed by" in results[1].stdout, results[1]
    assert results[2].returncode == 0, results[2]
    assert results[2].stdout.count("signed by") == 2  # both roots from signed checkpoints
    one_line(results[3], 2, "no signed checkpoint of size 30")  # --key: signed roots only
    one_line(results[4], 1, "invalid transparency proof")
    one_line(results[5], 1, "invalid transparency proof")
    one_line(results[6], 1, "does not verify with")
    one_line(results[7], 1, "not the signed checkpoint's root")
    one_line(results[8], 1, "invalid transparency proof")
    stdin = run("verify-proof", "-", stdin=inclusion.read_text())
    assert stdin.returncode == 0, stdin


def test_command_line_form_with_published_vectors() -> None:
    index, size, proof = INCLUSION_VECTORS[-1]
    old, new, cproof = CONSISTENCY_VECTORS[2]
    results = run_all([
        ("verify-proof", "--index", str(index), "--size", str(size), "--leaf-hash",
         LEAF_HASHES[index].hex(), "--root", ROOT_HASHES[size].hex(), "--proof",
         *(p.hex() for p in proof)),
        ("verify-proof", "--old-size", str(old), "--old-root", ROOT_HASHES[old].hex(),
         "--size", str(new), "--root", ROOT_HASHES[new].hex(), "--proof",
         *(p.hex() for p in cproof)),
        ("verify-proof", "--index", str(index), "--size", str(size), "--leaf-hash",
         LEAF_HASHES[index].hex(), "--root", ROOT_HASHES[size].hex(), "--proof",
         *(p.hex() for p in reversed(proof))),
    ])
    assert results[0].returncode == 0, results[0]
    assert results[1].returncode == 0 and "OK consistency proof" in results[1].stdout
    one_line(results[2], 1, "invalid transparency proof")


def test_user_mistakes_one_line_exit_2(node: Node, tmp_path: Path) -> None:
    def write(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    h = "00" * 32
    cases = [
        (("verify-proof", tmp_path / "none.json"), ("none.json", "not found")),
        (("verify-proof", write("a", "not json")), ("not JSON",)),
        (("verify-proof", write("b", "[1]")), ("not a JSON object",)),
        (("verify-proof", write("c", "{}")), ('exactly one of "inclusion"',)),
        (("verify-proof", write("d", json.dumps({"index": 0, "tree_size": 1,
                                                  "leaf_hash": "zz", "inclusion": [],
                                                  "root": h}))), ('"leaf_hash"',)),
        (("verify-proof", write("e", json.dumps({"index": 1, "tree_size": 1,
                                                  "leaf_hash": h, "inclusion": [],
                                                  "root": h}))), ("index 1",)),
        (("verify-proof", write("f", json.dumps({"index": 0, "tree_size": -1,
                                                  "inclusion": []}))), ('"tree_size"',)),
        (("verify-proof", write("g", json.dumps({"old_size": 0, "tree_size": 1,
                                                  "consistency": []}))), ("old size",)),
        (("verify-proof", write("h", json.dumps({"index": 0, "tree_size": 1,
                                                  "inclusion": [], "root": h}))),
         ('neither "event" nor "leaf_hash"',)),
        (("verify-proof", write("i", "x" * (1 << 21))), ("longer than",)),
        (("verify-proof", write("j", "{}"), "--index", "1"), ("--index", "not both")),
        (("verify-proof",), ("give a proof FILE",)),
        (("verify-proof", "--index", "0", "--proof"), ("--size",)),
        (("verify-proof", "--index", "0", "--old-size", "1", "--size", "1", "--proof"),
         ("exactly one of --index",)),
        (("verify-proof", write("k", "{}"), "--checkpoint", tmp_path / "k"), ("--key",)),
        (("verify-proof", write("l", "{}"), "--key", tmp_path / "none.pub"),
         ("none.pub", "not found")),
    ]
    results = run_all([args for args, _ in cases])
    for (_, needles), result in zip(cases, results, strict=True):
        one_line(result, 2, *needles)


def test_a_rewritten_log_cannot_prove_the_kept_checkpoint(node: Node, tmp_path: Path) -> None:
    """The auditor kept the node's checkpoint of size 16; the node then rewrote event 2
    and re-signed everything with its key: its consistency proof does not verify against
    the kept checkpoint (exit 1), though it does against its own new one."""
    kept, path = rewritten_log(node, tmp_path)
    made = run("prove", "--log", path, "--old", "16", "--json")
    assert made.returncode == 0, made
    proof = tmp_path / "c.json"
    proof.write_text(made.stdout)
    record = json.loads(made.stdout)
    del record["old_root"], record["old_checkpoint"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(record))
    own, against_kept, bare_against_kept = run_all([
        ("verify-proof", proof, "--key", node.pub),
        ("verify-proof", proof, "--key", node.pub, "--old-checkpoint", kept),
        ("verify-proof", bare, "--key", node.pub, "--old-checkpoint", kept)])
    assert own.returncode == 0, own  # nothing in the node's own proof betrays the rewrite
    one_line(against_kept, 1, '"old_root" is not the signed checkpoint\'s root')
    one_line(bare_against_kept, 1, "invalid transparency proof")
