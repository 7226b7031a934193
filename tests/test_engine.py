"""The engine: verdicts, events, atomic reload that never drops the lists in force."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from netfilter.config import load_config
from netfilter.engine import Action, Answer, Engine
from netfilter.errors import BundleError
from netfilter.events import JsonLinesSink, MemorySink
from tests.conftest import BuildBundle

CHANGED = """\
issuer: Test Authority
entries:
  - {domain: newly.example, ref: N-1, category: csam}
"""


def _config(tmp_path: Path, bundle: Path, pub: Path, extra: str = "") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(bundle, tmp_path / "in-force.nfl")
    path = tmp_path / "netfilter.yaml"
    path.write_text(f"node: {{id: test-node}}\nlists:\n  - path: in-force.nfl\n"
                    f"    trust: [{pub}]\n    action: nxdomain\n{extra}", encoding="utf-8")
    return path


def test_verdicts_and_block_events(build: BuildBundle, authority: tuple[Path, Path],
                                   tmp_path: Path) -> None:
    sink = MemorySink()
    engine = Engine(load_config(_config(tmp_path, build(), authority[1],
                                        "audit: {client: truncated}\n")), sink)
    assert [e.type for e in sink.events] == ["list-loaded"]
    verdict = engine.check_url("http://partly.example/dir/x", client="192.0.2.55",
                               detail="GET")
    assert verdict.blocked and verdict.action is Action.BLOCK
    assert verdict.answer is Answer.NXDOMAIN
    assert verdict.match is not None and verdict.match.ref == "T-2"
    assert verdict.transparency is not None and verdict.transparency.issuer == "Test Authority"
    event = sink.events[-1]
    assert (event.type, event.node, event.frontend, event.list, event.ref, event.client,
            event.detail) == ("block", "test-node", "proxy", "test", "T-2", "192.0.2.0/24",
                              "GET")
    assert "partly" not in event.to_json()  # no blocked URL in the event
    clean = engine.check_url("http://clean.example/")
    assert not clean.blocked and clean.match is None
    assert engine.check_host("sub.blocked.example", frontend="dns").blocked
    assert sink.events[-1].frontend == "dns"
    assert not engine.check_host("partly.example").blocked
    assert engine.host_has_url_entries("partly.example")
    assert len(sink.events) == 3  # clean checks record nothing


def test_override_is_recorded(build: BuildBundle, authority: tuple[Path, Path],
                              tmp_path: Path) -> None:
    allow = tmp_path / "allow.yaml"
    allow.write_text("- {domain: ok.blocked.example, ref: APPEAL-9, category: appeal}\n",
                     encoding="utf-8")
    sink = MemorySink()
    engine = Engine(load_config(_config(tmp_path, build(), authority[1],
                                        f"local: {{allow: {allow}}}\n")), sink)
    verdict = engine.check_url("http://ok.blocked.example/")
    assert not verdict.blocked and verdict.match is not None
    assert verdict.match.allowed_by == "APPEAL-9"
    event = sink.events[-1]
    assert (event.type, event.ref, event.action, event.detail) == (
        "override", "T-1", "allow", "exception=APPEAL-9")


def test_reload_swaps_and_refusal_keeps_old_lists(build: BuildBundle,
                                                  authority: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    sink = MemorySink()
    config = _config(tmp_path, build(version=2), authority[1])
    engine = Engine(load_config(config), sink)
    in_force = tmp_path / "in-force.nfl"

    shutil.copy(build(CHANGED, version=3), in_force)
    assert engine.reload()
    assert engine.check_host("newly.example").blocked
    assert not engine.check_host("blocked.example").blocked

    damaged = build(version=4)
    with tarfile.open(damaged) as tar:
        offset = tar.getmember("digests.bin").offset_data
    data = bytearray(damaged.read_bytes())
    data[offset + 5] ^= 0xFF
    in_force.write_bytes(bytes(data))
    assert not engine.reload()
    assert engine.check_host("newly.example").blocked  # version 3 still in force
    assert sink.events[-2].type == "list-refused"

    shutil.copy(build(version=1), in_force)  # rollback
    assert not engine.reload()
    assert "rollback refused" in (sink.events[-1].detail or "")
    assert engine.lists.versions() == {"test": 3}


def test_refused_at_start_raises(authority: tuple[Path, Path], tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.nfl"
    bogus.write_bytes(b"not a bundle")
    with pytest.raises(BundleError, match="not a readable bundle"):
        Engine(load_config(_config(tmp_path, bogus, authority[1])))


def test_json_lines_sink(build: BuildBundle, authority: tuple[Path, Path],
                         tmp_path: Path) -> None:
    sink = JsonLinesSink(tmp_path / "var" / "events.jsonl")
    engine = Engine(load_config(_config(tmp_path, build(), authority[1])), sink)
    engine.check_url("http://blocked.example/", client="2001:db8::1")
    sink.close()
    lines = [json.loads(line) for line in sink.path.read_text().splitlines()]
    assert [line["type"] for line in lines] == ["list-loaded", "block"]
    assert lines[1]["client"].startswith("p:")  # pseudonym by default
    assert "2001:db8" not in sink.path.read_text()


def test_host_cache_follows_reload(build: BuildBundle, authority: tuple[Path, Path],
                                   tmp_path: Path) -> None:
    """Cached host verdicts still record every block, and die with the lists."""
    sink = MemorySink()
    engine = Engine(load_config(_config(tmp_path, build(version=1), authority[1])), sink)
    for _ in range(3):
        assert engine.check_host("a.blocked.example").blocked
        assert not engine.check_host("newly.example").blocked
    assert [e.type for e in sink.events].count("block") == 3
    # The resolver's fast path reads the cache directly: None means "matches nothing".
    assert engine.host_cache["newly.example"] is None
    assert engine.host_cache["a.blocked.example"] is not None
    shutil.copy(build(CHANGED, version=2), tmp_path / "in-force.nfl")
    assert engine.reload()
    assert "newly.example" not in engine.host_cache  # a new cache with the new lists
    assert engine.check_host("newly.example").blocked
    assert engine.host_cache["newly.example"] is not None
    assert not engine.check_host("a.blocked.example").blocked


def test_targets_are_recorded_only_when_the_operator_says_so(
        build: BuildBundle, authority: tuple[Path, Path], tmp_path: Path) -> None:
    bundle = build()
    quiet, loud = MemorySink(), MemorySink()
    Engine(load_config(_config(tmp_path / "a", bundle, authority[1])),
           quiet).check_url("http://partly.example/dir/x")
    Engine(load_config(_config(tmp_path / "b", bundle, authority[1],
                               "audit: {record_targets: true}\n")),
           loud).check_url("http://partly.example/dir/x")
    assert "partly" not in "".join(e.to_json() for e in quiet.events)
    assert loud.events[0].type == "config-changed"
    assert loud.events[-1].target == "http://partly.example/dir/x"
