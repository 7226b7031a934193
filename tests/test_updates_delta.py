"""List updates through delta bundles: a node with version 1 in force asks whether the
full bundle changed (without its body), fetches `test.from-v1.delta.nfl`, applies it
and installs the authority's full version 2 through the same verification as a
download; with no delta, a delta from another base, a tampered or oversized delta, it
says so in one line and fetches the full bundle.

Real bundles and deltas from the project's builder (reserved names only), a directory
source and a real HTTPS mirror on 127.0.0.1 that counts requests and body bytes.
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import pytest

from netfilter.events import MemorySink
from netfilter.keys import PrivateKey, load_public_key
from netfilter.listdelta import build_delta
from netfilter.listfile import open_bundle
from netfilter.updates import STEPS
from netfilter.updates.delta import delta_location, lags
from netfilter.updates.install import stage_prefix
from tests.conftest import SOURCE, BuildBundle
from tests.support import HOST, REPO
from tests.test_updates import _KILLED, Node
from tests.test_updates_https import make_ca_and_server

# 3,000 entries more than SOURCE: big enough that a delta is smaller than the full
# bundle (a delta of a tiny list is not: both are tars padded to 10 KiB records).
V1 = SOURCE + "".join(f"  - {{domain: d{i}.example, ref: T-B{i}, category: csam}}\n"
                      for i in range(3000))
V2 = V1.replace("  - {url: \"http://whole.example/\", ref: T-8, category: csam}\n", "") + (
    "  - {domain: added.example, ref: T-20, category: csam}\n"
    "  - {url: \"http://fresh.test/x.html\", ref: T-21, category: csam}\n")
V3 = V2 + "  - {domain: third.example, ref: T-30, category: csam}\n"
OTHER_V1 = V1.replace("deep.sub.blocked.invalid", "elsewhere.invalid")
UPDATER = "netfilter.updates.updater"


@dataclass
class Release:
    """What the authority built for version 2: the full bundle and the delta from v1."""

    full: Path
    delta: Path


def _release(tmp_path: Path, base: Path, key: PrivateKey, pub: Path, *, text: str = V2,
             version: int = 2, name: str = "v2") -> Release:
    source = tmp_path / f"{name}.yaml"
    source.write_text(text, encoding="utf-8")
    full, delta = tmp_path / f"{name}.nfl", tmp_path / f"{name}.from-base.delta.nfl"
    bundle = open_bundle(base, [load_public_key(pub)])
    try:
        build_delta(source, bundle, full, delta, key=key, list_id="test", version=version)
    finally:
        bundle.close()
    return Release(full, delta)


def _flip(delta: bytes, member: str = "added.bin") -> bytes:
    """The delta with one bit of a data member's content changed."""
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(delta)) as tar:
        info = tar.getmember(member)
    assert info.size > 0
    data = bytearray(delta)
    data[info.offset_data + info.size // 2] ^= 1
    return bytes(data)


def _delta_events(sink: MemorySink) -> list[str]:
    return [e.detail or "" for e in sink.events if e.type == "list-loaded"]


def _lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == UPDATER and r.levelno == level]


# ------------------------------------------------------------ a directory source


class DirNode(Node):
    def publish_delta(self, delta: Path, base_version: int = 1) -> Path:
        where = Path(delta_location(str(self.published / "test.nfl"), base_version))
        shutil.copyfile(delta, where)
        return where

    def age_atime(self) -> int:
        """Set the published full bundle's access time two days back (its mtime, so its
        validators, unchanged); with relatime a read moves it again."""
        path = self.published / "test.nfl"
        st = path.stat()
        old = st.st_mtime_ns - 2 * 86400 * 10**9
        os.utime(path, ns=(old, st.st_mtime_ns))
        return old

    def atime(self) -> int:
        return (self.published / "test.nfl").stat().st_atime_ns


@pytest.fixture
def node(tmp_path: Path, authority: tuple[Path, Path], build: BuildBundle) -> DirNode:
    """v1 published and installed (the full bundle: nothing was in force)."""
    node = DirNode(tmp_path, authority[1])
    node.publish(build(V1, version=1, name="v1.nfl"))
    [first] = node.updater().run_once()
    assert (first.outcome, first.version) == ("installed", 1)
    return node


