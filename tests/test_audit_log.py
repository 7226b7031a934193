"""The tamper-evident audit log as a library: AuditStore, AuditLog, verify_log, and the
engine writing into it through make_engine.

What is held against the issue: canonical events without a URL, the RFC 9162 tree and
its signed checkpoints, the node key made on first start, the client forms (pseudonyms
shared by the processes of a node and destroyed by retention), retention keeping the
leaf hashes, several writers (threads and a second process) on one SQLite file, a
writer killed with SIGKILL, back-pressure on a full queue, and every kind of tampering
that verify_log names. The command line is tested in test_audit_cli.py.
"""

from __future__ import annotations

import hmac
import itertools
import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netfilter.audit import merkle
from netfilter.audit.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from netfilter.audit.log import AuditLog, load_node_key
from netfilter.audit.merkle import leaf_hash
from netfilter.audit.note import Signer, Verifier
from netfilter.audit.store import AuditStore, StoredCheckpoint, keys_path
from netfilter.audit.verify import verify_log
from netfilter.config import load_config
from netfilter.engine import Engine
from netfilter.errors import ConfigError, KeyFileError
from netfilter.events import Event
from netfilter.keys import PrivateKey, generate_keypair, load_private_key, load_public_key
from netfilter.node import make_engine
from netfilter.privacy import ClientRecorder
from tests.conftest import BuildBundle

ORIGIN = "test-node"
BLOCK_KEYS = {"action", "category", "client", "detail", "frontend", "list", "node", "ref",
              "time", "type", "version"}
# Every URL and host the engine is asked about below: none may reach the log in clear.
CHECKED_URLS = ("http://partly.example/one/page.html?id=7",
                "http://www.mixed.example/a/b/c.html")
CHECKED_HOSTS = ("sub.blocked.example", "ok.blocked.example")


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def node_key(tmp_path_factory: pytest.TempPathFactory) -> PrivateKey:
    return load_node_key(tmp_path_factory.mktemp("node") / "node.key")


@pytest.fixture
def open_log(node_key: PrivateKey) -> Iterator[Callable[..., AuditLog]]:
    """AuditLog(AuditStore(path)) with the module's node key; closed at teardown."""
    opened: list[AuditLog] = []

    def _open(path: Path, **kw: object) -> AuditLog:
        kw = {"checkpoint_interval": 3600.0, **kw}
        log = AuditLog(AuditStore(path), origin=ORIGIN, key=node_key, **kw)  # type: ignore[arg-type]
        opened.append(log)
        return log

    yield _open
    for log in opened:
        if not log.closed:
            log.close()


def canonical(raw: bytes) -> bytes:
    return json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def stored_events(store: AuditStore) -> list[dict[str, object]]:
    return [json.loads(leaf.event) for leaf in store.leaves() if leaf.event is not None]


def now_iso(days_ago: float = 0) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago)).isoformat(timespec="milliseconds")


def row(event: Event) -> tuple[bytes, bytes, str]:
    data = event.to_json().encode()
    return leaf_hash(data), data, event.time[:10]


def open_cp(note: bytes, key: PrivateKey) -> Checkpoint:
    return open_checkpoint(note, Verifier.from_public_key(ORIGIN, key.public), origin=ORIGIN)


def assert_sound(store: AuditStore, key: PrivateKey) -> None:
    """Indexes 0..n-1, each body hashing to its leaf, every checkpoint signed and right."""
    leaves = list(store.leaves())
    assert [leaf.index for leaf in leaves] == list(range(store.size()))
    for leaf in leaves:
        assert leaf.event is None or leaf_hash(leaf.event) == leaf.hash
    hashes = [leaf.hash for leaf in leaves]
    for cp in store.checkpoints():
        parsed = open_cp(cp.note, key)
        assert (parsed.size, parsed.root) == (cp.size, cp.root)
        assert cp.root == merkle.root(hashes[: cp.size])
    report = verify_log(store, key.public)
    assert report.ok, report.problems
    assert report.size == len(leaves)


def config(tmp_path: Path, bundle: Path, pub: Path, client: str = "truncated",
           extra: str = "", window: float = 10.0) -> Path:
    (tmp_path / "allow.yaml").write_text(
        "- {domain: ok.blocked.example, ref: APPEAL-9, category: appeal}\n", encoding="utf-8")
    path = tmp_path / "netfilter.yaml"
    path.write_text(
        f"node: {{id: {ORIGIN}, key: var/node.key}}\n"
        f"lists:\n  - path: {bundle}\n    trust: [{pub}]\n"
        "local: {allow: allow.yaml}\n"
        f"audit: {{path: var/audit.sqlite, client: {client}, checkpoint_interval: 3600,"
        f" aggregate_window: {window}}}\n"
        + extra, encoding="utf-8")
    return path


def close_engine(engine: Engine) -> AuditLog:
    sink = engine.sink
    assert isinstance(sink, AuditLog)
    engine.close()
    assert sink.closed
    return sink


# ---------------------------------------------------------------- events


