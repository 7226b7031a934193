"""`netfilter --log-format json`: one JSON object per line (time, level, logger,
message) for log collectors, from `netfilter serve` and its mitmdump child alike;
text stays the default."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from netfilter.logsetup import ENV, JsonFormatter, chosen_format
from tests.dns_support import DEMO_LIST, DEMO_PUB, HOST, Netfilter, free_port, wait_for
from tests.test_reload import Serve, _curl


class JsonNetfilter(Netfilter):
    """`netfilter --log-format json serve dns --config FILE`."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "netfilter.cli", "--log-format", "json", "serve", "dns",
                "--config", str(self.conf)]


def _records(text: str) -> list[dict[str, Any]]:
    """Every line as JSON (a line that is not fails the test, naming it)."""
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"not a JSON line: {line!r}\nthe whole log:\n{text}")
    return records


def test_serve_dns_logs_json_lines(tmp_path: Path) -> None:
    server = JsonNetfilter(tmp_path, upstreams=[f"{HOST}:9"])
    with server:
        server.conf.write_text(yaml.safe_dump({**server.config, "bogus": 1}),
                               encoding="utf-8")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "config reload refused" in server.log(), 20), server.log()
    records = _records(server.log())
    assert records and all({"time", "level", "logger", "message"} <= r.keys()
                           for r in records)
    assert any(r["level"] == "INFO" and "serving dns" in r["message"] for r in records)
    refused = [r for r in records if "config reload refused" in r["message"]]
    assert len(refused) == 1 and refused[0]["level"] == "ERROR"
    assert "bogus: unknown key" in refused[0]["message"]


def test_serve_proxy_child_logs_json_too(tmp_path: Path) -> None:
    if importlib.util.find_spec("mitmproxy") is None:
        pytest.skip("mitmproxy not installed (pip install 'netfilter[proxy]')")
    port = free_port()
    config = tmp_path / "netfilter.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"id": "json-test", "key": str(tmp_path / "node.key")},
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
        "proxy": {"listen": f"{HOST}:{port}", "intercept": "none",
                  "allowed_destinations": ["127.0.0.0/8"]},
    }), encoding="utf-8")
    os.environ[ENV] = "json"  # the way a unit file would set it; Serve passes it on
    try:
        serve = Serve(tmp_path, config)
    finally:
        del os.environ[ENV]
    try:
        serve.wait_until(lambda: "serving proxy" in serve.log(), pause=0.1)
        assert _curl(port, "http://partly.example/dir/p.html") == "451"
    finally:
        serve.stop()
    records = _records(serve.log())
    assert any("entries in force" in r["message"] for r in records)  # the child's line
    assert any(r["logger"] == "netfilter.serve" for r in records)


def test_a_refused_start_is_one_json_line(tmp_path: Path) -> None:
    config = tmp_path / "netfilter.yaml"
    config.write_text("dns:\n  listen: [127.0.0.1:0]\n  bogus: 1\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "netfilter.cli", "--log-format", "json",
                           "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    (record,) = _records(done.stderr)
    assert record["level"] == "ERROR" and "dns.bogus: unknown key" in record["message"]


def test_json_formatter_keeps_a_record_on_one_line() -> None:
    try:
        raise ValueError("two\nlines")
    except ValueError:
        record = logging.LogRecord("netfilter.x", logging.ERROR, __file__, 1,
                                   "failed: %s", ("why",), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed: why" and entry["level"] == "ERROR"
    assert "ValueError: two\nlines" in entry["exception"]


def test_format_from_the_option_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert chosen_format(None) == "text"
    monkeypatch.setenv(ENV, "json")
    assert chosen_format(None) == "json"
    assert chosen_format("text") == "text"