def test_a_directory_source_installs_from_the_delta(
        tmp_path: Path, node: DirNode, authority: tuple[Path, Path],
        authority_key: PrivateKey, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=UPDATER)
    release = _release(tmp_path, tmp_path / "v1.nfl", authority_key, authority[1])
    node.publish(release.full)
    node.publish_delta(release.delta)
    untouched = node.age_atime()
    sink = MemorySink()
    updater = node.updater(sink)
    [result] = updater.run_once()
    assert (result.outcome, result.version, result.previous) == ("installed", 2, 1)
    assert node.target.read_bytes() == release.full.read_bytes()  # the authority's file
    assert node.atime() == untouched  # the full bundle was not read, only stat'ed
    size = release.delta.stat().st_size
    [detail] = _delta_events(sink)
    assert f"(via delta from version 1, {size:,} bytes)" in detail
    assert updater.stats()["delta_applied"] == 1 and "delta_failed" not in updater.stats()
    assert any("came as a delta" in line for line in _lines(caplog, logging.INFO))
    print(f"\ndirectory source: delta {size} bytes, full bundle "
          f"{release.full.stat().st_size} bytes (not read)")

    # the full bundle's validators were recorded: the next check reads nothing
    before = node.target.stat()
    [again] = updater.run_once()
    assert (again.outcome, again.version, again.not_modified) == ("current", 2, True)
    after = node.target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert node.atime() == untouched
    assert not node.stages() and len(sink.events) == 1
    updater.close()


def test_a_delta_result_is_private_and_named_as_a_stage_until_placed(
        tmp_path: Path, node: DirNode, authority: tuple[Path, Path],
        authority_key: PrivateKey) -> None:
    """The bundle written from a delta is 0600 and named with the stage prefix until it
    is placed, so the clean-up after a kill (`clean_stages`) finds whatever is left."""
    release = _release(tmp_path, tmp_path / "v1.nfl", authority_key, authority[1])
    node.publish(release.full)
    node.publish_delta(release.delta)
    seen: dict[str, int] = {}

    def look(step: str) -> None:
        if step == "downloaded":  # the result written, not yet placed
            for path in node.target.parent.iterdir():
                if path != node.target:
                    seen[path.name] = path.stat().st_mode & 0o777

    updater = node.updater(step=look)
    [result] = updater.run_once()
    updater.close()
    assert (result.outcome, result.version) == ("installed", 2)
    assert seen, "nothing staged beside the list"
    assert all(name.startswith(stage_prefix(node.target)) for name in seen), seen
    assert set(seen.values()) == {0o600}, seen
    assert node.target.stat().st_mode & 0o777 == 0o644  # placed: readable, as bundles are


def test_no_delta_published_fetches_the_full_bundle(
        tmp_path: Path, node: DirNode, authority: tuple[Path, Path],
        authority_key: PrivateKey, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=UPDATER)
    release = _release(tmp_path, tmp_path / "v1.nfl", authority_key, authority[1])
    node.publish(release.full)
    untouched = node.age_atime()
    sink = MemorySink()
    updater = node.updater(sink)
    [result] = updater.run_once()
    assert (result.outcome, result.version) == ("installed", 2)
    assert node.target.read_bytes() == release.full.read_bytes()
    assert node.atime() != untouched  # read whole: the measure above measures
    assert "via delta" not in _delta_events(sink)[0]
    assert updater.stats()["delta_skipped"] == 1
    [line] = [m for m in _lines(caplog, logging.INFO) if "fetching the full" in m]
    assert "no delta from version 1; fetching the full bundle" in line
    assert not node.stages()
    updater.close()


