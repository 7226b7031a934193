"""Configuration: the design's keys load; every mistake is one line naming key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from netfilter.config import load_config, parse_hostport
from netfilter.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

FULL = """\
node: {id: gw-01, key: var/node.key}
lists:
  - path: lists/demo/demo.nfl
    trust: [lists/demo/demo.pub]
    action: stoppage
    hmac_key: null
    source: null
local: {block: null, allow: null}
dns:
  listen: ["127.0.0.1:5353", "[::1]:5353"]
  upstreams: ["127.0.0.1:53", "127.0.0.2"]
  timeout: 2.0
  ede: 16
  block_ttl: 300
  stoppage_ipv4: 127.0.0.1
  stoppage_ipv6: "::1"
proxy: {listen: 127.0.0.1:8080, intercept: selective}
stoppage: {listen: 127.0.0.1:8081, default_language: en}
audit: {path: var/audit.sqlite, client: pseudonym, retention_days: 90, checkpoint_interval: 60}
metrics: {listen: 127.0.0.1:9108}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "netfilter.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_design_example_loads(tmp_path: Path) -> None:
    settings = load_config(_write(tmp_path, FULL))
    assert settings.node.id == "gw-01"
    assert settings.dns is not None and settings.dns.ede == 16
    assert settings.dns.listen == ["127.0.0.1:5353", "[::1]:5353"]
    assert settings.proxy is not None and settings.proxy.intercept == "selective"
    assert settings.audit is not None and settings.audit.client == "pseudonym"
    assert settings.resolve(settings.lists[0].path) == tmp_path / "lists/demo/demo.nfl"
    assert settings.resolve(Path("/abs/x")) == Path("/abs/x")


def test_parts_run_only_when_present(tmp_path: Path) -> None:
    settings = load_config(_write(tmp_path, "dns:\n"))
    assert settings.dns is not None and settings.dns.timeout == 2.0
    assert settings.proxy is None and settings.stoppage is None and settings.lists == []


def test_demo_config_loads() -> None:
    settings = load_config(ROOT / "netfilter.demo.yaml")
    assert settings.lists[0].trust == [Path("lists/demo/demo.pub")]


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        ("dns: {timeout: 0}", "dns.timeout", "greater than 0"),
        ("dns: {timout: 1}", "dns.timout", "unknown key"),
        ("dns: {ede: 3}", "dns.ede", "16"),
        ("dns: {listen: ['localhost:53']}", "dns.listen[0]", "not an IP address"),
        ("dns: {upstreams: ['127.0.0.1:99999']}", "dns.upstreams[0]", "port must be"),
        ("proxy: {intercept: sometimes}", "proxy.intercept", "'none', 'selective' or 'all'"),
        ("lists: [{path: a.nfl}]", "lists[0].trust", "Field required"),
        ("lists: [{path: a.nfl, trust: []}]", "lists[0].trust", "at least 1"),
        ("audit: {client: everything}", "audit.client", "pseudonym"),
        ("node: {id: 'bad id'}", "node.id", "pattern"),
        ("surprise: 1", "surprise", "unknown key"),
        ("- a\n- b", "netfilter.yaml", "expected a mapping"),
        ("dns: [1", "netfilter.yaml:2", "not valid YAML"),
    ],
)
def test_mistakes_are_one_line(tmp_path: Path, text: str, where: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    message = str(info.value)
    assert where in message and reason in message, message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="absent.yaml: file not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:53", ("127.0.0.1", 53)), ("[::1]:5353", ("::1", 5353)),
     ("10.0.0.1", ("10.0.0.1", 53))],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, default_port=53) == expected


@pytest.mark.parametrize("text", ["127.0.0.1:", "[::1", "host:53", "1.2.3.4:0", "[::1]x"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text)[1:-1].replace("[", r"\[")):
        parse_hostport(text)