def test_events_are_canonical_json_without_urls(build: BuildBundle,
                                                authority: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    engine = make_engine(load_config(config(tmp_path, build(), authority[1])))
    assert engine.check_url(CHECKED_URLS[0], client="192.0.2.55", detail="GET").blocked
    assert engine.check_url(CHECKED_URLS[1], client="192.0.2.56", detail="GET").blocked
    assert engine.check_host(CHECKED_HOSTS[0], frontend="dns", client="2001:db8:1:2::5",
                             detail="qtype=AAAA").blocked
    assert not engine.check_host(CHECKED_HOSTS[1], frontend="dns", client="192.0.2.9").blocked
    log = close_engine(engine)
    leaves = list(log.store.leaves())
    assert len(leaves) == 5
    for leaf in leaves:
        assert leaf.event is not None
        leaf.event.decode("utf-8")  # strict UTF-8
        assert leaf.event == canonical(leaf.event), leaf.event  # sorted, no whitespace
        assert leaf.hash == leaf_hash(leaf.event)
        text = leaf.event.decode()
        for needle in ("partly", "page.html", "id=7", "mixed.example", "c.html",
                       "blocked.example", "192.0.2.55", "2001:db8:1:2::5"):
            assert needle not in text, text
    events = stored_events(log.store)
    assert [e["type"] for e in events] == ["list-loaded", "block", "block", "block",
                                           "override"]
    first = events[1]
    assert set(first) == BLOCK_KEYS
    assert first == {"action": "block", "category": "csam", "client": "192.0.2.0/24",
                     "detail": "GET", "frontend": "proxy", "list": "test", "node": ORIGIN,
                     "ref": "T-3", "time": first["time"], "type": "block", "version": 1}
    time_ = datetime.fromisoformat(str(first["time"]))
    assert time_.tzinfo is not None and abs(datetime.now(UTC) - time_) < timedelta(minutes=5)
    assert (events[3]["frontend"], events[3]["ref"], events[3]["client"],
            events[3]["detail"]) == ("dns", "T-1", "2001:db8:1::/48", "qtype=AAAA")
    assert (events[4]["action"], events[4]["ref"], events[4]["detail"],
            events[4]["client"]) == ("allow", "T-1", "exception=APPEAL-9", "192.0.2.0/24")
    # each row's day is the UTC day of its event's time
    assert all(leaf.day == json.loads(leaf.event or b"{}")["time"][:10] for leaf in leaves)


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(type_=st.sampled_from(["block", "override", "list-loaded", "retention"]),
       node=_text.filter(bool), frontend=st.none() | _text, list_=st.none() | _text,
       version=st.none() | st.integers(0, 2**40), ref=st.none() | _text,
       client=st.none() | _text, detail=st.none() | _text,
       when=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 1, 1),
                         timezones=st.just(UTC)))
def test_event_json_is_canonical(type_: str, node: str, frontend: str | None,
                                 list_: str | None, version: int | None, ref: str | None,
                                 client: str | None, detail: str | None,
                                 when: datetime) -> None:
    event = Event(type_, node, time=when.isoformat(timespec="milliseconds"),  # type: ignore[arg-type]
                  frontend=frontend, list=list_, version=version, ref=ref, client=client,
                  detail=detail)
    raw = event.to_json().encode("utf-8")
    assert raw == canonical(raw)
    data = json.loads(raw)
    assert list(data) == sorted(data)
    assert data["time"] == event.time and data["type"] == type_ and data["node"] == node
    for key, value in (("frontend", frontend), ("list", list_), ("version", version),
                       ("ref", ref), ("client", client), ("detail", detail)):
        assert data.get(key) == value and ((key in data) == (value is not None))
    # the writer takes the event's day out of the bytes: a value that looks like a
    # "time" key must not fool it
    assert raw[raw.find(b'"time":"') + 8:][:10].decode() == event.time[:10]


def test_writer_files_each_event_under_its_own_day(open_log: Callable[..., AuditLog],
                                                   tmp_path: Path) -> None:
    log = open_log(tmp_path / "a.sqlite")
    tricky = ['"time":"1999-01-01', 'x","time":"1999-01-01T', '\\"time\\":\\"1999']
    for i, text in enumerate(tricky):
        log.record(Event("block", text, time=f"2030-0{i + 1}-02T03:04:05.000+00:00",
                         detail=text, ref=text, client=text))
    log.record(Event("block", ORIGIN))  # no time: the log stamps it
    log.close()
    leaves = list(log.store.leaves())
    assert [leaf.day for leaf in leaves[:3]] == ["2030-01-02", "2030-02-02", "2030-03-02"]
    stamped = json.loads(leaves[3].event or b"")
    assert leaves[3].day == stamped["time"][:10] == datetime.now(UTC).strftime("%Y-%m-%d")


# ---------------------------------------------------------------- keys and checkpoints


def test_node_key_created_on_first_start(tmp_path: Path) -> None:
    path = tmp_path / "var" / "node.key"
    key = load_node_key(path)
    pub = path.with_suffix(".pub")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and pub.exists()
    assert load_public_key(pub).raw == key.public.raw
    before = (path.read_bytes(), pub.read_bytes())
    again = load_node_key(path)  # second start: the same key, files untouched
    assert again.public.raw == key.public.raw
    assert (path.read_bytes(), pub.read_bytes()) == before


