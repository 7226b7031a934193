"""`netfilter audit follow` against a running node: `netfilter audit tiles --listen`
serving a tlog-tiles directory that `write_tiles` keeps current as the log grows.

Held against the issue ("Auditor's view"): following twice as the log grows is
consistent, across full tiles; a log rewritten with the node's own key (events deleted
and others appended, re-signed) is caught in one line with exit 1 and the kept
checkpoint stays; a tampered tile or entry, a wrong key, an oversize response are
caught; only the tiles a proof needs are fetched; the state is 0700/0600; each user
mistake is one line with exit 2. Traffic only to loopback.
"""

from __future__ import annotations

import fcntl
import functools
import http.client
import http.server
import os
import shutil
import sqlite3
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from netfilter.audit import fetch as fetch_module
from netfilter.audit import follow as follow_module
from netfilter.audit import tilereader as tilereader_module
from netfilter.audit.checkpoint import Checkpoint, CosignatureSigner, sign_checkpoint
from netfilter.audit.fetch import base_url
from netfilter.audit.follow import FollowError, State
from netfilter.audit.follow import follow as run_follow
from netfilter.audit.merkle import CompactRange, leaf_hash
from netfilter.audit.note import Signer
from netfilter.audit.store import AuditStore, StoredCheckpoint
from netfilter.audit.tilereader import TileError, parse_bundle
from netfilter.audit.tiles import tile_path, write_tiles
from netfilter.errors import NetfilterError
from netfilter.keys import generate_keypair, load_private_key, load_public_key
from tests.dns_tls_support import certificate
from tests.support import DEMO_LIST, DEMO_PUB, ChildProcess, free_port, listening

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = "gw-follow.example"


class Log:
    """A node's store grown by direct appends and signed with its key and origin."""

    def __init__(self, directory: Path, origin: str = ORIGIN) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.origin = origin
        self.path = directory / "audit.sqlite"
        self.store = AuditStore(self.path)
        key, self.pub = generate_keypair(directory / "node")
        self.signer = Signer.from_private_key(origin, load_private_key(key))
        self.compact = CompactRange()
        self.tiles = directory / "tiles"

    def grow(self, count: int, tag: str = "e") -> None:
        first = self.store.size()
        rows = []
        for i in range(first, first + count):
            event = b'{"i":%d,"origin":"%s","tag":"%s"}' % (i, self.origin.encode(),
                                                           tag.encode())
            rows.append((leaf_hash(event), event, "2026-11-05"))
        self.store.append(rows)
        self.compact.extend(h for h, _, _ in rows)
        self.sign()

    def sign(self) -> None:
        size, root = self.compact.size, self.compact.root()
        note = sign_checkpoint(Checkpoint(self.origin, size, root), self.signer)
        self.store.add_checkpoint(StoredCheckpoint(size, root, note, "2026-11-05T00:00:00",
                                                   b"".join(self.compact.hashes)))
        write_tiles(self.store, self.tiles)

    def rewrite(self, keep: int, count: int) -> None:
        """Delete the events from `keep` on and every checkpoint, append `count` others
        and sign with the same key: a history no earlier checkpoint is part of."""
        self.store.close()
        with sqlite3.connect(self.path) as db:
            db.execute("DELETE FROM leaves WHERE idx >= ?", (keep,))
            db.execute("DELETE FROM checkpoints")
        db.close()
        self.store = AuditStore(self.path, create=False, read_only=False)  # the forger
        self.compact = CompactRange()
        self.compact.extend(self.store.leaf_hashes(0, keep))
        self.grow(count, tag="rewritten")


class TileNode(ChildProcess):
    """`netfilter audit tiles --log --out --listen`: the node's tiles over HTTP."""

    name = "audit tiles"

    def __init__(self, log: Log, log_path: Path | None = None) -> None:
        self.log_path = log_path or log.path.with_name("tiles.log")
        self.proc = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.popen([sys.executable, "-m", "netfilter.cli", "audit", "tiles", "--log",
                    str(log.path), "--out", str(log.tiles), "--listen",
                    f"127.0.0.1:{self.port}"], cwd=ROOT)
        self.wait_until(lambda: listening(self.port))


