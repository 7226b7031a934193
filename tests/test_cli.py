"""The `netfilter` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from netfilter.keys import load_public_key

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "lists" / "demo"


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netfilter.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


def _one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netfilter: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_authority_workflow(tmp_path: Path) -> None:
    result = run("keys", "generate", "--out", tmp_path / "keys" / "auth")
    assert result.returncode == 0, result.stderr
    key, pub = tmp_path / "keys" / "auth.key", tmp_path / "keys" / "auth.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and pub.exists()
    source = tmp_path / "src.csv"
    source.write_text("target,ref,category\nblocked.example,X-1,csam\n"
                      "http://partly.example/dir/,X-2,csam\n", encoding="utf-8")
    bundle = tmp_path / "out" / "l.nfl"
    result = run("list", "build", source, "--key", key, "--list-id", "authority-x",
                 "--version", "7", "--out", bundle, "--expires", "2099-01-01")
    assert result.returncode == 0, result.stderr
    assert "entries=2" in result.stdout
    result = run("list", "verify", bundle, "--trust", pub)
    assert result.returncode == 0, result.stderr
    key_id = load_public_key(pub).id
    for text in ("list=authority-x", "version=7", "entries=2", "expires=2099-01-01",
                 f"key={key_id}"):
        assert text in result.stdout
    info = run("list", "info", bundle)
    assert info.returncode == 0 and "signature NOT checked" in info.stdout
    assert "list_id: authority-x" in info.stdout
    check = run("check", "--list", bundle, "--trust", pub, "http://a.blocked.example/",
                "http://partly.example/dir/x", "http://partly.example/")
    assert check.stdout.splitlines() == [
        "BLOCK http://a.blocked.example/ list=authority-x ref=X-1",
        "BLOCK http://partly.example/dir/x list=authority-x ref=X-2",
        "ALLOW http://partly.example/",
    ]


def test_hmac_workflow(tmp_path: Path) -> None:
    run("keys", "generate", "--out", tmp_path / "a")
    (tmp_path / "list.key").write_text("a licensed operator's list key\n")
    (tmp_path / "s.yaml").write_text("entries: [{domain: blocked.example, ref: H-1, "
                                     "category: csam}]\n")
    bundle = tmp_path / "h.nfl"
    built = run("list", "build", tmp_path / "s.yaml", "--key", tmp_path / "a.key",
                "--list-id", "h", "--version", "1", "--out", bundle,
                "--hash", "hmac-sha256", "--hmac-key", tmp_path / "list.key")
    assert built.returncode == 0, built.stderr
    ok = run("check", "--list", bundle, "--trust", tmp_path / "a.pub", "--hmac-key",
             tmp_path / "list.key", "http://blocked.example/")
    assert ok.stdout.startswith("BLOCK"), ok.stderr
    _one_clear_line(run("check", "--list", bundle, "--trust", tmp_path / "a.pub",
                        "http://blocked.example/"), "configure hmac_key")


def test_check_demo_config_plain_json_explain() -> None:
    plain = run("check", "--config", "netfilter.demo.yaml", "http://sub.blocked.example/any",
                "http://cleared.blocked.example/", "https://www.clean.example/")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == [
        "BLOCK http://sub.blocked.example/any list=demo ref=DEMO-0001",
        "ALLOW http://cleared.blocked.example/ exception=APPEAL-2026-001 "
        "(lifts list=demo ref=DEMO-0001)",
        "ALLOW https://www.clean.example/",
    ]
    as_json = run("check", "--config", "netfilter.demo.yaml", "--json",
                  "http://partly.example/dir/p.html", "http://clean.example/")
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert records[0] == {"url": "http://partly.example/dir/p.html", "verdict": "block",
                          "list": "demo", "ref": "DEMO-0003", "category": "csam",
                          "kind": "url"}
    assert records[1]["verdict"] == "allow" and records[1]["list"] is None
    explained = run("check", "--config", "netfilter.demo.yaml", "--json", "--explain",
                    "HTTP://Partly.Example/dir/../dir/p.html#frag")
    record = json.loads(explained.stdout)
    assert record["canonical"] == "http://partly.example/dir/p.html"
    assert record["matched"] == "partly.example/dir/"
    assert record["expressions"][:2] == ["partly.example/", "partly.example/dir/p.html"]
    text = run("check", "--config", "netfilter.demo.yaml", "--explain",
               "http://www.clean.example/a/b")
    assert "canonical: http://www.clean.example/a/b" in text.stdout
    assert "tried:     www.clean.example/ clean.example/" in text.stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("check", "--config", "absent.yaml", "http://x.example/"), ("absent.yaml",
                                                                       "file not found")),
        (("check", "http://x.example/"), ("no lists",)),
        (("check", "--trust", "lists/demo/demo.pub", "http://x.example/"),
         ("--trust", "must follow a --list")),
        (("check", "--list", "lists/demo/demo.nfl", "http://x.example/"), ("no --trust",)),
        (("list", "verify", "lists/demo/demo.nfl", "--trust", "lists/demo/demo-source.yaml"),
         ("demo-source.yaml", "not a PEM public key")),
        (("list", "verify", "lists/demo/demo-source.yaml", "--trust", "lists/demo/demo.pub"),
         ("not a readable bundle",)),
        (("list", "build", "lists/demo/missing.yaml", "--key", "lists/demo/demo.key",
          "--list-id", "x", "--version", "1", "--out", "/tmp/never.nfl"),
         ("missing.yaml", "file not found")),
        (("list", "build", "lists/demo/demo-source.yaml", "--key", "lists/demo/demo.key",
          "--list-id", "x", "--version", "1", "--out", "/tmp/never.nfl", "--hash",
          "hmac-sha256"), ("--hmac-key",)),
        (("keys", "generate", "--out", "lists/demo/demo"), ("exists already",)),
    ],
)
def test_user_mistakes_are_one_line(args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    _one_clear_line(run(*args), *needles)


def test_invalid_url_is_reported_and_others_still_checked() -> None:
    result = run("check", "--config", "netfilter.demo.yaml", "mailto:x@y",
                 "http://blocked.example/")
    assert result.returncode == 1
    assert result.stdout.startswith("BLOCK http://blocked.example/")
    assert "mailto:x@y" in result.stderr and "Traceback" not in result.stderr


def test_demo_bundle_verifies_with_demo_key() -> None:
    result = run("list", "verify", DEMO / "demo.nfl", "--trust", DEMO / "demo.pub")
    assert result.returncode == 0, result.stderr
    assert "list=demo" in result.stdout


def test_usage_errors_exit_2() -> None:
    result = run("list", "build")
    assert result.returncode == 2 and "usage:" in result.stderr
