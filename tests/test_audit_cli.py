"""`netfilter audit checkpoint|verify|prove` as an auditor runs it: a real subprocess
over a real log, the outputs checked with the library's own verifiers (merkle, signed
checkpoints) against the node's public key, every kind of tampering named with exit 1,
and user mistakes as one `netfilter: error:` line with exit 1.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from netfilter.audit import merkle
from netfilter.audit.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from netfilter.audit.log import AuditLog, load_node_key
from netfilter.audit.merkle import leaf_hash
from netfilter.audit.note import NoteError, Signer, Verifier
from netfilter.audit.store import AuditStore, StoredCheckpoint
from netfilter.events import Event
from netfilter.keys import PrivateKey, generate_keypair, load_private_key, load_public_key

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = "audit-node"
SIZES = [5, 16, 37]  # the checkpoints of the module's log


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netfilter.cli", "audit", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def run_all(cases: Sequence[Sequence[str | Path]]) -> list[subprocess.CompletedProcess[str]]:
    """Several commands at once (each is mostly interpreter start-up): keeps the file fast."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: run(*args), cases))


def one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netfilter: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""


class Node:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.key_path = directory / "node.key"
        self.key: PrivateKey = load_node_key(self.key_path)
        self.pub = directory / "node.pub"
        self.log = directory / "audit.sqlite"

    def verifier(self) -> Verifier:
        return Verifier.from_public_key(ORIGIN, load_public_key(self.pub))


def build_log(path: Path, key: PrivateKey) -> None:
    log = AuditLog(AuditStore(path), origin=ORIGIN, key=key, checkpoint_interval=3600)
    for i in range(37):
        log.record(Event("block", ORIGIN, frontend="dns", list="test", version=1,
                         ref=f"R-{i}", category="csam", action="block",
                         client=f"p:{i:024x}", detail="qtype=A · résumé ✓"))
        if i + 1 in SIZES[:-1]:
            log.flush()
            log.checkpoint()
    log.close()
    log.store.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Node:
    n = Node(tmp_path_factory.mktemp("node"))
    build_log(n.log, n.key)
    assert [cp.size for cp in AuditStore(n.log).checkpoints()] == SIZES
    (n.dir / "netfilter.yaml").write_text(
        f"node: {{id: {ORIGIN}, key: node.key}}\naudit: {{path: audit.sqlite}}\n",
        encoding="utf-8")
    return n


def copy_log(src: Path, dst: Path) -> Path:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return dst


def rewritten_log(node: Node, directory: Path) -> tuple[Path, Path]:
    """(the auditor's kept checkpoint of size 16, a copy of the log whose event 2 the
    holder of the node key rewrote and whose checkpoints it all signed again)."""
    kept = directory / "kept.checkpoint"
    kept.write_bytes(next(cp.note for cp in AuditStore(node.log).checkpoints()
                          if cp.size == 16))
    path = copy_log(node.log, directory / "rewritten.sqlite")
    db = sqlite3.connect(path, isolation_level=None)
    (event,) = db.execute("SELECT event FROM leaves WHERE idx = 2").fetchone()
    event = bytes(event).replace(b"R-2", b"R-two")
    db.execute("UPDATE leaves SET event = ?, hash = ? WHERE idx = 2", (event, leaf_hash(event)))
    db.execute("DELETE FROM checkpoints")
    db.close()
    store = AuditStore(path)  # the forger writes: opened as a node opens its own log
    for size in SIZES:
        compact = merkle.CompactRange()
        compact.extend(store.leaf_hashes(0, size))
        note = sign_checkpoint(Checkpoint(ORIGIN, size, compact.root()), Signer(ORIGIN, node.key))
        store.add_checkpoint(StoredCheckpoint(size, compact.root(), note, "2026-01-01T00:00:00",
                                              b"".join(compact.hashes)))
    store.close()
    return kept, path


def signed_roots(node: Node) -> dict[int, bytes]:
    """Each checkpoint's root, taken from its signed note (not from the root column)."""
    out = {}
    for cp in AuditStore(node.log, create=False).checkpoints():
        parsed = open_checkpoint(cp.note, node.verifier(), origin=ORIGIN)
        out[parsed.size] = parsed.root
    return out


