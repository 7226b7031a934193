"""examples/systemd: the units verify, carry the hardening a resolver deserves, start what
their example configs configure, and `netfilter serve` stays inside their sandbox."""

from __future__ import annotations

import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rrset
import pytest
import yaml

from netfilter.config import load_config
from tests.support import (
    DEMO_LIST,
    DEMO_PUB,
    free_port,
    listening,
    read_events,
    require_tools,
    wait_for,
)

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
    "RestartPreventExitStatus": "2",  # a config mistake is not retried
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
    assert "DynamicUser" not in found  # a dedicated user owns the state across restarts
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


# -- `netfilter serve` inside what the units allow, watched with strace -------------------
# Without systemd as PID 1 the sandbox cannot be applied here, so the test runs each
# unit's parts under strace, drives them (queries, a block, the stop page, the proxy
# over plain HTTP and intercepted HTTPS, SIGHUP, SIGTERM) and holds every system call
# to what the unit permits: SystemCallFilter=@system-service, RestrictAddressFamilies,
# MemoryDenyWriteExecute where set, and ProtectSystem=strict (writes only in the state
# directory and the private /tmp). It does not check the user and capability settings.

WRITING = {"mkdir", "mkdirat", "rename", "renameat", "renameat2", "unlink", "unlinkat",
           "link", "linkat", "symlink", "symlinkat", "chmod", "fchmodat", "truncate"}
CALL = re.compile(r"^(\d+)\s+([a-z_0-9]+)\((.*)$")