def test_a_delta_larger_than_the_full_bundle_is_not_fetched(
        tmp_path: Path, authority: tuple[Path, Path], authority_key: PrivateKey,
        build: BuildBundle, caplog: pytest.LogCaptureFixture) -> None:
    """A small list: its delta (a padded tar too) is larger than its full bundle, so
    the full bundle is fetched, said at info level (no fault), and counted as skipped."""
    caplog.set_level(logging.INFO, logger=UPDATER)
    node = DirNode(tmp_path, authority[1])
    small = build(SOURCE, version=1)
    node.publish(small)
    node.updater().run_once()
    release = _release(tmp_path, small, authority_key, authority[1],
                       text=SOURCE + "  - {domain: more.example, ref: T-40, category: csam}\n")
    assert release.delta.stat().st_size > release.full.stat().st_size
    node.publish(release.full)
    node.publish_delta(release.delta)
    updater = node.updater()
    [result] = updater.run_once()
    assert (result.outcome, result.version) == ("installed", 2)
    assert node.target.read_bytes() == release.full.read_bytes()
    assert not _lines(caplog, logging.WARNING)
    [line] = [m for m in _lines(caplog, logging.INFO) if "fetching the full bundle" in m]
    assert "the delta from version 1 is larger than the full bundle" in line
    assert updater.stats()["delta_skipped"] == 1
    updater.close()


@pytest.mark.parametrize("case", ["other content", "other version"])
def test_a_delta_from_another_base_falls_back_to_the_full_bundle(
        tmp_path: Path, node: DirNode, build: BuildBundle, authority: tuple[Path, Path],
        authority_key: PrivateKey, caplog: pytest.LogCaptureFixture, case: str) -> None:
    """Published as from-v1, made from another version 1 (same list, other entries), or
    from version 2 (a mirror's mistake): the base does not match, the full bundle
    is fetched, and the list ends at the published version anyway."""
    caplog.set_level(logging.INFO, logger=UPDATER)
    if case == "other content":
        release = _release(tmp_path, build(OTHER_V1, version=1), authority_key, authority[1])
        expect, words = 2, "other digests than the delta's base"
    else:
        v2 = _release(tmp_path, tmp_path / "v1.nfl", authority_key, authority[1])
        release = _release(tmp_path, v2.full, authority_key, authority[1], text=V3,
                           version=3, name="v3")
        expect, words = 3, "applies to version 2 of list test, the base"
    node.publish(release.full)
    node.publish_delta(release.delta)  # at the from-v1 name
    sink = MemorySink()
    updater = node.updater(sink)
    [result] = updater.run_once()
    assert (result.outcome, result.version) == ("installed", expect)
    assert node.target.read_bytes() == release.full.read_bytes()
    assert "via delta" not in _delta_events(sink)[0]
    [line] = _lines(caplog, logging.WARNING)
    assert "the delta from version 1 is not used, fetching the full bundle" in line
    assert words in line
    assert updater.stats()["delta_failed"] == 1 and "delta_applied" not in updater.stats()
    assert not node.stages() and not list(node.target.parent.glob(".tmp-*"))
    updater.close()


