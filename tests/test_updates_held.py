"""Update sanity checks: an update whose entry count moves too far, or that newly covers
a protected name, is held (not installed) until an operator confirms or rejects it.

Real bundles (reserved names only), a real state file, the real audit log and the real
`netfilter` entry point in child processes for restarts and decisions.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from netfilter.config import load_config
from netfilter.errors import NetfilterError
from netfilter.events import MemorySink
from netfilter.updates.held import confirm, held_path, held_versions, reject
from netfilter.updates.sanity import load_protected
from tests.conftest import BuildBundle
from tests.support import REPO, read_events
from tests.test_updates import Node

HEADER = """\
issuer: Test Authority
legal_basis: Test Act s. 1
contact: mailto:appeals@authority.test
entries:
"""

# Ten entries: +3 or -3 moves the count by 30 %, +1 by 10 %.
BASE = [f"  - {{domain: base{i}.example, ref: B-{i}, category: csam}}\n" for i in range(9)]
BASE.append('  - {url: "http://pages.example/dir/", ref: B-9, category: csam}\n')


def source(*extra: str, drop: int = 0) -> str:
    return HEADER + "".join(BASE[drop:]) + "".join(f"  - {e}\n" for e in extra)


def domain(name: str, ref: str = "N-1") -> str:
    return f"{{domain: {name}, ref: {ref}, category: csam}}"


def url(text: str, ref: str = "N-2") -> str:
    return f'{{url: "{text}", ref: {ref}, category: csam}}'


def make_node(tmp_path: Path, pub: Path, protected: list[Any] | None = None,
              **updates: Any) -> Node:
    if protected is not None:
        path = tmp_path / "protected.yaml"
        path.write_text(yaml.safe_dump(protected), encoding="utf-8")
        updates["protected_names"] = str(path)
    return Node(tmp_path, pub, audit=True, updates=updates)


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`netfilter ...` through the real entry point, in its own process."""
    return subprocess.run([sys.executable, "-m", "netfilter.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def events(node: Node, *types: str) -> list[dict[str, Any]]:
    return [e for e in read_events(node.dir / "audit.sqlite") if e["type"] in types]


def held_events(sink: MemorySink) -> list[tuple[str | None, int | None]]:
    return [(e.action, e.version) for e in sink.events if e.type == "list-held"]


# ------------------------------------------------------------ the count rule


@pytest.mark.parametrize(("first", "second"), [
    (source(), source(domain("n1.example", "N-1"), domain("n2.example", "N-2"),
                      domain("n3.example", "N-3"))),  # +30 %
    (source(), source(drop=3)),  # -30 %
])
def test_an_entry_count_moving_too_far_is_held(tmp_path: Path, authority: tuple[Path, Path],
                                               build: BuildBundle, first: str,
                                               second: str) -> None:
    node = make_node(tmp_path, authority[1])
    sink = MemorySink()
    updater = node.updater(sink)
    node.publish(build(first, version=1))  # a first install is never held by the count
    assert updater.run_once()[0].outcome == "installed"
    node.publish(build(second, version=2))
    [result] = updater.run_once()
    assert (result.outcome, result.version, result.held) == ("held", 1, 2)
    assert "HELD version 2" in result.line() and "entries 10 -> " in result.line()
    assert node.installed_version() == 1  # the old version stays in force
    assert held_events(sink) == [("entry-change", 2)]
    [held] = held_versions(updater.state)
    assert (held.list_id, held.version, held.trigger) == ("test", 2, "entry-change")
    assert held.path == held_path(node.target, 2)
    assert stat.S_IMODE(held.path.stat().st_mode) == 0o644
    # checked again: still held, nothing recorded again
    [again] = updater.run_once()
    assert (again.outcome, again.held, again.version) in {("held", 2, 1), ("current", 2, 1)}
    assert len(held_events(sink)) == 1
    updater.close()


def test_a_change_within_the_bound_installs(tmp_path: Path, authority: tuple[Path, Path],
                                            build: BuildBundle) -> None:
    node = make_node(tmp_path, authority[1], max_entry_change=0.2)
    updater = node.updater()
    node.publish(build(source(), version=1))
    updater.run_once()
    node.publish(build(source(domain("n1.example")), version=2))  # +10 %
    assert updater.run_once()[0].outcome == "installed"
    assert node.installed_version() == 2
    updater.close()


def test_a_newer_version_replaces_the_held_one(tmp_path: Path, authority: tuple[Path, Path],
                                               build: BuildBundle) -> None:
    node = make_node(tmp_path, authority[1])
    sink = MemorySink()
    updater = node.updater(sink)
    node.publish(build(source(), version=1))
    updater.run_once()
    node.publish(build(source(drop=5), version=2))
    assert updater.run_once()[0].held == 2
    node.publish(build(source(drop=4), version=3))
    assert updater.run_once()[0].held == 3
    assert held_events(sink) == [("entry-change", 2), ("entry-change", 3)]
    assert not held_path(node.target, 2).exists() and held_path(node.target, 3).exists()
    # and a sane version installs and drops the held one
    node.publish(build(source(domain("n1.example")), version=4))
    [result] = updater.run_once()
    assert (result.outcome, result.version, result.held) == ("installed", 4, None)
    assert held_versions(updater.state) == [] and not held_path(node.target, 3).exists()
    updater.close()


# ------------------------------------------------------------ protected names


@pytest.mark.parametrize(("protected", "entry", "how"), [
    ("safe.example", domain("safe.example"), "blocked by domain entry N-1"),
    ("www.parent.example", domain("parent.example"), "blocked by domain entry N-1"),
    ("shop.example", url("http://shop.example/one/page.html"), "in the host index"),
    ("a.shop.example", url("http://shop.example/one/page.html"), "in the host index"),
])
def test_a_protected_name_newly_covered_is_held(tmp_path: Path, authority: tuple[Path, Path],
                                                build: BuildBundle, protected: str, entry: str,
                                                how: str) -> None:
    node = make_node(tmp_path, authority[1], [protected, "unrelated.example"])
    sink = MemorySink()
    updater = node.updater(sink)
    node.publish(build(source(), version=1))
    assert updater.run_once()[0].outcome == "installed"
    node.publish(build(source(entry, drop=1), version=2))  # the same count
    [result] = updater.run_once()
    assert (result.outcome, result.held) == ("held", 2)
    assert f"{protected} {how}" in result.reason
    assert "unrelated" not in result.reason
    assert held_events(sink) == [("protected-name", 2)]
    assert node.installed_version() == 1
    updater.close()


def test_a_name_already_covered_is_not_news_and_a_first_install_is_checked(
        tmp_path: Path, authority: tuple[Path, Path], build: BuildBundle) -> None:
    """The protected rule applies to a first install too (nothing in force covers
    anything); once an operator confirmed the entry, it no longer holds a version."""
    node = make_node(tmp_path, authority[1], ["base0.example"])
    sink = MemorySink()
    updater = node.updater(sink)
    node.publish(build(source(), version=1))
    [first] = updater.run_once()
    assert (first.outcome, first.version, first.held) == ("held", None, 1)
    assert not node.target.exists()
    assert "confirmed by carol" in confirm(updater, "test", 1, "carol")
    assert node.installed_version() == 1
    node.publish(build(source(domain("n1.example")), version=2))
    assert updater.run_once()[0].outcome == "installed"
    assert [e.type for e in sink.events] == ["list-held", "list-confirmed", "list-loaded"]
    updater.close()


def test_protected_name_files_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("- WWW.Example.\n- {name: private.example, private: true}\n",
                    encoding="utf-8")
    names = load_protected(good)
    assert [(p.name, p.label) for p in names] == [
        ("www.example", "www.example"), ("private.example", "protected[1]")]
    assert "private.example" not in repr(names)
    for text, reason in [("a: b\n", "expected a list"), ("- 7\n", r"\[0\]: expected a host"),
                         ("- ok.example\n- {name: x.example, secret: 1}\n", r"\[1\]: unknown"),
                         ("- {name: x.example, private: maybe}\n", "true or false")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(NetfilterError, match=reason):
            load_protected(bad)


def test_a_broken_protected_file_fails_the_update_in_one_line(
        tmp_path: Path, authority: tuple[Path, Path], build: BuildBundle) -> None:
    node = make_node(tmp_path, authority[1], ["ok.example"])
    (tmp_path / "protected.yaml").write_text("- {name: [1]}\n", encoding="utf-8")
    node.publish(build(source(), version=1))
    done = cli("list", "update", "--config", node.config)
    assert done.returncode == 1
    assert "protected.yaml: [0]: expected a host name" in done.stdout
    assert "Traceback" not in done.stderr
    assert not node.target.exists()


# ------------------------------------------------------------ the CLI, restarts, privacy


def test_held_across_restarts_then_confirmed_by_the_cli(
        tmp_path: Path, authority: tuple[Path, Path], build: BuildBundle) -> None:
    node = make_node(tmp_path, authority[1])
    node.publish(build(source(), version=1))
    assert cli("list", "update", "--config", node.config).returncode == 0
    assert cli("list", "held", "--config", node.config).stdout == "no version is held\n"
    node.publish(build(source(drop=4), version=2))
    for _ in range(2):  # a new process each time: held once, still held, one event
        done = cli("list", "update", "--config", node.config)
        assert done.returncode == 5, done.stderr
        assert "HELD" in done.stdout and "version 1" in done.stdout
    assert [e["action"] for e in events(node, "list-held")] == ["entry-change"]
    shown = cli("list", "held", "--config", node.config)
    assert shown.returncode == 0
    assert shown.stdout.startswith("test version 2: held since ")
    assert "entry-change: entries 10 -> 6 (-40%" in shown.stdout

    wrong = cli("list", "confirm", "test", "3", "--config", node.config)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "not held: the held version of list test is 2" in wrong.stderr + wrong.stdout

    done = cli("list", "confirm", "test", "2", "--config", node.config,
               "--operator", "alice")
    assert done.returncode == 0, done.stderr
    assert "confirmed by alice, installed version 2 (was 1)" in done.stdout
    assert node.installed_version() == 2
    [event] = events(node, "list-confirmed")
    assert (event["list"], event["version"], event["action"]) == ("test", 2, "confirm")
    assert "confirmed by alice" in event["detail"]
    assert cli("list", "held", "--config", node.config).stdout == "no version is held\n"
    assert not held_path(node.target, 2).exists()
    again = cli("list", "update", "--config", node.config)
    assert again.returncode == 0 and "up to date, version 2" in again.stdout


def test_rejected_by_the_cli_and_never_installed(tmp_path: Path,
                                                 authority: tuple[Path, Path],
                                                 build: BuildBundle) -> None:
    node = make_node(tmp_path, authority[1])
    node.publish(build(source(), version=1))
    cli("list", "update", "--config", node.config)
    node.publish(build(source(drop=4), version=2))
    assert cli("list", "update", "--config", node.config).returncode == 5
    done = cli("list", "reject", "test", "2", "--config", node.config, "--operator", "bob")
    assert done.returncode == 0, done.stderr
    assert "version 2 rejected by bob; version 1 stays in force" in done.stdout
    [event] = events(node, "list-rejected")
    assert (event["version"], event["action"]) == (2, "reject")
    assert "rejected by bob" in event["detail"]
    # the same version from the source: refused quietly, one line, no event
    node.publish(build(source(drop=4), version=2))  # republished, another digest even
    count = len(read_events(node.dir / "audit.sqlite"))
    after = cli("list", "update", "--config", node.config)
    assert after.returncode == 0, after.stdout
    assert "version 2 was rejected by bob" in after.stdout
    assert node.installed_version() == 1
    assert len(read_events(node.dir / "audit.sqlite")) == count
    assert not held_path(node.target, 2).exists()
    # a rejected version cannot be confirmed afterwards
    late = cli("list", "confirm", "test", "2", "--config", node.config)
    assert late.returncode == 1 and "no version of this list is held" in late.stderr


def test_a_private_name_is_never_in_plain_text(tmp_path: Path, authority: tuple[Path, Path],
                                               build: BuildBundle) -> None:
    secret = "www.secret-partner.example"
    node = make_node(tmp_path, authority[1], ["public.example",
                                              {"name": secret, "private": True}])
    node.publish(build(source(), version=1))
    cli("list", "update", "--config", node.config)
    node.publish(build(source(domain("secret-partner.example"), drop=1), version=2))
    done = cli("list", "update", "--config", node.config)
    assert done.returncode == 5
    shown = cli("list", "held", "--config", node.config)
    rejected = cli("list", "reject", "test", "2", "--config", node.config)
    text = "".join(p.stdout + p.stderr for p in (done, shown, rejected))
    text += (node.dir / "audit.sqlite").read_bytes().decode("latin-1")
    assert "protected[1] blocked by domain entry N-1" in done.stdout
    assert "secret-partner" not in text
    [event] = events(node, "list-held")
    assert "protected[1]" in event["detail"] and "secret" not in event["detail"]


def test_confirming_below_the_version_in_force_is_refused(
        tmp_path: Path, authority: tuple[Path, Path], build: BuildBundle) -> None:
    node = make_node(tmp_path, authority[1])
    updater = node.updater()
    node.publish(build(source(), version=1))
    updater.run_once()
    node.publish(build(source(drop=4), version=2))
    assert updater.run_once()[0].held == 2
    # version 3 arrives by hand (installed outside the updater) and the record follows
    node.target.write_bytes(build(source(), version=3).read_bytes())
    assert updater.run_once()[0].version == 3
    with pytest.raises(NetfilterError, match="lower than version 3 in force"):
        confirm(updater, "test", 2, "dave")
    assert node.installed_version() == 3
    assert "rejected by dave" in reject(updater, "test", 2, "dave")
    updater.close()


def test_a_keyed_list_is_checked_with_its_list_key(tmp_path: Path,
                                                   authority: tuple[Path, Path],
                                                   build: BuildBundle) -> None:
    key = tmp_path / "list.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    node = make_node(tmp_path, authority[1], ["www.keyed.example"])
    node.data["lists"][0]["hmac_key"] = str(key)
    node.config.write_text(yaml.safe_dump(node.data), encoding="utf-8")
    node.settings = load_config(node.config)
    updater = node.updater()
    keyed = {"hash_name": "hmac-sha256", "hmac_key": b"k" * 32}
    node.publish(build(source(), version=1, **keyed))
    assert updater.run_once()[0].outcome == "installed"
    node.publish(build(source(domain("keyed.example"), drop=1), version=2, **keyed))
    [result] = updater.run_once()
    assert (result.outcome, result.held) == ("held", 2)
    assert "www.keyed.example blocked by domain entry N-1" in result.reason
    updater.close()


def test_a_version_in_force_without_a_host_index_hides_nothing(
        tmp_path: Path, authority: tuple[Path, Path], build: BuildBundle) -> None:
    """Without a host index every host "may" carry URL entries: that is no cover."""
    node = make_node(tmp_path, authority[1], ["fresh.example"])
    updater = node.updater()
    node.publish(build(source(), version=1, host_index=False))
    assert updater.run_once()[0].outcome == "installed"
    node.publish(build(source(domain("fresh.example"), drop=1), version=2, host_index=False))
    [result] = updater.run_once()
    assert (result.outcome, result.held) == ("held", 2)
    updater.close()
