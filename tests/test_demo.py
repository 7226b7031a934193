"""`netfilter serve` with no config: the embedded demo, run as a user runs it, and every
command it prints run with the real tools (dig, curl, `netfilter audit verify`).

Nothing leaves loopback: the clean name's upstream is a local unbound
(`NETFILTER_DEMO_UPSTREAM`), or none at all; the proxy is only asked for blocked URLs,
which it answers without connecting anywhere.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netfilter import demo as demo_module
from tests.dns_support import Unbound
from tests.support import HOST, REPO, require_tools, wait_for

PORTS = {"dns": 5353, "proxy": 8080, "stoppage": 8081, "metrics": 9108, "dot": 8853,
         "doh": 8443}
READY_BOUND = 60.0  # seconds: imports, the mitmdump child, and the list load
STOP_BOUND = 20.0
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _port_free(port: int, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _require_demo_ports() -> None:
    """The demo's ports are fixed: skip, naming the port, when another program has one."""
    for part, port in PORTS.items():
        kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if part == "dns" else [])
        if not all(_port_free(port, kind) for kind in kinds):
            pytest.skip(f"{HOST} port {port} ({part}) is in use by another program; "
                        "the demo listens on fixed ports")


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without proxy variables (curl would follow them)."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in PROXY_VARS and k not in ("XDG_STATE_HOME", demo_module.UPSTREAM_ENV)}
    return {**env, **extra}