@pytest.mark.parametrize("fault", ["flipped byte", "truncated", "not a delta"])
def test_a_tampered_delta_is_one_line_and_the_full_bundle_comes(
        tmp_path: Path, node: DirNode, authority: tuple[Path, Path],
        authority_key: PrivateKey, caplog: pytest.LogCaptureFixture, fault: str) -> None:
    caplog.set_level(logging.INFO, logger=UPDATER)
    release = _release(tmp_path, tmp_path / "v1.nfl", authority_key, authority[1])
    data = bytearray(release.delta.read_bytes())
    if fault == "flipped byte":
        data = bytearray(_flip(bytes(data)))
    elif fault == "truncated":
        del data[len(data) // 2:]
    else:
        data = bytearray(release.full.read_bytes())  # the full bundle under a delta's name
    node.publish(release.full)
    where = node.publish_delta(release.delta)
    where.write_bytes(bytes(data))
    sink = MemorySink()
    updater = node.updater(sink)
    [result] = updater.run_once()
    assert (result.outcome, result.version) == ("installed", 2)
    assert node.target.read_bytes() == release.full.read_bytes()
    [line] = _lines(caplog, logging.WARNING)
    assert "the delta from version 1 is not used" in line and str(where) in line
    assert updater.stats()["delta_failed"] == 1
    assert [e.type for e in sink.events] == ["list-loaded"]  # a delta failure is no refusal
    assert not node.stages() and not list(node.target.parent.glob(".tmp-*"))
    updater.close()


@pytest.mark.parametrize("delta_age", [7200, 0])
def test_a_delta_older_than_its_full_bundle_does_not_stop_the_next_check(
        tmp_path: Path, node: DirNode, authority: tuple[Path, Path],
        authority_key: PrivateKey, delta_age: int) -> None:
    """A mirror between two publications: the full bundle is version 3 already, the
    delta from version 1 beside it still leads to version 2. Version 2 comes from the
    delta; a delta two hours older than the full bundle is known for a lagging one,
    so the next check asks again and version 3 comes in full. A lagging delta as new
    as the full bundle cannot be told: the node stays on version 2 until the next
    publication (the residue of trusting the mirror's dates)."""
    v2 = _release(tmp_path, tmp_path / "v1.nfl", authority_key, authority[1])
    v3 = _release(tmp_path, v2.full, authority_key, authority[1], text=V3, version=3,
                  name="v3")
    node.publish(v3.full)
    where = node.publish_delta(v2.delta)
    st = where.stat()
    os.utime(where, (st.st_atime - delta_age, st.st_mtime - delta_age))
    updater = node.updater()
    [first] = updater.run_once()
    assert (first.outcome, first.version) == ("installed", 2)
    assert node.target.read_bytes() == v2.full.read_bytes()
    [second] = updater.run_once()
    if delta_age:
        assert (second.outcome, second.version) == ("installed", 3)
        assert node.target.read_bytes() == v3.full.read_bytes()
    else:
        assert (second.outcome, second.version, second.not_modified) == ("current", 2, True)
    updater.close()


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_of_a_delta_install_leaves_a_whole_list(
        tmp_path: Path, node: DirNode, authority: tuple[Path, Path],
        authority_key: PrivateKey, step: str) -> None:
    """`netfilter list update` killed with -9 at each step of an install from a delta:
    the bundle in place is the whole v1 or the whole v2, and the next run finishes."""
    release = _release(tmp_path, tmp_path / "v1.nfl", authority_key, authority[1])
    node.publish(release.full)
    node.publish_delta(release.delta)
    child = subprocess.Popen([sys.executable, "-c", _KILLED, str(node.config), step],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == step
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    expect_new = STEPS.index(step) >= STEPS.index("renamed")
    old = tmp_path / "v1.nfl"
    assert node.target.read_bytes() == (release.full if expect_new else old).read_bytes()
    updater = node.updater()
    [result] = updater.run_once()
    assert result.outcome == ("current" if expect_new else "installed"), result
    assert updater.stats().get("delta_applied", 0) == (0 if expect_new else 1)
    assert node.target.read_bytes() == release.full.read_bytes()
    assert not node.stages() and not list(node.target.parent.glob(".tmp-*"))
    updater.close()


def test_a_delta_result_goes_through_the_same_refusals(
        tmp_path: Path, node: DirNode, authority: tuple[Path, Path],
        authority_key: PrivateKey) -> None:
    """A delta to a version whose bundle is expired applies, and its result is refused
    by the installer exactly as the full bundle would be (no fall-back download)."""
    from datetime import UTC, datetime, timedelta

    from netfilter.listfile import build_bundle

    expired = tmp_path / "expired.nfl"
    (tmp_path / "v2.yaml").write_text(V2, encoding="utf-8")
    build_bundle(tmp_path / "v2.yaml", expired, key=authority_key, list_id="test",
                 version=2, expires=datetime.now(UTC) - timedelta(hours=1))
    base = open_bundle(tmp_path / "v1.nfl", [load_public_key(authority[1])])
    new = open_bundle(expired, [load_public_key(authority[1])], allow_expired=True)
    from netfilter.listdelta import build_delta_from_bundles

    try:
        build_delta_from_bundles(base, new, tmp_path / "e.nfl", tmp_path / "e.delta.nfl",
                                 key=authority_key)
    finally:
        base.close()
        new.close()
    node.publish(tmp_path / "e.nfl")
    node.publish_delta(tmp_path / "e.delta.nfl")
    untouched = node.age_atime()
    sink = MemorySink()
    updater = node.updater(sink)
    [result] = updater.run_once()
    assert result.outcome == "refused" and "expired" in result.reason
    assert sink.events[-1].type == "list-refused" and sink.events[-1].action == "expired"
    assert node.installed_version() == 1 and node.atime() == untouched
    assert updater.stats()["delta_applied"] == 1
    assert not node.stages()
    updater.close()


# ------------------------------------------------------------ an HTTPS mirror


@dataclass
class Mirror:
    """An authority's HTTPS mirror: GET and HEAD with ETag and Last-Modified, answers
    conditional requests; logs (method, path, status, body bytes sent) per request."""

    files: dict[str, bytes] = field(default_factory=dict)
    log: list[tuple[str, str, int, int]] = field(default_factory=list)
    port: int = 0
    modified: str = field(default_factory=lambda: formatdate(usegmt=True))

    def put(self, name: str, data: bytes) -> None:
        self.files[name] = data
        self.modified = formatdate(time.time(), usegmt=True)

    def url(self, path: str = "/") -> str:
        return f"https://{HOST}:{self.port}{path}"

    def take(self) -> list[tuple[str, str, int, int]]:
        out, self.log[:] = list(self.log), []
        return out


def _handler(mirror: Mirror) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, body: bool) -> None:
            data = mirror.files.get(self.path.lstrip("/"))
            sent = 0
            if data is None:
                status = 404
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
                status = 304 if self.headers.get("If-None-Match") == etag else 200
                self.send_response(status)
                self.send_header("ETag", etag)
                if status == 200:
                    self.send_header("Last-Modified", mirror.modified)
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if status == 200 and body:
                    self.wfile.write(data)
                    sent = len(data)
            mirror.log.append((self.command, self.path, status, sent))

        def do_GET(self) -> None:
            self.answer(body=True)

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def log_message(self, format: str, *args: object) -> None:
            return None

    return Handler


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[Mirror, Path]]:
    """(the mirror, its pinned CA file), serving on 127.0.0.1 over TLS."""
    ca, cert, key = make_ca_and_server(tmp_path / "tls")
    served = Mirror()
    server = http.server.ThreadingHTTPServer((HOST, 0), _handler(served))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    served.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, ca
    finally:
        server.shutdown()
        server.server_close()