@pytest.fixture
def log(tmp_path: Path) -> Log:
    node = Log(tmp_path)
    node.grow(10)
    return node


@pytest.fixture
def node(log: Log, tmp_path: Path) -> Iterator[TileNode]:
    server = TileNode(log, tmp_path / "tiles.log")
    yield server
    server.stop()


def follow(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netfilter.cli", "audit", "follow",
                           *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def one_line(result: subprocess.CompletedProcess[str], status: int, *needles: str) -> str:
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netfilter: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


def ok(result: subprocess.CompletedProcess[str], old: int, new: int) -> str:
    assert result.returncode == 0, result
    assert result.stderr == ""
    (line,) = result.stdout.splitlines()
    assert f"{ORIGIN} at " in line and f": {old} -> {new}, consistent; cosigners:" in line
    return line


# ---------------------------------------------------------------- a log that grows
def test_follow_as_the_log_grows(log: Log, node: TileNode, tmp_path: Path) -> None:
    state = tmp_path / "auditor" / "state"
    ok(follow(node.url, "--key", log.pub, "--state", state), 0, 10)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    kept = state / "checkpoint"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert kept.read_bytes() == (log.tiles / "checkpoint").read_bytes()
    assert sorted(p.name for p in state.iterdir()) == [".lock", "checkpoint"]  # no temporary
    assert stat.S_IMODE((state / ".lock").stat().st_mode) == 0o600

    log.grow(290)  # 300: the first full tile
    line = ok(follow(node.url, "--key", log.pub, "--state", state, "--entries"), 10, 300)
    assert line.endswith("cosigners: none; 290 entries match their leaf hashes "
                         "(0 removed by retention)")
    log.grow(300)  # 600: a second full level-0 tile, two hashes at level 1
    ok(follow(node.url, "--key", log.pub, "--state", state, "--entries"), 300, 600)
    ok(follow(node.url, "--key", log.pub, "--state", state), 600, 600)
    assert kept.read_bytes() == (log.tiles / "checkpoint").read_bytes()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600


def test_one_round_at_a_time_per_state_directory(log: Log, node: TileNode,
                                                 tmp_path: Path) -> None:
    """A second follow on a state directory whose round is in progress refuses in one
    line instead of racing the first to write the kept checkpoint."""
    state = tmp_path / "state"
    ok(follow(node.url, "--key", log.pub, "--state", state), 0, 10)
    kept = (state / "checkpoint").read_bytes()
    log.grow(5)
    fd = os.open(state / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a round in progress
        one_line(follow(node.url, "--key", log.pub, "--state", state), 2,
                 "another `audit follow` is using this state directory")
        assert (state / "checkpoint").read_bytes() == kept
    finally:
        os.close(fd)
    ok(follow(node.url, "--key", log.pub, "--state", state), 10, 15)


def test_partial_tiles_gone_read_from_full_tiles(log: Log, node: TileNode,
                                                 tmp_path: Path) -> None:
    """A node may delete a partial tile once its full tile exists (tlog-tiles); a
    follower that holds an older checkpoint reads the prefix of the full one."""
    state = tmp_path / "state"
    log.grow(290)
    ok(follow(node.url, "--key", log.pub, "--state", state), 0, 300)
    old = (log.tiles / "checkpoint").read_bytes()
    log.grow(300)
    (log.tiles / "checkpoint").write_bytes(old)  # the served checkpoint lags its tiles
    assert not (log.tiles / f"{tile_path(0, 1)}.p").exists()
    ok(follow(node.url, "--key", log.pub, "--state", tmp_path / "fresh", "--entries"), 0, 300)


# ---------------------------------------------------------------- rewritten logs
def test_rewritten_log_is_caught_and_the_old_checkpoint_kept(log: Log, node: TileNode,
                                                             tmp_path: Path) -> None:
    state = tmp_path / "state"
    log.grow(290)
    ok(follow(node.url, "--key", log.pub, "--state", state), 0, 300)
    kept = (state / "checkpoint").read_bytes()
    log.rewrite(keep=120, count=200)  # 320 events, 180 of them new; signed by the node
    line = one_line(follow(node.url, "--key", log.pub, "--state", state), 1,
                    "NOT CONSISTENT", "size 320", "size 300", "rewritten or forked")
    assert (state / "checkpoint").read_bytes() == kept
    assert (state / "conflicting-checkpoint").read_bytes() == (
        log.tiles / "checkpoint").read_bytes()
    assert str(state / "conflicting-checkpoint") in line
    # and it stays caught: the next run compares with the same kept checkpoint
    one_line(follow(node.url, "--key", log.pub, "--state", state), 1, "NOT CONSISTENT")
    assert (state / "checkpoint").read_bytes() == kept


def test_shrunk_log_is_caught(log: Log, node: TileNode, tmp_path: Path) -> None:
    state = tmp_path / "state"
    log.grow(290)
    ok(follow(node.url, "--key", log.pub, "--state", state), 0, 300)
    kept = (state / "checkpoint").read_bytes()
    log.rewrite(keep=250, count=5)
    one_line(follow(node.url, "--key", log.pub, "--state", state), 1,
             "NOT CONSISTENT", "smaller than the kept one of size 300")
    assert (state / "checkpoint").read_bytes() == kept


def test_an_older_checkpoint_of_the_same_log_is_not_a_fork(log: Log, node: TileNode,
                                                            tmp_path: Path) -> None:
    """A cache or mirror that lags serves an older checkpoint: the kept one stays, exit 0;
    the node's tiles of the kept size prove the older one is part of it."""
    state = tmp_path / "state"
    log.grow(290)
    older = (log.tiles / "checkpoint").read_bytes()
    log.grow(300)
    ok(follow(node.url, "--key", log.pub, "--state", state), 0, 600)
    kept = (state / "checkpoint").read_bytes()
    (log.tiles / "checkpoint").write_bytes(older)
    line = ok(follow(node.url, "--key", log.pub, "--state", state), 600, 300)
    assert line.endswith("the node serves an older checkpoint than the one kept (600), "
                         "which stays")
    assert (state / "checkpoint").read_bytes() == kept
    assert not (state / "conflicting-checkpoint").exists()


def test_same_size_other_root_is_caught(log: Log, node: TileNode, tmp_path: Path) -> None:
    state = tmp_path / "state"
    ok(follow(node.url, "--key", log.pub, "--state", state), 0, 10)
    log.rewrite(keep=9, count=1)
    one_line(follow(node.url, "--key", log.pub, "--state", state), 1, "NOT CONSISTENT")


# ---------------------------------------------------------------- tampering, keys, sizes
def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_tiles_are_caught(log: Log, node: TileNode, tmp_path: Path) -> None:
    state = tmp_path / "state"
    log.grow(290)
    ok(follow(node.url, "--key", log.pub, "--state", state), 0, 300)
    kept = (state / "checkpoint").read_bytes()
    log.grow(300)
    full = log.tiles / tile_path(0, 1)  # leaves 256..511: the proof from 300 needs it
    _flip(full, 32 * 60 + 3)
    one_line(follow(node.url, "--key", log.pub, "--state", state), 1,
             tile_path(0, 1), "does not hash to the hash its parent", "tampered tile")
    assert (state / "checkpoint").read_bytes() == kept
    _flip(full, 32 * 60 + 3)
    edge = log.tiles / tile_path(0, 2, 600 - 512)
    _flip(edge, 5)
    one_line(follow(node.url, "--key", log.pub, "--state", state), 1,
             "do not hash to the checkpoint's root")
    _flip(edge, 5)
    bundle = log.tiles / tile_path("entries", 1)
    data = bundle.read_bytes()
    bundle.write_bytes(data.replace(b'"i":300,', b'"i":301,'))
    one_line(follow(node.url, "--key", log.pub, "--state", state, "--entries"), 1,
             "entry 300 does not hash to its leaf")
    assert (state / "checkpoint").read_bytes() == kept
    bundle.write_bytes(data)
    ok(follow(node.url, "--key", log.pub, "--state", state, "--entries"), 300, 600)


def test_wrong_key_and_forged_signature(log: Log, node: TileNode, tmp_path: Path) -> None:
    _, other = generate_keypair(tmp_path / "other")
    one_line(follow(node.url, "--key", other, "--state", tmp_path / "s1"), 1,
             "not signed by the key in", "wrong key")
    assert not (tmp_path / "s1" / "checkpoint").exists()
    served = log.tiles / "checkpoint"
    note = served.read_bytes()
    served.write_bytes(note.replace(b"\n10\n", b"\n11\n", 1))  # the text, not the signature
    one_line(follow(node.url, "--key", log.pub, "--state", tmp_path / "s2"), 1,
             "does not verify", "forged or altered")
    served.write_bytes(note)
    ok(follow(node.url, "--key", log.pub, "--state", tmp_path / "s3"), 0, 10)
    one_line(follow(node.url, "--key", other, "--state", tmp_path / "s3"), 2,
             "the kept checkpoint does not verify")


def test_cosignatures_reported(log: Log, node: TileNode, tmp_path: Path) -> None:
    served = log.tiles / "checkpoint"
    witness_key, _ = generate_keypair(tmp_path / "witness")
    witness = CosignatureSigner("witness.example", load_private_key(witness_key),
                                clock=lambda: 1_780_000_000)
    note = served.read_bytes()
    text = note.split(b"\n\n", 1)[0] + b"\n"
    signed = sign_checkpoint(Checkpoint.parse(text.decode()), log.signer, witness)
    served.write_bytes(signed)
    line = ok(follow(node.url, "--key", log.pub, "--state", tmp_path / "s1"), 0, 10)
    assert line.endswith("cosigners: witness.example (unchecked)")
    line = ok(follow(node.url, "--key", log.pub, "--state", tmp_path / "s2", "--witness",
                     witness.verifier().vkey), 0, 10)
    assert line.endswith("cosigners: witness.example (verified)")


def test_oversize_responses_refused(log: Log, node: TileNode, tmp_path: Path) -> None:
    served = log.tiles / "checkpoint"
    note = served.read_bytes()
    served.write_bytes(note + b"x" * (1 << 18))
    one_line(follow(node.url, "--key", log.pub, "--state", tmp_path / "s"), 1,
             "/checkpoint", "more than the 131072 it may have")
    served.write_bytes(note)
    edge = log.tiles / tile_path(0, 0, 10)
    edge.write_bytes(edge.read_bytes() + b"\0" * 32)
    one_line(follow(node.url, "--key", log.pub, "--state", tmp_path / "s"), 1,
             tile_path(0, 0, 10), "more than the 320 it may have")
    assert not (tmp_path / "s" / "checkpoint").exists()


def test_missing_tiles_and_no_node(log: Log, node: TileNode, tmp_path: Path) -> None:
    shutil.rmtree(log.tiles / "tile")
    one_line(follow(node.url, "--key", log.pub, "--state", tmp_path / "s"), 1,
             "not served (404)")
    one_line(follow(f"{node.url}elsewhere/", "--key", log.pub, "--state", tmp_path / "s"),
             1, "checkpoint: not served (404)")
    node.stop()
    one_line(follow(node.url, "--key", log.pub, "--state", tmp_path / "s"), 1,
             "cannot fetch")


# ---------------------------------------------------------------- user mistakes
def test_user_mistakes_one_line_exit_2(log: Log, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (tmp_path / "file").write_text("x")
    cases = [
        (("http://node.example/", "--key", log.pub, "--state", state),
         ("http://node.example/", "loopback", "--allow-http")),
        (("ftp://127.0.0.1/", "--key", log.pub, "--state", state), ("https://",)),
        (("https://127.0.0.1:99999/", "--key", log.pub, "--state", state), ("not a URL",)),
        (("https://node.example/?x=1", "--key", log.pub, "--state", state), ("query",)),
        (("https://node.example/", "--key", tmp_path / "none.pub", "--state", state),
         ("none.pub", "not found")),
        (("https://node.example/", "--key", tmp_path / "file", "--state", state),
         ("not a PEM public key",)),
        (("https://node.example/", "--key", log.pub, "--state", tmp_path / "file"),
         ("not a directory",)),
        (("https://node.example/", "--key", log.pub, "--state", state, "--timeout", "0"),
         ("--timeout",)),
        (("https://node.example/", "--key", log.pub, "--state", state, "--witness", "w+1"),
         ("--witness", "malformed cosigner key")),
    ]
    for args, needles in cases:
        one_line(follow(*args), 2, *needles)
    assert not state.exists()
    usage = follow("https://node.example/", "--state", state)  # argparse: no --key
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_only_the_tiles_a_proof_needs(log: Log, node: TileNode, tmp_path: Path) -> None:
    """From 300 to 600: the checkpoint, the two edge tiles (0/002.p/88, 1/000.p/2) and
    the one full tile the proof reads into (0/001); never tile 0/000 or the entries."""
    state = State(tmp_path / "state")
    log.grow(290)
    first = run_follow(node.url, load_public_key(log.pub), state)
    assert (first.old_size, first.new_size, first.requests) == (0, 300, 3)
    log.grow(300)
    second = run_follow(node.url, load_public_key(log.pub), state)
    assert (second.old_size, second.new_size, second.requests) == (300, 600, 4)
    checked = run_follow(node.url, load_public_key(log.pub), state, entries=True)
    assert checked.entries_checked == 0 and checked.requests == 3


# ---------------------------------------------------------------- a real netfilter serve
def _served_size(port: int) -> int:
    """The size in the node's served checkpoint; -1 while there is none."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/checkpoint", timeout=5) as r:
            return int(r.read().split(b"\n")[1])
    except (OSError, ValueError, IndexError):
        return -1


def _size_above(port: int, size: int) -> int:
    for _ in range(200):  # bounded: checkpoints come every 0.3 s
        served = _served_size(port)
        if served > size:
            return served
        time.sleep(0.1)
    raise AssertionError(f"the served checkpoint stayed at {size}")


def test_follow_a_running_serve(tmp_path: Path) -> None:
    stop_port, tiles_port = free_port(), free_port()
    config = tmp_path / "netfilter.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"id": "serve-follow.example", "key": str(tmp_path / "node.key")},
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
        "stoppage": {"listen": f"127.0.0.1:{stop_port}"},
        "audit": {"path": str(tmp_path / "audit.sqlite"), "client": "none",
                  "checkpoint_interval": 0.3, "tiles": str(tmp_path / "tiles"),
                  "tiles_listen": f"127.0.0.1:{tiles_port}"},
    }), encoding="utf-8")

    class Serve(ChildProcess):
        name = "netfilter serve"
        log_path = tmp_path / "serve.log"
        proc = None

    serve = Serve()
    serve.popen([sys.executable, "-m", "netfilter.cli", "serve", "--config", str(config)],
                cwd=ROOT)
    try:
        serve.wait_until(lambda: _served_size(tiles_port) > 0)
        url, pub, state = f"http://127.0.0.1:{tiles_port}/", tmp_path / "node.pub", \
            tmp_path / "auditor"
        first = follow(url, "--key", pub, "--state", state, "--entries")
        assert first.returncode == 0, (first, serve.log())
        old = int(first.stdout.split(": 0 -> ")[1].split(",")[0])
        for i in range(3):  # blocks: events the node records and signs
            connection = http.client.HTTPConnection("127.0.0.1", stop_port, timeout=5)
            connection.request("GET", f"/page-{i}", headers={"Host": f"h{i}.blocked.example"})
            assert connection.getresponse().status == 451
            connection.close()
        new = _size_above(tiles_port, old)
        second = follow(url, "--key", pub, "--state", state, "--entries")
        assert second.returncode == 0, (second, serve.log())
        assert f": {old} -> " in second.stdout and ", consistent; cosigners:" in second.stdout
        assert int(second.stdout.split(f": {old} -> ")[1].split(",")[0]) >= new
    finally:
        assert serve.stop() == 0, serve.log()


# ---------------------------------------------------------------- pieces
@pytest.mark.parametrize(("url", "allow_http", "base"), [
    ("https://gw.example/tiles", False, "https://gw.example/tiles/"),
    ("https://gw.example:8443/", False, "https://gw.example:8443/"),
    ("http://127.0.0.1:8090", False, "http://127.0.0.1:8090/"),
    ("http://127.3.2.1/", False, "http://127.3.2.1/"),
    ("http://[::1]:8090/", False, "http://[::1]:8090/"),
    ("http://localhost/", False, "http://localhost/"),
    ("http://gw.example/", True, "http://gw.example/"),
    ("https://bücher.example/", False, "https://bücher.example/"),
    ("https://gw.example./", False, "https://gw.example./"),
])
def test_base_url_accepted(url: str, allow_http: bool, base: str) -> None:
    assert base_url(url, allow_http=allow_http) == base


@pytest.mark.parametrize("url", ["http://gw.example/", "http://10.0.0.1/", "http://[::2]/",
                                 "http://127.0.0.1.example/", "file:///etc/passwd",
                                 "gw.example", "https://", "https://u:p@gw.example/",
                                 "https://gw.example/#x", "https://gw.example:0x/",
                                 "https://gw node.example/", "https://a..b.example/",
                                 "https://-.example/", "https://xn--a.example/",
                                 "https://gw%41.example/"])
def test_base_url_refused(url: str) -> None:
    with pytest.raises(NetfilterError):
        base_url(url)


def test_entry_bundles_parsed_strictly() -> None:
    assert parse_bundle(b"\x00\x01a\x00\x00\x00\x02bc", 3, "b") == [b"a", b"", b"bc"]
    assert parse_bundle(b"\x00\x01a\x00\x01b", 1, "b") == [b"a"]  # a full tile's prefix
    for bad, count in ((b"\x00", 1), (b"\x00\x05abc", 1), (b"\x00\x01a", 2)):
        with pytest.raises(TileError):
            parse_bundle(bad, count, "b")


def test_exported_names_exist() -> None:
    for module in (follow_module, fetch_module, tilereader_module):
        for name in module.__all__:
            assert hasattr(module, name), (module.__name__, name)


# ---------------------------------------------------------------- https
@pytest.fixture
def https_node(log: Log, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The tiles over HTTPS (a self-signed certificate for 127.0.0.1) from a thread."""
    cert, key = certificate(tmp_path / "tls")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(log.tiles)))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/", cert
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_https_certificates_are_verified(log: Log, https_node: tuple[str, Path],
                                         tmp_path: Path) -> None:
    url, cert = https_node
    one_line(follow(url, "--key", log.pub, "--state", tmp_path / "s"), 1,
             "cannot fetch", "CERTIFICATE_VERIFY_FAILED")
    assert not (tmp_path / "s" / "checkpoint").exists()
    trusted = subprocess.run(
        [sys.executable, "-m", "netfilter.cli", "audit", "follow", url, "--key", str(log.pub),
         "--state", str(tmp_path / "s")], capture_output=True, text=True, cwd=ROOT,
        timeout=120, env={**os.environ, "SSL_CERT_FILE": str(cert)})
    ok(trusted, 0, 10)


def test_follow_across_tile_levels(log: Log, node: TileNode, tmp_path: Path) -> None:
    """Past 65,536 leaves a level-2 tile exists: the proof from 300 reads hashes from
    tiles of three levels, each checked up to the edge, in a handful of requests."""
    state = State(tmp_path / "state")
    key = load_public_key(log.pub)
    log.grow(290)
    assert run_follow(node.url, key, state).new_size == 300
    log.grow(70_000 - 300)
    grown = run_follow(node.url, key, state)
    assert (grown.old_size, grown.new_size) == (300, 70_000)
    assert grown.requests <= 8, grown.requests  # checkpoint, 3 edge tiles, a few more
    log.grow(1)
    again = run_follow(node.url, key, state, entries=True)
    assert (again.old_size, again.new_size, again.entries_checked) == (70_000, 70_001, 1)
    kept = (state.dir / "checkpoint").read_bytes()
    log.rewrite(keep=1000, count=69_100)  # 70,100: the same size range, another history
    with pytest.raises(FollowError, match="NOT CONSISTENT"):
        run_follow(node.url, key, state)
    assert (state.dir / "checkpoint").read_bytes() == kept