class DemoRun:
    """`python -m netfilter.cli serve` in `cwd`; its stdout (the instructions) apart."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.out_path, self.err_path = cwd / "demo.stdout", cwd / "demo.stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            # a session of its own: SIGINT goes to the group, as Ctrl-C in a terminal
            self.proc = subprocess.Popen([sys.executable, "-m", "netfilter.cli", "serve"],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         cwd=cwd, env=env, start_new_session=True)

    def output(self) -> str:
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    def logs(self) -> str:
        return f"stdout:\n{self.output()}\nstderr:\n" + self.err_path.read_text(
            encoding="utf-8", errors="replace")

    def wait_ready(self) -> None:
        done = "Ctrl-C stops the demo"
        if not wait_for(lambda: done in self.output() or self.proc.poll() is not None,
                        READY_BOUND) or done not in self.output():
            self.stop()
            pytest.fail(f"the demo did not get ready within {READY_BOUND} s\n{self.logs()}")

    def commands(self) -> dict[str, list[str]]:
        """The printed commands by what they show: dig-blocked, dig-clean, proxy, ..."""
        found: dict[str, list[str]] = {}
        for line in self.output().splitlines():
            if not line.startswith("  ") or line.lstrip().startswith("("):
                continue
            command, _, comment = line.strip().partition("    # ")
            words = shlex.split(command)
            key = {"dig": f"dig-{comment.split(':')[0]}", "curl": "proxy" if "-x" in words
                   else "metrics", "kdig": f"kdig-{comment.split(':')[0]}"}.get(words[0],
                                                                               "audit")
            found[key] = words
        return found

    def run(self, words: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*words, *extra], capture_output=True, text=True, cwd=self.cwd,
                              env=self.env, timeout=30, check=False)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """SIGTERM to serve (as systemd's KillMode=mixed), or SIGINT to its whole
        process group, the mitmdump child too (as Ctrl-C); then a bounded wait."""
        if self.proc.poll() is None:
            if sig == signal.SIGINT:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_BOUND)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_BOUND)
        return self.proc.returncode


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Unbound]:
    require_tools("unbound", why="the clean name's upstream in the demo test")
    (tmp_path / "unbound").mkdir()
    with Unbound(tmp_path / "unbound") as server:
        yield server


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tools("dig", "curl")
    _require_demo_ports()


def _start(cwd: Path, env: dict[str, str]) -> DemoRun:
    cwd.mkdir(parents=True, exist_ok=True)
    run = DemoRun(cwd, env)
    run.wait_ready()
    return run


def _check_blocked(run: DemoRun, cmds: dict[str, list[str]]) -> None:
    """Blocked names and URLs: answered locally, whatever the upstream."""
    dig = run.run(cmds["dig-blocked"], "+tries=1", "+time=3").stdout
    assert "status: NXDOMAIN" in dig and "EDE: 16" in dig and "DEMO-0001" in dig, dig
    if shutil.which("kdig"):  # DoT and DoH: the same answer
        for key in ("kdig-DoT", "kdig-DoH"):
            out = run.run(cmds[key], "+retry=0", "+timeout=3").stdout
            assert "status: NXDOMAIN" in out and "DEMO-0001" in out, out
    if "proxy" in cmds:
        page = run.run(cmds["proxy"], "--max-time", "20")
        assert page.stdout.startswith("HTTP/1.1 451"), page.stdout + page.stderr
        assert "DEMO-0003" in page.stdout
    else:
        assert "mitmproxy is not installed" in run.output()


def _check_log(run: DemoRun, cmds: dict[str, list[str]],
               sig: signal.Signals = signal.SIGTERM) -> None:
    """After `sig`: exit 0, every port bindable again, and the printed `audit verify`
    passes on a final checkpoint."""
    assert run.stop(sig) == 0, run.logs()
    for part, port in PORTS.items():  # its sockets are closed (its children's too)
        kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if part == "dns" else [])
        assert all(_port_free(port, kind) for kind in kinds), f"{part} port {port} still bound"
    verify = run.run(cmds["audit"])
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("OK") and "WARN" not in verify.stdout, verify.stdout


def test_demo_serves_everything_it_prints(tmp_path: Path, upstream: Unbound) -> None:
    run = _start(tmp_path / "work", _clean_env(
        **{demo_module.UPSTREAM_ENV: upstream.address}))
    try:
        cmds = run.commands()
        assert set(cmds) >= {"dig-blocked", "dig-clean", "metrics", "audit"}, run.output()
        assert cmds["audit"][-4:] == ["--log", "var/audit.sqlite", "--trust", "var/node.pub"]
        _check_blocked(run, cmds)
        clean = run.run(cmds["dig-clean"], "+tries=1", "+time=3").stdout
        assert "status: NOERROR" in clean and "192.0.2.11" in clean, clean
        metrics = run.run(cmds["metrics"])
        assert metrics.returncode == 0 and "netfilter_dns_" in metrics.stdout, metrics.stderr
    finally:
        run.stop()
    _check_log(run, cmds)
    state = tmp_path / "work" / "var"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert (state / "node.key").exists() and (state / "demo.yaml").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_demo_without_network_still_blocks(tmp_path: Path, sig: signal.Signals) -> None:
    """No upstream at all (as with no network): blocked names and URLs still answered,
    clean names SERVFAIL, and the output says so; state under $XDG_STATE_HOME. Stopped
    by SIGTERM or by SIGINT (Ctrl-C), it stops cleanly either way."""
    xdg = tmp_path / "xdg"
    run = _start(tmp_path / "work", _clean_env(
        XDG_STATE_HOME=str(xdg), **{demo_module.UPSTREAM_ENV: ""}))
    try:
        assert "no usable upstream" in run.output()
        cmds = run.commands()
        _check_blocked(run, cmds)
        clean = run.run(cmds["dig-clean"], "+tries=1", "+time=5").stdout
        assert "status: SERVFAIL" in clean, clean
    except BaseException:
        run.stop()
        raise
    _check_log(run, cmds, sig)
    assert cmds["audit"][-1] == str(xdg / "netfilter" / "node.pub")
    assert stat.S_IMODE((xdg / "netfilter").stat().st_mode) == 0o700
    assert not (tmp_path / "work" / "var").exists()


def test_upstreams_from_resolv_conf_never_the_demo_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    text = ("# comment\nsearch example\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n"
            "nameserver fe80::1%eth0\nnameserver not-an-address\noptions edns0\n")
    assert demo_module.resolv_conf_upstreams(text) == ["192.0.2.53:53", "[2001:db8::53]:53"]
    monkeypatch.setenv(demo_module.UPSTREAM_ENV,
                       "127.0.0.1:5353, 127.0.0.1, [::1]:5300")
    upstreams, source = demo_module._upstreams(["127.0.0.1:5353"])
    assert upstreams == ["127.0.0.1", "[::1]:5300"] and demo_module.UPSTREAM_ENV in source
    # a listener on port 53 of every address: a nameserver on this host would be itself
    assert demo_module._upstreams(["0.0.0.0:53"])[0] == ["127.0.0.1:5353", "[::1]:5300"]


def test_instructions_name_only_what_runs(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Without mitmproxy the proxy's line says so; `serve dns` shows no proxy line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(demo_module.UPSTREAM_ENV, "127.0.0.1:5300")
    built = demo_module.demo()
    assert built.config_path == tmp_path / "var" / "demo.yaml"
    no_proxy = demo_module.Demo(built.settings.model_copy(update={"proxy": None}),
                                built.config_path, built.upstreams, built.upstream_source)
    text = no_proxy.instructions()
    assert "mitmproxy is not installed" in text and "curl -i -x" not in text
    assert "127.0.0.1:5300" in text and "no usable upstream" not in text
    dns_only = built.instructions(["dns"])
    assert "dig @127.0.0.1 -p 5353 blocked.example" in dns_only
    assert "curl -i -x" not in dns_only and "mitmproxy" not in dns_only


def test_shipped_demo_data_is_the_authority_side_demo() -> None:
    """demo_data/ is a copy of lists/demo/ (what pip installs); they must not drift."""
    shipped = sorted(p.name for p in demo_module.DATA.iterdir())
    assert shipped == ["demo.nfl", "demo.pub", "local-allow.yaml", "local-block.yaml"]
    for name in shipped:
        assert (demo_module.DATA / name).read_bytes() == \
            (REPO / "lists" / "demo" / name).read_bytes(), name