def test_node_key_path_without_key_suffix(tmp_path: Path) -> None:
    """NAME.key is the contract (NAME.pub beside it): anything else is one clear error,
    in the library and when the config is read."""
    with pytest.raises(KeyFileError, match="must be a NAME.key file"):
        load_node_key(tmp_path / "nodekey")
    assert not list(tmp_path.iterdir())
    config_path = tmp_path / "netfilter.yaml"
    config_path.write_text("node: {key: var/nodekey}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="node.key: .*NAME.key"):
        load_config(config_path)


def test_make_engine_creates_the_node_key(build: BuildBundle, authority: tuple[Path, Path],
                                          tmp_path: Path) -> None:
    path = config(tmp_path, build(), authority[1])
    key_path, pub_path = tmp_path / "var" / "node.key", tmp_path / "var" / "node.pub"
    assert not key_path.exists()
    log = close_engine(make_engine(load_config(path)))
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600 and pub_path.exists()
    note = log.store.latest_checkpoint()
    assert note is not None
    cp = open_checkpoint(note.note, Verifier.from_public_key(ORIGIN, load_public_key(pub_path)))
    assert cp.size == 1  # the list-loaded event
    pem = key_path.read_bytes()
    close_engine(make_engine(load_config(path)))  # second start keeps the key
    assert key_path.read_bytes() == pem
    assert verify_log(AuditStore(tmp_path / "var" / "audit.sqlite"),
                      load_public_key(pub_path)).ok


def test_checkpoints_periodic_and_on_close(open_log: Callable[..., AuditLog],
                                           node_key: PrivateKey, tmp_path: Path) -> None:
    log = open_log(tmp_path / "a.sqlite", checkpoint_interval=0.05)
    assert log.checkpoint() is None  # nothing to sign yet
    for i in range(30):
        log.record(Event("block", ORIGIN, ref=f"R-{i}"))
    deadline = time.monotonic() + 10
    while not log.store.checkpoints() and time.monotonic() < deadline:
        time.sleep(0.02)
    periodic = log.store.checkpoints()
    assert periodic, "no checkpoint within 10 s at checkpoint_interval=0.05"
    for i in range(30, 45):
        log.record(Event("block", ORIGIN, ref=f"R-{i}"))
    log.close()
    latest = log.store.latest_checkpoint()
    assert latest is not None and latest.size == log.store.size() == 45
    signed = open_cp(latest.note, node_key)
    assert signed.root == merkle.root([leaf.hash for leaf in log.store.leaves()])
    assert_sound(log.store, node_key)


def test_checkpoint_only_on_close_with_a_long_interval(open_log: Callable[..., AuditLog],
                                                       node_key: PrivateKey,
                                                       tmp_path: Path) -> None:
    log = open_log(tmp_path / "a.sqlite")
    for i in range(7):
        log.record(Event("block", ORIGIN, ref=f"R-{i}"))
    log.flush()
    assert log.store.size() == 7 and log.store.checkpoints() == []
    log.close()
    assert [cp.size for cp in log.store.checkpoints()] == [7]
    # a checkpoint of an unchanged tree is the stored one, not a second signature
    assert log.checkpoint() == log.store.latest_checkpoint()
    assert len(log.store.checkpoints()) == 1


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.integers(1, 40), min_size=1, max_size=8), data=st.data())
def test_proofs_against_signed_checkpoints(open_log: Callable[..., AuditLog],
                                           node_key: PrivateKey, tmp_path_factory:
                                           pytest.TempPathFactory, batches: list[int],
                                           data: st.DataObject) -> None:
    """Batches of any size, a checkpoint after each: every inclusion and consistency
    proof from the store verifies against the signed roots (RFC 9162)."""
    log = open_log(tmp_path_factory.mktemp("proofs") / "a.sqlite")
    store, roots = log.store, {}
    for n, size in enumerate(batches):
        store.append([row(Event("block", ORIGIN, time=now_iso(), ref=f"{n}-{i}"))
                      for i in range(size)])
        cp = log.checkpoint()
        assert cp is not None
        roots[cp.size] = open_cp(cp.note, node_key).root
    sizes = sorted(roots)
    tree = data.draw(st.sampled_from(sizes))
    index = data.draw(st.integers(0, tree - 1))
    leaf = store.leaf(index)
    assert leaf is not None and leaf.event is not None
    proof = merkle.inclusion_proof(index, tree, store)
    merkle.verify_inclusion(index, tree, leaf_hash(leaf.event), proof, roots[tree])
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(index, tree, leaf_hash(leaf.event + b" "), proof, roots[tree])
    old = data.draw(st.sampled_from([s for s in sizes if s <= tree]))
    merkle.verify_consistency(old, tree, roots[old], roots[tree],
                              merkle.consistency_proof(old, tree, store))
    log.close()
    assert_sound(store, node_key)


# ---------------------------------------------------------------- client forms


@pytest.mark.parametrize("form", ["none", "truncated", "pseudonym", "full"])
def test_client_forms(form: str, build: BuildBundle, authority: tuple[Path, Path],
                      tmp_path: Path) -> None:
    engine = make_engine(load_config(config(tmp_path, build(), authority[1], client=form,
                                            window=0)))  # every block on its own
    addresses = ("192.0.2.77", "2001:db8:1:2::5", "192.0.2.77", "fe80::1%eth0",
                 "unix:/run/peer.sock")  # a scoped address, and a peer that is no address
    for client in addresses:
        assert engine.check_host("blocked.example", client=client).blocked
    log = close_engine(engine)
    events = stored_events(log.store)
    if form == "full":
        changed = events.pop(0)
        assert (changed["type"], changed["action"], changed["node"]) == (
            "config-changed", "client=full", ORIGIN)
        assert "full" in str(changed["detail"])
    else:
        assert "config-changed" not in {e["type"] for e in events}
    assert [e["type"] for e in events] == ["list-loaded"] + ["block"] * len(addresses)
    clients = [e.get("client") for e in events[1:]]
    if form == "none":
        assert clients == [None] * len(addresses)
        assert all("client" not in e for e in events)
    elif form == "truncated":
        assert clients == ["192.0.2.0/24", "2001:db8:1::/48", "192.0.2.0/24", "fe80::/48",
                           None]
    elif form == "full":
        assert clients == list(addresses)
    else:
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        key = log.store.pseudonym_key(day, b"\0" * 32)
        assert key != b"\0" * 32  # drawn at random, kept in the store
        expected = ["p:" + hmac.digest(key, a.encode(), "sha256")[:12].hex()
                    for a in ("192.0.2.77", "2001:db8:1:2::5", "192.0.2.77", "fe80::1",
                              "unix:/run/peer.sock")]
        assert clients == expected
        assert clients[0] == clients[2] != clients[1]
        raw = b"".join(leaf.event or b"" for leaf in log.store.leaves())
        for needle in (b"192.0.2", b"2001:db8", b"fe80", b"peer.sock"):
            assert needle not in raw