FULL, DELTA = "/lists/test.nfl", "/lists/test.from-v1.delta.nfl"


def _https_node(tmp_path: Path, authority: tuple[Path, Path], v1: Path,
                mirror: tuple[Mirror, Path], **updates: object) -> tuple[Node, Mirror]:
    """A node whose source is the mirror, with `v1` installed from it."""
    served, ca = mirror
    node = Node(tmp_path, authority[1], source=served.url("/lists/"),
                updates={"ca": str(ca), **updates})
    served.put("lists/test.nfl", v1.read_bytes())
    [first] = node.updater().run_once()
    assert (first.outcome, first.version) == ("installed", 1)
    assert served.take() == [("GET", FULL, 200, len(served.files["lists/test.nfl"]))]
    return node, served


def test_an_https_source_installs_from_the_delta_without_the_full_body(
        tmp_path: Path, authority: tuple[Path, Path], authority_key: PrivateKey,
        build: BuildBundle, mirror: tuple[Mirror, Path]) -> None:
    node, served = _https_node(tmp_path, authority, build(V1, version=1, name="v1.nfl"),
                               mirror)
    release = _release(tmp_path, tmp_path / "v1.nfl", authority_key, authority[1])
    served.put("lists/test.nfl", release.full.read_bytes())
    served.put("lists/test.from-v1.delta.nfl", release.delta.read_bytes())
    sink = MemorySink()
    updater = node.updater(sink)
    [result] = updater.run_once()
    assert (result.outcome, result.version, result.previous) == ("installed", 2, 1)
    assert node.target.read_bytes() == release.full.read_bytes()
    size, full = release.delta.stat().st_size, release.full.stat().st_size
    log = served.take()
    assert log == [("HEAD", FULL, 200, 0), ("GET", DELTA, 200, size)]
    assert f"(via delta from version 1, {size:,} bytes)" in _delta_events(sink)[0]
    assert updater.stats()["delta_applied"] == 1

    [again] = updater.run_once()  # the full bundle's validators were recorded
    assert (again.outcome, again.version, again.not_modified) == ("current", 2, True)
    log_again = served.take()
    assert log_again == [("HEAD", FULL, 304, 0)]
    print(f"\nhttps source: check 1 {log} ({sum(r[3] for r in log)} body bytes; the full "
          f"bundle is {full}); check 2 {log_again}")
    assert not node.stages()
    updater.close()