def b64(items: list[str]) -> list[bytes]:
    return [base64.b64decode(item, validate=True) for item in items]


def parse_text(stdout: str) -> dict[str, object]:
    """The text form of `prove`: `key: value` lines, a list as indented lines."""
    record: dict[str, object] = {}
    current: list[str] | None = None
    for line in stdout.splitlines():
        if line.startswith("  "):
            assert current is not None, stdout
            current.append(line.strip())
            continue
        key, _, value = line.partition(": ")
        if line.endswith(":") and not value:
            current = []
            record[line[:-1]] = current
        else:
            current = None
            record[key] = value
    return record


# ---------------------------------------------------------------- checkpoint and verify


def test_checkpoint_is_a_signed_note_of_the_tree(node: Node) -> None:
    result, by_config = run_all([("checkpoint", "--log", node.log),
                                 ("checkpoint", "--config", node.dir / "netfilter.yaml")])
    assert result.returncode == 0, result.stderr
    note = result.stdout.encode()
    cp = open_checkpoint(note, node.verifier(), origin=ORIGIN)
    hashes = [leaf.hash for leaf in AuditStore(node.log).leaves()]
    assert (cp.origin, cp.size, cp.root) == (ORIGIN, 37, merkle.root(hashes))
    assert result.stdout.startswith(f"{ORIGIN}\n37\n")
    assert "\n\n\u2014 " + ORIGIN + " " in result.stdout  # C2SP signature line
    assert by_config.returncode == 0 and by_config.stdout == result.stdout
    other = load_private_key(generate_keypair(node.dir / "stranger")[0])
    with pytest.raises(NoteError):
        open_checkpoint(note, Verifier.from_public_key(ORIGIN, other.public))


def test_verify_untouched(node: Node) -> None:
    wheres = [("--log", node.log), ("--config", node.dir / "netfilter.yaml")]
    results = run_all([("verify", *where, "--trust", node.pub) for where in wheres])
    for where, result in zip(wheres, results, strict=True):
        assert result.returncode == 0, result
        latest = AuditStore(node.log, create=False).latest_checkpoint()
        assert latest is not None
        assert result.stdout == (
            f"OK {node.log if where[0] == '--log' else node.log.resolve()}: 37 events, "
            "3 signed checkpoints, 0 event bodies removed by retention (leaf hashes kept), "
            f"latest checkpoint: size 37, signed at {latest.created}\n")


def test_verify_since_a_genuine_older_checkpoint(node: Node, tmp_path: Path) -> None:
    kept = tmp_path / "kept-16.checkpoint"
    kept.write_bytes(next(cp.note for cp in AuditStore(node.log).checkpoints()
                          if cp.size == 16))
    result, printed = run_all([("verify", "--log", node.log, "--trust", node.pub,
                                "--since", kept), ("checkpoint", "--log", node.log)])
    assert result.returncode == 0, result
    assert result.stdout.startswith("OK ")
    assert result.stdout.rstrip().endswith("consistent with your checkpoint of size 16")
    # the checkpoint printed by `audit checkpoint` today is tomorrow's --since
    latest = tmp_path / "latest.checkpoint"
    latest.write_text(printed.stdout, encoding="utf-8")
    result = run("verify", "--log", node.log, "--trust", node.pub, "--since", latest)
    assert result.returncode == 0 and "checkpoint of size 37" in result.stdout


# ---------------------------------------------------------------- prove


INCLUSION = [(0, None), (36, None), (20, None), (7, 16), (15, 16), (4, 5), (0, 5)]


def test_inclusion_proofs_json(node: Node) -> None:
    results = run_all([["prove", "--log", node.log, "--index", str(index), "--json"]
                       + ([] if size is None else ["--size", str(size)])
                       for index, size in INCLUSION])
    for (index, size), result in zip(INCLUSION, results, strict=True):
        check_inclusion(node, index, size, result)


