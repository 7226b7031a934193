"""The audit log's files get the narrowest permissions that work, and the pseudonym keys
never sit in the file an auditor is handed."""

from __future__ import annotations

import grp
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from netfilter.audit.log import AuditLog
from netfilter.audit.store import AuditStore, keys_path
from netfilter.errors import NetfilterError
from netfilter.events import Event
from netfilter.keys import PrivateKey, generate_keypair, load_private_key
from netfilter.privacy import ClientRecorder


@pytest.fixture(scope="module")
def node_key(tmp_path_factory: pytest.TempPathFactory) -> PrivateKey:
    key_path, _ = generate_keypair(tmp_path_factory.mktemp("node") / "node")
    return load_private_key(key_path)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The widest umask: what the store creates must not depend on the caller's."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def write_some(store: AuditStore, key: PrivateKey) -> AuditLog:
    log = AuditLog(store, origin="files.example", key=key, checkpoint_interval=3600)
    recorder = ClientRecorder("pseudonym", log.pseudonym_key)
    for i in range(20):
        log.record(Event("block", "files.example", ref=f"R-{i}",
                         client=recorder.record(f"192.0.2.{i}")))
    log.flush()
    return log


def test_store_wal_shm_and_keys_are_0600(tmp_path: Path, node_key: PrivateKey,
                                         open_umask: None) -> None:
    path = tmp_path / "var" / "audit.sqlite"
    store = AuditStore(path)
    log = write_some(store, node_key)
    try:
        wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
        assert wal.exists() and shm.exists()  # open while the log runs
        for name in (path, wal, shm, keys_path(path)):
            assert mode(name) == 0o600, name
        assert mode(path.parent) == 0o700
    finally:
        log.close()


def test_an_older_world_readable_store_is_narrowed(tmp_path: Path, node_key: PrivateKey,
                                                   open_umask: None) -> None:
    path = tmp_path / "audit.sqlite"
    db = sqlite3.connect(path)  # a log as earlier versions made it: 0644, keys inside
    db.executescript("CREATE TABLE pseudonym_keys (day TEXT PRIMARY KEY, key BLOB NOT NULL);"
                     "INSERT INTO pseudonym_keys VALUES ('2026-12-01', x'00112233445566778899');")
    db.close()
    os.chmod(path, 0o644)
    store = AuditStore(path)
    assert mode(path) == 0o600
    tables = {r[0] for r in sqlite3.connect(path).execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "pseudonym_keys" not in tables
    assert bytes.fromhex("00112233445566778899") not in path.read_bytes()  # vacuumed away
    assert store.pseudonym_key("2026-12-01", b"new") == bytes.fromhex("00112233445566778899")


def test_the_log_holds_no_key_material(tmp_path: Path, node_key: PrivateKey) -> None:
    path = tmp_path / "audit.sqlite"
    log = write_some(AuditStore(path), node_key)
    log.close()
    keys = [bytes(k) for (k,) in sqlite3.connect(keys_path(path)).execute(
        "SELECT key FROM pseudonym_keys")]
    assert keys
    raw = path.read_bytes() + (Path(f"{path}-wal").read_bytes()
                               if Path(f"{path}-wal").exists() else b"")
    assert not any(k in raw for k in keys)


def test_an_auditor_opening_the_log_touches_no_keys_and_no_modes(tmp_path: Path,
                                                                node_key: PrivateKey) -> None:
    path = tmp_path / "audit.sqlite"
    write_some(AuditStore(path), node_key).close()
    keys_path(path).unlink()
    os.chmod(path, 0o644)  # as handed over
    copy = AuditStore(path, create=False)
    assert copy.size() == 20 and mode(path) == 0o644
    assert not keys_path(path).exists()
    with pytest.raises(NetfilterError, match="pseudonym keys"):
        copy.pseudonym_key("2026-12-01", b"x" * 32)


def test_a_named_group_may_read_the_log_never_the_keys(tmp_path: Path, node_key: PrivateKey,
                                                       open_umask: None) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    path = tmp_path / "var" / "audit.sqlite"
    log = write_some(AuditStore(path, group=group), node_key)
    try:
        assert mode(path) == 0o640 and path.stat().st_gid == os.getgid()
        assert mode(Path(f"{path}-wal")) == 0o640
        assert mode(keys_path(path)) == 0o600
        assert mode(path.parent) == 0o750
    finally:
        log.close()


def test_an_unknown_group_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NetfilterError, match="no-such-group-here.*not a group"):
        AuditStore(tmp_path / "audit.sqlite", group="no-such-group-here")