PSEUDONYM_CHILD = r"""
import sys
from netfilter.audit.log import AuditLog
from netfilter.audit.store import AuditStore
from netfilter.keys import load_private_key
from netfilter.privacy import ClientRecorder
log = AuditLog(AuditStore(sys.argv[1]), origin="test-node", key=load_private_key(sys.argv[2]))
print(ClientRecorder("pseudonym", log.pseudonym_key).record(sys.argv[3]))
log.close()
"""


def test_pseudonym_shared_by_the_processes_of_a_node(open_log: Callable[..., AuditLog],
                                                     tmp_path: Path) -> None:
    key_path, _ = generate_keypair(tmp_path / "node")
    path = tmp_path / "a.sqlite"
    one, two = open_log(path), open_log(path)  # two AuditStore objects: two "processes"
    first = ClientRecorder("pseudonym", one.pseudonym_key)
    second = ClientRecorder("pseudonym", two.pseudonym_key)
    ours = first.record("192.0.2.7")
    assert ours is not None and ours.startswith("p:") and len(ours) == 26
    assert second.record("192.0.2.7") == ours
    assert second.record("192.0.2.8") != ours
    child = subprocess.run([sys.executable, "-c", PSEUDONYM_CHILD, str(path), str(key_path),
                            "192.0.2.7"], capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == ours
    # another day, another key: pseudonyms do not link clients across days
    assert one.pseudonym_key("2031-01-01") == two.pseudonym_key("2031-01-01")
    assert one.pseudonym_key("2031-01-01") != one.pseudonym_key("2031-01-02")
    # a recorder without an audit log keeps its own key: it does not match the node's
    assert ClientRecorder("pseudonym").record("192.0.2.7") != ours


# ---------------------------------------------------------------- retention


def test_retention_removes_bodies_keeps_hashes(open_log: Callable[..., AuditLog],
                                               node_key: PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite"
    old_day = now_iso(200)[:10]
    log = open_log(path, retention_days=3650)
    # old events by both routes: rows with an old day, and events with an old time
    log.store.append([row(Event("block", ORIGIN, time=now_iso(200), ref=f"OLD-{i}"))
                      for i in range(5)])
    for i in range(3):
        log.record(Event("block", ORIGIN, time=now_iso(120 + i), ref=f"OLDER-{i}"))
    for i in range(4):
        log.record(Event("block", ORIGIN, ref=f"NEW-{i}"))
    log.record(Event("block", ORIGIN, time=now_iso(89), ref="KEPT"))
    old_key = log.store.pseudonym_key(old_day, b"k" * 32)
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    today_key = log.pseudonym_key(today)
    log.close()
    before = list(log.store.leaves())
    assert len(before) == 13 and all(leaf.event is not None for leaf in before)
    signed_before = log.store.latest_checkpoint()
    assert signed_before is not None and signed_before.size == 13

    later = open_log(path, retention_days=90)
    later.close()
    store = later.store
    after = list(store.leaves())
    assert len(after) == 14
    for old, new in zip(before, after, strict=False):
        assert new.hash == old.hash  # every leaf hash kept
        gone = json.loads(old.event or b"")["ref"].startswith("OLD")
        assert (new.event is None) == gone and (new.removed is not None) == gone
    retention = json.loads(after[-1].event or b"")
    cutoff = (datetime.now(UTC) - timedelta(days=90)).strftime("%Y-%m-%d")
    assert (retention["type"], retention["action"], retention["node"]) == (
        "retention", "remove", ORIGIN)
    assert retention["detail"] == f"removed=8 before={cutoff}"
    report = verify_log(store, node_key.public)
    assert report.ok, report.problems
    assert (report.removed, report.size) == (8, 14)
    # the pseudonym key of a removed day is destroyed; today's stays
    keys = dict(sqlite3.connect(keys_path(path)).execute("SELECT day, key FROM pseudonym_keys"))
    assert old_day not in keys and keys[today] == today_key
    assert later.pseudonym_key(old_day) != old_key  # a new key cannot link the old day
    # an old event's inclusion proof still verifies from its kept leaf hash
    cp = store.latest_checkpoint()
    assert cp is not None and cp.size == 14
    proof = merkle.inclusion_proof(0, cp.size, store)
    merkle.verify_inclusion(0, cp.size, after[0].hash, proof, open_cp(cp.note, node_key).root)
    # and the checkpoint signed before retention still holds
    merkle.verify_consistency(13, 14, signed_before.root, cp.root,
                              merkle.consistency_proof(13, 14, store))


# ---------------------------------------------------------------- tampering


def _base_log(path: Path, key: PrivateKey) -> list[int]:
    """A 40-event log with checkpoints at 10, 25 and 40; returns their sizes."""
    log = AuditLog(AuditStore(path), origin=ORIGIN, key=key, checkpoint_interval=3600)
    for i in range(40):
        log.record(Event("block", ORIGIN, ref=f"R-{i}", client=f"p:{i:024x}"))
        if i in (9, 24):
            log.flush()
            log.checkpoint()
    log.close()
    log.store.close()
    return [cp.size for cp in log.store.checkpoints()]


def _shift(db: sqlite3.Connection, start: int, by: int) -> None:
    """Renumber rows idx >= start by `by` without primary-key clashes."""
    db.execute("UPDATE leaves SET idx = -idx - 1 WHERE idx >= ?", (start,))
    db.execute("UPDATE leaves SET idx = -idx - 1 + ? WHERE idx < 0", (by,))


def _alter(db: sqlite3.Connection) -> None:
    (event,) = db.execute("SELECT event FROM leaves WHERE idx = 5").fetchone()
    db.execute("UPDATE leaves SET event = ? WHERE idx = 5",
               (bytes(event).replace(b"R-5", b"R-X"),))


def _alter_with_hash(db: sqlite3.Connection) -> None:
    (event,) = db.execute("SELECT event FROM leaves WHERE idx = 5").fetchone()
    event = bytes(event).replace(b"R-5", b"R-X")
    db.execute("UPDATE leaves SET event = ?, hash = ? WHERE idx = 5", (event, leaf_hash(event)))


def _delete_renumber(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM leaves WHERE idx = 12")
    _shift(db, 13, -1)


def _swap(db: sqlite3.Connection) -> None:
    a = db.execute("SELECT hash, event FROM leaves WHERE idx = 3").fetchone()
    b = db.execute("SELECT hash, event FROM leaves WHERE idx = 4").fetchone()
    db.execute("UPDATE leaves SET hash = ?, event = ? WHERE idx = 3", b)
    db.execute("UPDATE leaves SET hash = ?, event = ? WHERE idx = 4", a)


def _insert(db: sqlite3.Connection) -> None:
    _shift(db, 7, 1)
    h, e, d = row(Event("block", ORIGIN, time=now_iso(), ref="FORGED"))
    db.execute("INSERT INTO leaves (idx, hash, event, day) VALUES (7, ?, ?, ?)", (h, e, d))


def _resign(db: sqlite3.Connection) -> None:
    other = load_private_key(generate_keypair(Path(db.execute(
        "PRAGMA database_list").fetchone()[2]).with_name("other"))[0])
    (root,) = db.execute("SELECT root FROM checkpoints WHERE size = 25").fetchone()
    note = sign_checkpoint(Checkpoint(ORIGIN, 25, bytes(root)), Signer(ORIGIN, other))
    db.execute("UPDATE checkpoints SET note = ? WHERE size = 25", (note,))


def _note_root(db: sqlite3.Connection) -> None:
    (note,) = db.execute("SELECT note FROM checkpoints WHERE size = 25").fetchone()
    lines = bytes(note).split(b"\n")
    lines[2] = b"A" * 43 + b"="  # another root in the signed text
    db.execute("UPDATE checkpoints SET note = ? WHERE size = 25", (b"\n".join(lines),))


def _stored_root(db: sqlite3.Connection) -> None:
    db.execute("UPDATE checkpoints SET root = zeroblob(32) WHERE size = 25")


TAMPERING: dict[str, tuple[Callable[[sqlite3.Connection], None] | str, list[str]]] = {
    "altered body": (_alter, ["event 5 was altered"]),
    "altered body and hash": (_alter_with_hash, [
        "the tree at size 10 differs from its signed checkpoint",
        "the tree at size 25 differs", "the tree at size 40 differs"]),
    "removed, not renumbered": ("DELETE FROM leaves WHERE idx = 12", [
        "events 12..12 are missing",
        "checkpoint at size 25 covers events that are not in the log"]),
    "removed and renumbered": (_delete_renumber, [
        "the tree at size 25 differs from its signed checkpoint",
        "checkpoint at size 40 covers events that are not in the log (it holds 39)"]),
    "last removed": ("DELETE FROM leaves WHERE idx = 39", [
        "checkpoint at size 40 covers events that are not in the log (it holds 39)"]),
    "reordered": (_swap, ["the tree at size 10 differs from its signed checkpoint"]),
    "inserted": (_insert, ["the tree at size 10 differs from its signed checkpoint"]),
    "checkpoint re-signed with another key": (_resign, [
        "checkpoint at size 25: signature does not verify with the trusted key"]),
    "checkpoint root changed in its note": (_note_root, [
        "checkpoint at size 25: signature does not verify with the trusted key"]),
    "checkpoint root changed in its row": (_stored_root, [
        "checkpoint at size 25: stored size/root differ from its signed note"]),
}


@pytest.fixture(scope="module")
def base_log(tmp_path_factory: pytest.TempPathFactory, node_key: PrivateKey) -> Path:
    path = tmp_path_factory.mktemp("base") / "base.sqlite"
    assert _base_log(path, node_key) == [10, 25, 40]
    return path


def copy_log(src: Path, dst: Path) -> Path:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return dst


def test_untouched_log_verifies(base_log: Path, node_key: PrivateKey) -> None:
    store = AuditStore(base_log, create=False)
    report = verify_log(store, node_key.public)
    assert report.ok and (report.size, report.checkpoints, report.removed) == (40, 3, 0)
    assert_sound(store, node_key)


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_named(case: str, base_log: Path, node_key: PrivateKey,
                            tmp_path: Path) -> None:
    path = copy_log(base_log, tmp_path / "t.sqlite")
    change, expected = TAMPERING[case]
    db = sqlite3.connect(path, isolation_level=None)
    if isinstance(change, str):
        db.execute(change)
    else:
        change(db)
    db.close()
    report = verify_log(AuditStore(path, create=False), node_key.public)
    assert not report.ok
    for text in expected:
        assert any(text in p for p in report.problems), (text, report.problems)


def _rewritten(base_log: Path, key: PrivateKey, tmp_path: Path) -> tuple[Path, bytes]:
    """The node key's holder rewrites event 5 and re-signs every checkpoint: only an
    auditor's older checkpoint shows it. Returns the log and that older checkpoint."""
    path = copy_log(base_log, tmp_path / "r.sqlite")
    store = AuditStore(path, create=False, read_only=False)  # the forger writes
    cp = next(c for c in store.checkpoints() if c.size == 25)
    db = sqlite3.connect(path, isolation_level=None)
    _alter_with_hash(db)
    db.execute("DELETE FROM checkpoints")
    db.close()
    for size in (10, 25, 40):
        compact = merkle.CompactRange()
        compact.extend(store.leaf_hashes(0, size))
        note = sign_checkpoint(Checkpoint(ORIGIN, size, compact.root()), Signer(ORIGIN, key))
        store.add_checkpoint(StoredCheckpoint(size, compact.root(), note, now_iso(),
                                              b"".join(compact.hashes)))
    return path, cp.note


def test_since_catches_a_rewritten_log(base_log: Path, node_key: PrivateKey,
                                       tmp_path: Path) -> None:
    path, older = _rewritten(base_log, node_key, tmp_path)
    store = AuditStore(path, create=False)
    assert verify_log(store, node_key.public).ok  # consistent with its own checkpoints
    report = verify_log(store, node_key.public, since=older)
    assert not report.ok and report.since == 25
    assert any("not consistent with your checkpoint of size 25" in p for p in report.problems)
    genuine = verify_log(AuditStore(base_log, create=False), node_key.public, since=older)
    assert genuine.ok and genuine.since == 25


def test_since_larger_than_the_log(base_log: Path, node_key: PrivateKey,
                                   tmp_path: Path) -> None:
    path = copy_log(base_log, tmp_path / "s.sqlite")
    older = AuditStore(path).checkpoints()[-1].note  # size 40
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DELETE FROM leaves WHERE idx >= 30")
    db.execute("DELETE FROM checkpoints WHERE size > 25")
    db.close()
    report = verify_log(AuditStore(path, create=False), node_key.public, since=older)
    assert any("your checkpoint (size 40) is larger than the log (30)" in p
               for p in report.problems), report.problems


def test_since_signed_by_another_key(base_log: Path, node_key: PrivateKey,
                                     tmp_path: Path) -> None:
    other = load_private_key(generate_keypair(tmp_path / "other")[0])
    store = AuditStore(base_log, create=False)
    cp = store.checkpoints()[0]
    forged = sign_checkpoint(Checkpoint(ORIGIN, cp.size, cp.root), Signer(ORIGIN, other))
    report = verify_log(store, node_key.public, since=forged)
    assert any("your checkpoint does not verify" in p for p in report.problems)
    assert not verify_log(store, other.public).ok  # the wrong trusted key fails every cp


def test_gap_spanning_a_read_batch_is_named(open_log: Callable[..., AuditLog],
                                            node_key: PrivateKey, tmp_path: Path) -> None:
    log = open_log(tmp_path / "g.sqlite")
    event = Event("block", ORIGIN, time=now_iso())
    log.store.append([row(event)] * 10)
    log.checkpoint()
    log.store.append([row(event)] * 50_090)
    db = sqlite3.connect(tmp_path / "g.sqlite", isolation_level=None)
    db.execute("DELETE FROM leaves WHERE idx >= 10 AND idx < 40010")  # 40,000 events
    db.close()
    report = verify_log(log.store, node_key.public)
    assert not report.ok and any("missing" in p for p in report.problems), report


def test_text_typed_body_is_named_not_a_crash(base_log: Path, node_key: PrivateKey,
                                              tmp_path: Path) -> None:
    path = copy_log(base_log, tmp_path / "t.sqlite")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE leaves SET event = replace(event, 'R-5', 'R-X') WHERE idx = 5")
    report = verify_log(AuditStore(path, create=False), node_key.public)
    assert any("event 5 was altered" in p for p in report.problems)


# ---------------------------------------------------------------- several writers

WRITER_CHILD = r"""
import sys
from netfilter.audit.log import AuditLog
from netfilter.audit.store import AuditStore
from netfilter.events import Event
from netfilter.keys import load_private_key
path, key, tag, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
log = AuditLog(AuditStore(path), origin="test-node", key=load_private_key(key),
               checkpoint_interval=0.02, batch_size=16)
print("ready", flush=True)
sys.stdin.readline()
for i in range(count):
    log.record(Event("block", "test-node", ref=f"{tag}:{i}"))
log.close()
print(log.appended, flush=True)
"""


def test_several_writers_one_sequence(tmp_path: Path) -> None:
    key_path, _ = generate_keypair(tmp_path / "node")
    key = load_private_key(key_path)
    path, count = tmp_path / "shared.sqlite", 1500
    AuditStore(path)  # the file exists before the writers race on it
    child = subprocess.Popen([sys.executable, "-c", WRITER_CHILD, str(path), str(key_path),
                              "proc", str(count)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        shared = AuditStore(path)
        logs = {"a": AuditLog(shared, origin=ORIGIN, key=key, checkpoint_interval=0.02,
                              batch_size=16),
                "b": AuditLog(shared, origin=ORIGIN, key=key, checkpoint_interval=0.02,
                              batch_size=16),
                "c": AuditLog(AuditStore(path), origin=ORIGIN, key=key,
                              checkpoint_interval=0.02, batch_size=16)}

        def write(tag: str) -> None:
            for i in range(count):
                logs[tag].record(Event("block", ORIGIN, ref=f"{tag}:{i}"))

        threads = [threading.Thread(target=write, args=(tag,)) for tag in logs]
        child.stdin.write("go\n")
        child.stdin.flush()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for log in logs.values():
            log.close()
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert int(out.strip()) == count
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    store = AuditStore(path, create=False)
    leaves = list(store.leaves())
    assert [leaf.index for leaf in leaves] == list(range(4 * count))
    refs = [json.loads(leaf.event or b"")["ref"] for leaf in leaves]
    assert Counter(refs) == Counter(f"{tag}:{i}" for tag in ("a", "b", "c", "proc")
                                    for i in range(count))
    for tag in ("a", "b", "c", "proc"):  # each writer's events in its own order
        mine = [int(r.split(":")[1]) for r in refs if r.startswith(tag + ":")]
        assert mine == list(range(count))
    runs = 1 + sum(1 for x, y in itertools.pairwise(refs) if x.split(":")[0] != y.split(":")[0])
    assert runs > 4, "the writers never interleaved: the test did not test concurrency"
    assert len(store.checkpoints()) >= 2
    assert_sound(store, key)


# ---------------------------------------------------------------- crash

CRASH_CHILD = r"""
import sys
from datetime import UTC, datetime
from random import Random
from netfilter.audit.log import AuditLog
from netfilter.audit.merkle import leaf_hash
from netfilter.audit.store import AuditStore
from netfilter.events import Event
from netfilter.keys import load_private_key
path, key, tag, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = AuditStore(path)
log = AuditLog(store, origin="test-node", key=load_private_key(key),
               checkpoint_interval=0.01, batch_size=8, linger=0.0)  # commit at once
rng = Random(seed)
print("ready", flush=True)
k = 0
while True:
    n = rng.randint(1, 40)
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    events = [Event("block", "test-node", time=now, ref=f"{tag}:{k}:{i}/{n}").to_json().encode()
              for i in range(n)]
    first = store.append([(leaf_hash(e), e, now[:10]) for e in events])
    print(f"{tag} {k} {first} {n}", flush=True)
    k += 1
    log.record(Event("block", "test-node", ref=f"{tag}:log:{k}"))
"""


def test_writer_lingers_for_company_and_flush_cuts_it_short(tmp_path: Path) -> None:
    key = load_private_key(generate_keypair(tmp_path / "node")[0])
    store = AuditStore(tmp_path / "linger.sqlite")
    log = AuditLog(store, origin=ORIGIN, key=key, linger=30.0, checkpoint_interval=3600)
    try:
        for i in range(3):
            log.record(Event("block", ORIGIN, ref=f"L-{i}"))
        time.sleep(0.2)
        assert store.size() == 0  # waiting for more events, up to 30 s
        started = time.monotonic()
        log.flush()
        assert store.size() == 3 and time.monotonic() - started < 25
        assert log.appended == 3
    finally:
        log.close()


def test_sigkill_leaves_committed_batches_intact(tmp_path: Path) -> None:
    key_path, _ = generate_keypair(tmp_path / "node")
    key = load_private_key(key_path)
    path = tmp_path / "crash.sqlite"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    reported: list[tuple[str, int, int, int]] = []
    for round_ in range(4):
        tag = f"r{round_}"
        out_path = tmp_path / f"{tag}.out"
        with out_path.open("w") as out:
            child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(path),
                                      str(key_path), tag, str(seed + round_)],
                                     stdout=out, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 30
                while out_path.read_text().count("\n") < 3 and time.monotonic() < deadline:
                    assert child.poll() is None, "the crash child died on its own"
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.3))  # SIGKILL at a random moment
            finally:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
        assert child.returncode == -signal.SIGKILL
        for line in out_path.read_text().splitlines(keepends=True)[1:]:
            if line.endswith("\n"):  # a line cut by the kill is not a report
                t, k, first, n = line.split()
                reported.append((t, int(k), int(first), int(n)))
    store = AuditStore(path, create=False, read_only=False)  # opens after four kills
    leaves = list(store.leaves())
    msg = f"seed {seed}"
    assert [leaf.index for leaf in leaves] == list(range(store.size())), msg
    refs = [json.loads(leaf.event or b"")["ref"] for leaf in leaves]
    # every batch the child saw committed is there, whole, where append said
    for tag, k, first, n in reported:
        assert refs[first:first + n] == [f"{tag}:{k}:{i}/{n}" for i in range(n)], msg
    # and no batch in the store is partial (a batch is one transaction)
    batches: dict[str, list[tuple[int, str]]] = {}
    for index, ref in enumerate(refs):
        tag, k, rest = ref.split(":")
        if k != "log":
            batches.setdefault(f"{tag}:{k}", []).append((index, rest))
    for name, items in batches.items():
        n = int(items[0][1].split("/")[1])
        assert [r for _, r in items] == [f"{i}/{n}" for i in range(n)], (name, msg)
        assert items[-1][0] - items[0][0] == n - 1, (name, msg)
    # the AuditLog writer's events are a prefix of what was recorded, in order
    for round_ in range(4):
        mine = [int(r.split(":")[2]) for r in refs if r.startswith(f"r{round_}:log:")]
        assert mine == list(range(1, len(mine) + 1)), msg
    assert len(reported) >= 12 and store.checkpoints(), msg
    after = AuditLog(store, origin=ORIGIN, key=key)
    after.close()  # signs the tree as the crash left it
    print(f"crash: {seed=} {len(reported)} reported batches, {len(leaves)} events, "
          f"{len(store.checkpoints())} checkpoints")
    assert_sound(store, key)


# ---------------------------------------------------------------- back-pressure


class GatedStore(AuditStore):
    """A store whose appends wait for a gate: another process holding the write lock,
    or a full disk, as the appender sees it."""

    gate = threading.Event()

    def append(self, leaves: object) -> int:  # type: ignore[override]
        assert self.gate.wait(60)
        return super().append(leaves)  # type: ignore[arg-type]


def test_a_stuck_store_sheds_counted_and_never_blocks_record(
        node_key: PrivateKey, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = GatedStore(tmp_path / "stuck.sqlite")
    store.gate = threading.Event()
    log = AuditLog(store, origin=ORIGIN, key=node_key, queue_size=16, batch_size=4,
                   checkpoint_interval=3600, linger=0.0)

    def produce(tag: str) -> None:
        for i in range(150):
            log.record(Event("block", ORIGIN, ref=f"{tag}:{i}"))

    threads = [threading.Thread(target=produce, args=(t,)) for t in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "record() waited on a store that takes no writes"
    shed = log.shed
    # what is held: the queue, and the one batch the appender is trying to write
    assert 300 - 16 - 4 <= shed < 300
    shed_lines = [r for r in caplog.records if "shed" in r.getMessage()]
    assert len(shed_lines) == 1, "the shedding line is rate-limited"
    store.gate.set()
    log.close()
    events = stored_events(log.store)
    blocks = [e for e in events if e["type"] == "block"]
    said = [e for e in events if e["type"] == "shed"]
    assert len(blocks) == 300 - shed and log.appended == len(events)
    assert sum(int(e["count"]) for e in said) == shed == log.shed_blocks, said
    assert all(str(e["detail"]).startswith(f"events={e['count']} blocks=") for e in said)
    for tag in ("x", "y"):  # what was kept is in order
        kept = [int(str(e["ref"]).split(":")[1]) for e in blocks if e["ref"].startswith(tag)]
        assert kept == sorted(kept)
    assert_sound(log.store, node_key)


def test_a_failing_append_is_retried_not_lost(node_key: PrivateKey, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    class FlakyStore(AuditStore):
        failures = 1

        def append(self, leaves: object) -> int:  # type: ignore[override]
            if self.failures:
                self.failures -= 1
                raise sqlite3.OperationalError("disk I/O error")
            return super().append(leaves)  # type: ignore[arg-type]

    log = AuditLog(FlakyStore(tmp_path / "flaky.sqlite"), origin=ORIGIN, key=node_key,
                   checkpoint_interval=3600)
    for i in range(5):
        log.record(Event("block", ORIGIN, ref=f"R-{i}"))
    log.close()  # waits out the 1 s retry
    assert [json.loads(leaf.event or b"")["ref"] for leaf in log.store.leaves()] == [
        f"R-{i}" for i in range(5)]
    assert "append failed" in caplog.text


def test_a_failing_checkpoint_does_not_stop_the_writer(node_key: PrivateKey, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    class NoCheckpointStore(AuditStore):
        refused = 0

        def add_checkpoint(self, checkpoint: StoredCheckpoint) -> bool:
            if not self.refused:
                self.refused += 1
                raise sqlite3.OperationalError("database or disk is full")
            return super().add_checkpoint(checkpoint)

    store = NoCheckpointStore(tmp_path / "cp.sqlite")
    log = AuditLog(store, origin=ORIGIN, key=node_key, checkpoint_interval=0.02)
    log.record(Event("block", ORIGIN, ref="R-0"))
    deadline = time.monotonic() + 10
    while not store.refused and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.refused, "the writer never tried a periodic checkpoint"
    for i in range(1, 10):
        log.record(Event("block", ORIGIN, ref=f"R-{i}"))
    log.close()
    assert log.appended == 10 == store.size()
    assert "background step failed" in caplog.text
    assert_sound(store, node_key)


# ---------------------------------------------------------------- the engine


def test_engine_events_arrive_in_the_store(build: BuildBundle, authority: tuple[Path, Path],
                                          tmp_path: Path) -> None:
    bundle = build()
    engine = make_engine(load_config(config(tmp_path, bundle, authority[1])))
    assert engine.check_url("http://partly.example/dir/x", client="192.0.2.1",
                            detail="GET").blocked
    assert engine.check_host("sub.blocked.example", frontend="dns", client="192.0.2.2",
                             detail="qtype=A").blocked
    assert not engine.check_url("http://ok.blocked.example/", client="192.0.2.3").blocked
    assert not engine.check_url("http://clean.example/").blocked  # not recorded
    assert engine.reload()
    bundle.write_bytes(b"not a bundle")
    assert not engine.reload()
    log = close_engine(engine)
    events = stored_events(log.store)
    assert [e["type"] for e in events] == ["list-loaded", "block", "block", "override",
                                           "list-loaded", "list-refused"]
    loaded = events[0]
    assert (loaded["list"], loaded["version"], loaded["node"]) == ("test", 1, ORIGIN)
    assert str(loaded["detail"]).startswith("entries=8 key=")
    assert (events[1]["frontend"], events[1]["ref"], events[1]["client"]) == (
        "proxy", "T-2", "192.0.2.0/24")
    assert (events[2]["frontend"], events[2]["ref"], events[2]["detail"]) == (
        "dns", "T-1", "qtype=A")
    assert (events[3]["type"], events[3]["action"], events[3]["detail"]) == (
        "override", "allow", "exception=APPEAL-9")
    assert events[5]["node"] == ORIGIN and "detail" in events[5]
    key = load_private_key(tmp_path / "var" / "node.key")
    cp = log.store.latest_checkpoint()
    assert cp is not None and cp.size == 6
    assert_sound(log.store, key)