def test_an_https_source_without_a_delta_sends_the_full_bundle(
        tmp_path: Path, authority: tuple[Path, Path], authority_key: PrivateKey,
        build: BuildBundle, mirror: tuple[Mirror, Path]) -> None:
    node, served = _https_node(tmp_path, authority, build(V1, version=1, name="v1.nfl"),
                               mirror)
    release = _release(tmp_path, tmp_path / "v1.nfl", authority_key, authority[1])
    served.put("lists/test.nfl", release.full.read_bytes())
    updater = node.updater()
    [result] = updater.run_once()
    assert (result.outcome, result.version) == ("installed", 2)
    assert node.target.read_bytes() == release.full.read_bytes()
    full = release.full.stat().st_size
    log = served.take()
    assert log == [("HEAD", FULL, 200, 0), ("GET", DELTA, 404, 0), ("GET", FULL, 200, full)]
    assert updater.stats()["delta_skipped"] == 1
    print(f"\nhttps source, no delta: {log}")
    [again] = updater.run_once()
    assert again.not_modified and served.take() == [("HEAD", FULL, 304, 0)]
    updater.close()


@pytest.mark.parametrize("fault", ["tampered", "oversized"])
def test_an_https_delta_that_fails_falls_back_to_the_full_bundle(
        tmp_path: Path, authority: tuple[Path, Path], authority_key: PrivateKey,
        build: BuildBundle, mirror: tuple[Mirror, Path], caplog: pytest.LogCaptureFixture,
        fault: str) -> None:
    """A hostile mirror: a delta with a changed byte, or one larger than the full
    bundle (refused from its Content-Length, before its body is read): one warning
    line, then the full bundle, version 2."""
    v1 = build(V1, version=1, name="v1.nfl")
    release = _release(tmp_path, v1, authority_key, authority[1])
    full = release.full.stat().st_size
    node, served = _https_node(tmp_path, authority, v1, mirror)
    served.put("lists/test.nfl", release.full.read_bytes())
    if fault == "tampered":
        served.put("lists/test.from-v1.delta.nfl", _flip(release.delta.read_bytes()))
        words = "SHA-256 does not match"
    else:
        served.put("lists/test.from-v1.delta.nfl", b"\0" * (full + 1))
        words = f"is larger than the full bundle ({full:,} bytes)"
    caplog.set_level(logging.INFO, logger=UPDATER)
    updater = node.updater()
    [result] = updater.run_once()
    assert (result.outcome, result.version) == ("installed", 2)
    assert node.target.read_bytes() == release.full.read_bytes()
    level, counter = ((logging.WARNING, "delta_failed") if fault == "tampered"
                      else (logging.INFO, "delta_skipped"))
    [line] = [m for m in _lines(caplog, level) if "fetching the full bundle" in m]
    assert words in line and DELTA in line, line
    assert [(m, p, s) for m, p, s, _ in served.take()] == [
        ("HEAD", FULL, 200), ("GET", DELTA, 200), ("GET", FULL, 200)]
    assert updater.stats()[counter] == 1
    assert not node.stages()
    updater.close()


def test_delta_location() -> None:
    assert delta_location("https://authority.example/l/test.nfl?k=1", 7) == (
        "https://authority.example/l/test.from-v7.delta.nfl?k=1")
    assert delta_location("/srv/lists/test.nfl", 1) == "/srv/lists/test.from-v1.delta.nfl"
    assert delta_location("https://authority.example/current", 2) == (
        "https://authority.example/current.from-v2.delta.nfl")


def test_lags() -> None:
    full = "Sat, 05 Dec 2026 08:00:00 GMT"
    assert lags("Sat, 05 Dec 2026 06:00:00 GMT", full)
    assert not lags("Sat, 05 Dec 2026 07:55:00 GMT", full)  # copied a little before it
    assert not lags("Sat, 05 Dec 2026 09:00:00 GMT", full)
    assert not lags(None, full) and not lags(full, None) and not lags("junk", full)