def check_inclusion(node: Node, index: int, size: int | None,
                    result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (index, size, result.stderr)
    record = json.loads(result.stdout)
    assert list(record) == ["index", "tree_size", "event", "leaf_hash", "inclusion", "root",
                            "checkpoint"]  # what verify-proof reads (test_audit_proofs.py)
    tree = size or 37
    assert (record["index"], record["tree_size"]) == (index, tree)
    event = record["event"].encode("utf-8")
    stored = AuditStore(node.log).leaf(index)
    assert stored is not None and event == stored.event  # exactly the stored bytes
    assert json.loads(event)["ref"] == f"R-{index}"
    root = signed_roots(node)[tree]
    proof = b64(record["inclusion"])
    merkle.verify_inclusion(index, tree, leaf_hash(event), proof, root)
    with pytest.raises(merkle.ProofError):  # another event, or the same at another index
        merkle.verify_inclusion(index, tree, leaf_hash(event.replace(b"R-", b"X-")), proof,
                                root)
    if tree > 1:
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion((index + 1) % tree, tree, leaf_hash(event), proof, root)


def test_inclusion_proof_text(node: Node) -> None:
    result, json_result = run_all([("prove", "--log", node.log, "--index", "9", "--size", "16"),
                                   ("prove", "--log", node.log, "--index", "9", "--size", "16",
                                    "--json")])
    assert result.returncode == 0, result.stderr
    record = parse_text(result.stdout)
    assert list(record) == ["index", "tree_size", "event", "leaf_hash", "inclusion", "root"]
    assert (record["index"], record["tree_size"]) == ("9", "16")
    event = str(record["event"]).encode("utf-8")
    assert "résumé ✓" in str(record["event"])  # UTF-8 as is
    proof = record["inclusion"]
    assert isinstance(proof, list) and len(proof) == 4
    merkle.verify_inclusion(9, 16, leaf_hash(event), b64(proof), signed_roots(node)[16])
    as_json = json.loads(json_result.stdout)
    assert as_json["inclusion"] == proof and as_json["event"] == record["event"]


CONSISTENCY = [(5, 16), (16, None), (5, None), (37, None), (16, 16)]


def test_consistency_proofs_json(node: Node) -> None:
    results = run_all([["prove", "--log", node.log, "--old-size", str(old), "--json"]
                       + ([] if size is None else ["--size", str(size)])
                       for old, size in CONSISTENCY])
    for (old, size), result in zip(CONSISTENCY, results, strict=True):
        check_consistency(node, old, size, result)


def check_consistency(node: Node, old: int, size: int | None,
                      result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (old, size, result.stderr)
    record = json.loads(result.stdout)
    tree = size or 37
    assert list(record) == ["old_size", "old_root", "tree_size", "new_root", "consistency",
                            "old_checkpoint", "checkpoint"]
    assert (record["old_size"], record["tree_size"]) == (old, tree)
    roots = signed_roots(node)
    proof = b64(record["consistency"])
    merkle.verify_consistency(old, tree, roots[old], roots[tree], proof)
    if old != tree:
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(old, tree, roots[old], leaf_hash(b"forged"), proof)


def test_consistency_proof_text(node: Node) -> None:
    result = run("prove", "--log", node.log, "--old-size", "5")
    assert result.returncode == 0, result.stderr
    record = parse_text(result.stdout)
    assert list(record) == ["old_size", "old_root", "tree_size", "new_root", "consistency"]
    assert (record["old_size"], record["tree_size"]) == ("5", "37")
    proof = record["consistency"]
    assert isinstance(proof, list) and proof
    roots = signed_roots(node)
    merkle.verify_consistency(5, 37, roots[5], roots[37], b64(proof))


# ---------------------------------------------------------------- tampering


def _renumber(db: sqlite3.Connection, start: int, by: int) -> None:
    db.execute("UPDATE leaves SET idx = -idx - 1 WHERE idx >= ?", (start,))
    db.execute("UPDATE leaves SET idx = -idx - 1 + ? WHERE idx < 0", (by,))


def _alter(db: sqlite3.Connection) -> None:
    (event,) = db.execute("SELECT event FROM leaves WHERE idx = 8").fetchone()
    db.execute("UPDATE leaves SET event = ? WHERE idx = 8",
               (bytes(event).replace(b'"action":"block"', b'"action":"allow"'),))


def _remove_renumber(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM leaves WHERE idx = 3")
    _renumber(db, 4, -1)


def _reorder(db: sqlite3.Connection) -> None:
    a = db.execute("SELECT hash, event FROM leaves WHERE idx = 20").fetchone()
    b = db.execute("SELECT hash, event FROM leaves WHERE idx = 21").fetchone()
    db.execute("UPDATE leaves SET hash = ?, event = ? WHERE idx = 20", b)
    db.execute("UPDATE leaves SET hash = ?, event = ? WHERE idx = 21", a)


def _insert(db: sqlite3.Connection) -> None:
    _renumber(db, 10, 1)
    event = Event("block", ORIGIN, time=datetime.now(UTC).isoformat(), ref="FORGED")
    data = event.to_json().encode()
    db.execute("INSERT INTO leaves (idx, hash, event, day) VALUES (10, ?, ?, ?)",
               (leaf_hash(data), data, event.time[:10]))


def _forge(db: sqlite3.Connection) -> None:
    other = load_private_key(generate_keypair(Path(db.execute(
        "PRAGMA database_list").fetchone()[2]).with_name("forger"))[0])
    (root,) = db.execute("SELECT root FROM checkpoints WHERE size = 16").fetchone()
    note = sign_checkpoint(Checkpoint(ORIGIN, 16, bytes(root)), Signer(ORIGIN, other))
    db.execute("UPDATE checkpoints SET note = ? WHERE size = 16", (note,))


def _root_in_note(db: sqlite3.Connection) -> None:
    (note,) = db.execute("SELECT note FROM checkpoints WHERE size = 37").fetchone()
    lines = bytes(note).split(b"\n")
    lines[2] = base64.b64encode(leaf_hash(b"another tree"))
    db.execute("UPDATE checkpoints SET note = ? WHERE size = 37", (b"\n".join(lines),))


TAMPERING: dict[str, tuple[Callable[[sqlite3.Connection], None] | str, str]] = {
    "altered event": (_alter, "FAIL event 8 was altered (it no longer hashes to its leaf)"),
    "removed event": ("DELETE FROM leaves WHERE idx = 3", "FAIL events 3..3 are missing"),
    "removed and renumbered": (_remove_renumber,
                               "FAIL the tree at size 5 differs from its signed checkpoint"),
    "reordered events": (_reorder,
                         "FAIL the tree at size 37 differs from its signed checkpoint"),
    "inserted event": (_insert, "FAIL the tree at size 16 differs from its signed checkpoint"),
    "checkpoint signed by another key": (
        _forge, "FAIL checkpoint at size 16: signature does not verify with the trusted key"),
    "checkpoint root changed": (
        _root_in_note, "FAIL checkpoint at size 37: signature does not verify"),
    "checkpoint row root changed": (
        "UPDATE checkpoints SET root = zeroblob(32) WHERE size = 5",
        "FAIL checkpoint at size 5: stored size/root differ from its signed note"),
    "tail removed past a checkpoint": (
        "DELETE FROM leaves WHERE idx >= 30",
        "FAIL checkpoint at size 37 covers events that are not in the log (it holds 30)"),
}


def test_verify_names_tampering(node: Node, tmp_path: Path) -> None:
    paths = []
    for n, (change, _) in enumerate(TAMPERING.values()):
        path = copy_log(node.log, tmp_path / f"tampered-{n}.sqlite")
        db = sqlite3.connect(path, isolation_level=None)
        if isinstance(change, str):
            db.execute(change)
        else:
            change(db)
        db.close()
        paths.append(path)
    results = run_all([["verify", "--log", path, "--trust", node.pub] for path in paths])
    for case, path, result in zip(TAMPERING, paths, results, strict=True):
        check_named(case, TAMPERING[case][1], path, result)


def check_named(case: str, expected: str, path: Path,
                result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, (case, result)
    assert "Traceback" not in result.stderr and result.stderr == ""
    lines = result.stdout.splitlines()
    assert any(line.startswith(expected) for line in lines), (case, result.stdout)
    fails = [line for line in lines if line.startswith("FAIL ")]
    assert all(line.startswith(("FAIL ", "WARN ")) for line in lines)
    assert lines[-1].startswith(f"FAIL {path}: {len(fails) - 1} problem(s); ")


def test_verify_with_the_wrong_node_key(node: Node, tmp_path: Path) -> None:
    _, stranger = generate_keypair(tmp_path / "stranger")
    result = run("verify", "--log", node.log, "--trust", stranger)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and all("signature does not verify" in line for line in lines[:3])
    assert lines[3].startswith("WARN events 0..36 are not covered by any signed checkpoint "
                               "(none in the log holds)")


def test_since_catches_a_rewritten_log(node: Node, tmp_path: Path) -> None:
    """The holder of the node key rewrites an event and re-signs every checkpoint: the
    log is consistent with itself; only the auditor's older checkpoint shows it."""
    kept, path = rewritten_log(node, tmp_path)
    alone, result, proved, printed = run_all([
        ("verify", "--log", path, "--trust", node.pub),
        ("verify", "--log", path, "--trust", node.pub, "--since", kept),
        ("prove", "--log", path, "--old-size", "16", "--json"),
        ("checkpoint", "--log", path)])
    assert alone.returncode == 0, alone  # nothing inside the log betrays the rewrite
    assert result.returncode == 1
    assert ("FAIL the log is not consistent with your checkpoint of size 16: it was rewritten"
            in result.stdout.splitlines())
    # nor can the node prove consistency with what the auditor kept
    proof = json.loads(proved.stdout)
    new_root = open_checkpoint(printed.stdout.encode(), node.verifier()).root
    with pytest.raises(merkle.ProofError):
        merkle.verify_consistency(16, 37, signed_roots(node)[16], new_root,
                                  b64(proof["consistency"]))


def test_since_larger_than_the_log(node: Node, tmp_path: Path) -> None:
    kept = tmp_path / "kept.checkpoint"
    kept.write_bytes(AuditStore(node.log).checkpoints()[-1].note)  # size 37
    path = copy_log(node.log, tmp_path / "cut.sqlite")
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM leaves WHERE idx >= 20")
        db.execute("DELETE FROM checkpoints WHERE size > 16")
    result = run("verify", "--log", path, "--trust", node.pub, "--since", kept)
    assert result.returncode == 1
    assert ("FAIL your checkpoint (size 37) is larger than the log (20): events were removed"
            in result.stdout.splitlines())


def test_since_not_signed_by_the_node(node: Node, tmp_path: Path) -> None:
    other = load_private_key(generate_keypair(tmp_path / "other")[0])
    cp = AuditStore(node.log).checkpoints()[0]
    forged = tmp_path / "forged.checkpoint"
    forged.write_bytes(sign_checkpoint(Checkpoint(ORIGIN, cp.size, cp.root),
                                       Signer(ORIGIN, other)))
    result = run("verify", "--log", node.log, "--trust", node.pub, "--since", forged)
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL your checkpoint does not verify with the trusted key")


# ---------------------------------------------------------------- retention


def test_retention_seen_by_the_auditor(tmp_path: Path) -> None:
    n = Node(tmp_path)
    store = AuditStore(n.log)
    old = (datetime.now(UTC) - timedelta(days=100)).isoformat(timespec="milliseconds")
    rows = []
    for i in range(6):
        data = Event("block", ORIGIN, time=old, ref=f"OLD-{i}").to_json().encode()
        rows.append((leaf_hash(data), data, old[:10]))
    store.append(rows)
    AuditLog(store, origin=ORIGIN, key=n.key, retention_days=30).close()  # signs at start too
    result, proved, proved6, printed = run_all([
        ("verify", "--log", n.log, "--trust", n.pub),
        ("prove", "--log", n.log, "--index", "2", "--json"),
        ("prove", "--log", n.log, "--index", "6", "--json"),
        ("checkpoint", "--log", n.log)])
    assert result.returncode == 0, result
    assert "7 events, 2 signed checkpoints, 6 event bodies removed by retention" in result.stdout
    proof = json.loads(proved.stdout)
    assert proof["event"] is None and proof["tree_size"] == 7
    leaf = store.leaf(2)
    assert leaf is not None and leaf.event is None
    root = open_checkpoint(printed.stdout.encode(), n.verifier()).root
    merkle.verify_inclusion(2, 7, leaf.hash, b64(proof["inclusion"]), root)
    retention = json.loads(json.loads(proved6.stdout)["event"])
    assert retention["type"] == "retention" and retention["detail"].startswith("removed=6 ")


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line(node: Node, tmp_path: Path) -> None:
    log, pub = node.log, node.pub
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n", encoding="utf-8")
    no_audit = tmp_path / "no-audit.yaml"
    no_audit.write_text("node: {id: x}\n", encoding="utf-8")
    empty = tmp_path / "empty.sqlite"
    AuditStore(empty)
    cases: list[tuple[tuple[str | Path, ...], tuple[str, ...]]] = [
        (("verify", "--log", tmp_path / "missing.sqlite", "--trust", pub),
         ("missing.sqlite", "audit log not found")),
        (("checkpoint", "--log", tmp_path / "missing.sqlite"), ("audit log not found",)),
        (("prove", "--log", tmp_path / "missing.sqlite", "--index", "0"),
         ("audit log not found",)),
        (("verify", "--log", log, "--trust", node.key_path), ("node.key", "not a PEM public key")),
        (("verify", "--log", log, "--trust", garbage), ("garbage.pub", "not a PEM public key")),
        (("verify", "--log", log, "--trust", tmp_path / "nope.pub"),
         ("nope.pub", "public key not found")),
        (("verify", "--log", ROOT / "pyproject.toml", "--trust", pub),
         ("pyproject.toml", "cannot open the audit log")),
        (("prove", "--log", log, "--index", "37"), ("--index", "37", "size 37")),
        (("prove", "--log", log, "--index", "16", "--size", "16"), ("--index",)),
        (("prove", "--log", log, "--index", "-1"), ("--index",)),
        (("prove", "--log", log, "--index", "0", "--size", "38"), ("--size", "1..37")),
        (("prove", "--log", log, "--old-size", "0"), ("--old-size",)),
        (("prove", "--log", log, "--old-size", "17", "--size", "16"), ("--old-size",)),
        (("checkpoint", "--config", no_audit), ("no-audit.yaml", "no audit section")),
        (("checkpoint", "--config", tmp_path / "missing.yaml"), ("missing.yaml",)),
        (("checkpoint", "--log", empty), ("no signed checkpoint yet",)),
        (("prove", "--log", empty, "--index", "0"), ("no signed checkpoint yet",)),
    ]
    for (_, needles), result in zip(cases, run_all([c[0] for c in cases]), strict=True):
        one_clear_line(result, *needles)


def test_usage_errors_exit_2(node: Node) -> None:
    cases: list[tuple[str | Path, ...]] = [
        ("verify", "--log", node.log),  # no --trust
        ("prove", "--log", node.log),  # neither --index nor --old-size
        ("prove", "--log", node.log, "--index", "1", "--old-size", "1"),
        ("checkpoint",),  # neither --log nor --config
    ]
    for result in run_all(cases):
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.rstrip().splitlines()[-1].startswith("netfilter audit ")


def test_since_missing_file_is_one_line(node: Node, tmp_path: Path) -> None:
    one_clear_line(run("verify", "--log", node.log, "--trust", node.pub, "--since",
                       tmp_path / "missing.checkpoint"), "missing.checkpoint")


def test_text_typed_body_named_by_verify(node: Node, tmp_path: Path) -> None:
    path = copy_log(node.log, tmp_path / "text.sqlite")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE leaves SET event = replace(event, 'R-8', 'R-9') WHERE idx = 8")
    result = run("verify", "--log", path, "--trust", node.pub)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "FAIL event 8 was altered" in result.stdout