def _syscall_group(tool: str, group: str) -> set[str]:
    """The system calls in a `SystemCallFilter=` group, nested groups expanded."""
    text = subprocess.run([tool, "syscall-filter"], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if line[0].isspace():
            groups[current].append(item)
        else:
            current = item
            groups[current] = []

    def expand(name: str) -> set[str]:
        return set().union(*(expand(x) if x.startswith("@") else {x} for x in groups[name]))

    return expand(group)


class _Upstream:
    """A UDP resolver on loopback answering every A query with 192.0.2.10."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A",
                                                    "192.0.2.10"))
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


def _sandbox_config(tmp_path: Path, parts: list[str], upstream: int) -> tuple[Path, dict[str, int]]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    ports = {part: free_port() for part in ("dns", "proxy", "stoppage", "metrics")}
    config: dict[str, Any] = {
        "node": {"id": "sandbox", "key": str(state / "node.key")},
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
        "dns": {"listen": [f"127.0.0.1:{ports['dns']}"],
                "upstreams": [f"127.0.0.1:{upstream}"]},
        "stoppage": {"listen": f"127.0.0.1:{ports['stoppage']}"},
        "audit": {"path": str(state / "audit.sqlite"), "tiles": str(state / "tiles"),
                  "checkpoint_interval": 1},
        "metrics": {"listen": f"127.0.0.1:{ports['metrics']}"},
    }
    if "proxy" in parts:
        config["proxy"] = {"listen": f"127.0.0.1:{ports['proxy']}", "intercept": "selective",
                           "confdir": str(state / "mitmproxy")}
    path = tmp_path / "netfilter.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, ports


def _drive(parts: list[str], ports: dict[str, int]) -> None:
    """What a node sees in service: a block, clean names (the C relay's path too), the
    stop page, and with the proxy a plain and an intercepted HTTPS block."""
    for name in ("blocked.example", "clean.example", "clean.example", "clean.example"):
        dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=ports["dns"],
                      timeout=5)
    dns.query.tcp(dns.message.make_query("blocked.example", "A"), "127.0.0.1",
                  port=ports["dns"], timeout=5)
    page = http.client.HTTPConnection("127.0.0.1", ports["stoppage"], timeout=10)
    page.request("GET", "/")
    assert page.getresponse().status == 451
    if "proxy" not in parts:
        return
    plain = http.client.HTTPConnection("127.0.0.1", ports["proxy"], timeout=20)
    plain.request("GET", "http://partly.example/dir/x")
    assert plain.getresponse().status == 451
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    tls = http.client.HTTPSConnection("127.0.0.1", ports["proxy"], timeout=20,
                                      context=context)
    tls.set_tunnel("partly.example", 443)
    tls.request("GET", "/dir/x")
    assert tls.getresponse().status == 451


def _violations(trace: str, allowed: set[str], writable: list[Path], cwd: Path,
                deny_write_execute: bool) -> list[str]:
    found: list[str] = []
    for line in trace.splitlines():
        match = CALL.match(line)
        if match is None:
            continue
        _, name, rest = match.groups()
        if name not in allowed:
            found.append(f"system call outside @system-service: {line}")
        if name in ("socket", "socketpair"):
            family = rest.split(",", 1)[0]
            if family not in ("AF_INET", "AF_INET6", "AF_UNIX"):
                found.append(f"address family not allowed: {line}")
        if deny_write_execute and (
                (name == "mmap" and "PROT_WRITE" in rest and "PROT_EXEC" in rest)
                or (name in ("mprotect", "pkey_mprotect") and "PROT_EXEC" in rest)):
            found.append(f"W+X memory (MemoryDenyWriteExecute): {line}")
        opened = name in ("open", "openat", "openat2", "creat") and re.search(
            r"O_WRONLY|O_RDWR|O_CREAT", rest)
        if not (opened or name in WRITING) or re.search(r"= -1 ", rest):
            continue
        if "O_TMPFILE" in rest:
            continue  # a bundle's copy beside it: EROFS there, then TMPDIR (listfile)
        for quoted in re.findall(r'"([^"]*)"', rest):
            path = cwd / quoted  # absolute paths stay as they are
            if "/__pycache__/" in quoted or quoted.startswith(("/dev/", "/proc/")):
                continue  # CPython ignores a .pyc it cannot write; API file systems
            if not any(path.is_relative_to(w) for w in writable):
                found.append(f"write outside the state directory and /tmp: {line}")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("unit", UNIT_IDS)
def test_serve_stays_inside_the_units_sandbox(unit: str, tmp_path: Path) -> None:
    require_tools("strace", why="the sandbox check watches system calls with it")
    tool = _analyze()
    _, parts = UNITS[unit]
    if "proxy" in parts:
        pytest.importorskip("mitmproxy", reason="the gateway needs netfilter[proxy]")
    sandbox = directives(unit)
    tmp_path = tmp_path.resolve()  # as the traced paths are
    upstream = _Upstream()
    config, ports = _sandbox_config(tmp_path, parts, upstream.port)
    (tmp_path / "tmp").mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    trace_path, log_path = tmp_path / "trace", tmp_path / "serve.log"
    netfilter = str(Path(sys.executable).with_name("netfilter"))
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    with open(log_path, "wb") as log:
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-s", "256", "-o", str(trace_path),
                                   netfilter, "serve", *parts, "--config", str(config)],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd,
                                  env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not all(listening(ports[p]) for p in parts if p != "dns"):
            assert tracer.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        _drive(parts, ports)
        main = int(trace_path.read_text().split(None, 1)[0])  # strace's first line
        audit = tmp_path / "state" / "audit.sqlite"

        def loads() -> int:
            return sum(e["type"] == "list-loaded" for e in read_events(audit))

        # mitmdump's addon has its own engine, and so has each DNS worker past the first
        # (dns.workers by default: one process per core)
        engines = (2 if "proxy" in parts else 1) + len(os.sched_getaffinity(0)) - 1
        assert wait_for(lambda: loads() == engines, 10)
        os.kill(main, signal.SIGHUP)  # ExecReload
        assert wait_for(lambda: loads() == 2 * engines, 10), "SIGHUP reloaded the lists"
        os.kill(main, signal.SIGTERM)  # systemctl stop (KillMode=mixed: the main only)
        assert tracer.wait(int(sandbox["TimeoutStopSec"][0][:-1])) == 0, log_path.read_text()
    finally:
        if tracer.poll() is None:  # strace and what it traces
            os.killpg(tracer.pid, signal.SIGKILL)
            tracer.wait()
        upstream.close()
    output = log_path.read_text()
    assert "netfilter: serving" in output and "dns: stopped" in output, output
    problems = _violations(trace_path.read_text(), _syscall_group(tool, "@system-service"),
                           [tmp_path / "state", tmp_path / "tmp"], cwd,
                           sandbox.get("MemoryDenyWriteExecute") == ["yes"])
    assert not problems, "\n".join(dict.fromkeys(problems))
