"""examples/systemd: the units verify, carry the hardening a resolver deserves, and start
what their example configs configure."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netfilter.config import load_config

HERE = Path(__file__).resolve().parent.parent / "examples" / "systemd"
INSTALLED = "/opt/netfilter/venv/bin/netfilter"
CONFIG = "/etc/netfilter/netfilter.yaml"
STATE = Path("/var/lib/netfilter")
# unit -> (its example config, the parts it serves)
UNITS = {
    "netfilter-resolver.service": ("resolver.yaml", ["dns", "stoppage"]),
    "netfilter-gateway.service": ("gateway.yaml", ["dns", "proxy", "stoppage"]),
}
# what the issue names, and what goes with it, for every unit
HARDENING = {
    "Type": "exec",
    "User": "netfilter",
    "Group": "netfilter",
    "StateDirectory": "netfilter",
    "StateDirectoryMode": "0700",
    "ConfigurationDirectory": "netfilter",
    "UMask": "0077",
    "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "Restart": "on-failure",
}
UNIT_IDS = list(UNITS)


def directives(unit: str) -> dict[str, list[str]]:
    """Every `Key=value` of the unit file, values in order (keys may repeat)."""
    found: dict[str, list[str]] = {}
    for line in (HERE / unit).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{unit}: not a Key=value line: {line!r}"
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.parametrize("unit", UNIT_IDS)
def test_hardening_directives(unit: str) -> None:
    found = directives(unit)
    for key, value in HARDENING.items():
        assert found.get(key) == [value], f"{unit}: {key}={value} expected, got {found.get(key)}"
    # the one capability, and nothing that could hand out another
    assert "DynamicUser" not in found
    stop = found["TimeoutStopSec"][0]
    assert stop.endswith("s") and int(stop[:-1]) >= 30, "time for the last checkpoint"


def test_write_execute_memory_denied_where_it_can_be() -> None:
    """The resolver maps no W+X memory; mitmdump's pyOpenSSL callbacks do (the gateway
    unit says so instead of breaking HTTPS interception)."""
    assert directives("netfilter-resolver.service")["MemoryDenyWriteExecute"] == ["yes"]
    gateway = directives("netfilter-gateway.service")
    assert "MemoryDenyWriteExecute" not in gateway
    assert "No MemoryDenyWriteExecute=" in (HERE / "netfilter-gateway.service").read_text()
    # the proxy child is stopped by `netfilter serve`, not by systemd at the same time
    assert gateway["KillMode"] == ["mixed"]


@pytest.mark.parametrize("unit", UNIT_IDS)
def test_exec_start_serves_what_the_example_config_configures(unit: str) -> None:
    config_name, parts = UNITS[unit]
    argv = shlex.split(directives(unit)["ExecStart"][0])
    assert argv == [INSTALLED, "serve", *parts, "--config", CONFIG]
    settings = load_config(HERE / config_name)  # structure only: the paths are a host's
    for part in parts:
        assert getattr(settings, part) is not None, f"{config_name} has no {part} section"


@pytest.mark.parametrize("config_name", sorted({c for c, _ in UNITS.values()}))
def test_example_config_keeps_state_in_the_state_directory(config_name: str) -> None:
    """ProtectSystem=strict leaves only StateDirectory= (and a private /tmp) writable:
    every file the service writes must be under it, every file it reads under /etc."""
    settings = load_config(HERE / config_name)
    assert settings.audit is not None
    written = [settings.node.key, settings.audit.path]
    written += [settings.audit.tiles] if settings.audit.tiles is not None else []
    if settings.proxy is not None:
        assert settings.proxy.confdir is not None, "mitmproxy needs a writable confdir"
        written.append(settings.proxy.confdir)
    for path in written:
        assert path.is_absolute() and path.is_relative_to(STATE), path
    for item in settings.lists:
        for path in (item.path, *item.trust):
            assert path.is_relative_to("/etc/netfilter"), path


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    return tool


def _testable_copy(unit: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's netfilter: `verify` checks
    that the binary exists, and /opt/netfilter is the production layout."""
    here = Path(sys.executable).with_name("netfilter")
    assert here.exists(), here
    text = (HERE / unit).read_text()
    assert text.count(INSTALLED) == 1
    copy = tmp_path / unit
    copy.write_text(text.replace(INSTALLED, str(here)))
    return copy


@pytest.mark.parametrize("unit", UNIT_IDS)
def test_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    tool = _analyze()
    run = subprocess.run([tool, "verify", str(_testable_copy(unit, tmp_path))],
                         capture_output=True, text=True, timeout=60)
    ours = [line for line in run.stderr.splitlines() if unit in line]
    assert run.returncode == 0 and not ours, run.stderr


@pytest.mark.parametrize("unit", UNIT_IDS)
def test_systemd_analyze_security(unit: str, tmp_path: Path) -> None:
    tool = _analyze()
    run = subprocess.run([tool, "security", "--offline=true", "--no-pager",
                          str(_testable_copy(unit, tmp_path))],
                         capture_output=True, text=True, timeout=60)
    if "--offline" in run.stderr and run.returncode != 0:
        pytest.skip(f"this systemd-analyze has no offline security review: {run.stderr}")
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\S+)", run.stdout)
    assert found, run.stdout + run.stderr
    score = float(found.group(1))
    # systemd 252 rates both 1.6-1.7 "OK" (0 is perfect, 10 is no sandbox at all)
    print(f"{unit}: exposure {score} {found.group(2)}")
    assert score < 5.0, run.stdout
