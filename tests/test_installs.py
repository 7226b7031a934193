"""Each install runs what it installs: `netfilter` (core) and `netfilter[dns]` serve DNS
and check URLs without mitmproxy; `serve proxy` there is one line naming the extra.

Two installs, each driving the real `netfilter` command in a subprocess:
- `blocked`: this environment, with a finder on `sys.meta_path` that makes importing
  mitmproxy and uvloop fail as in an install without them (a fault injected into the
  dependencies, not a stand-in for our code): the core install.
- `venv`: a fresh virtual environment with `pip install .[dns]` from a copy of this
  tree and dnspython, no mitmproxy (slow: ~20 s with a warm index). Skipped only when
  no package index can be reached.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import venv
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
import yaml

from tests.support import DEMO_LIST, DEMO_PUB, HOST, REPO, free_port

EXTRA_LINE = ("netfilter: error: proxy: needs mitmproxy, which is not installed: "
              "pip install 'netfilter[proxy]'")

# Runs before netfilter's own code: an import of these fails as if not installed.
BLOCKER = """
import importlib.abc, sys
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("mitmproxy", "uvloop"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
from netfilter.cli import main
sys.argv[0] = "netfilter"
sys.exit(main())
"""

Command = Callable[..., list[str]]
NETWORK_TROUBLE = ("Could not find a version", "No matching distribution", "connection",
                   "Connection", "Temporary failure in name resolution", "Network is unreachable")


def _fresh_venv(where: Path) -> Path:
    """A venv with netfilter[dns] from a copy of this tree (so no build files land in
    it) and dnspython; the path of its `netfilter` script."""
    source = where / "src-copy"
    for name in ("pyproject.toml", "setup.py", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns(
        "*.so", "*.egg-info", "__pycache__"))
    env_dir = where / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          f"{source}[dns]", "dnspython"],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        output = pip.stdout + pip.stderr
        if any(trouble in output for trouble in NETWORK_TROUBLE):
            pytest.skip(f"no package index reachable: {output.strip().splitlines()[-1]}")
        pytest.fail(f"pip install .[dns] failed:\n{output}")
    check = subprocess.run([str(python), "-c", "import mitmproxy"], capture_output=True)
    assert check.returncode != 0, "mitmproxy is installed in the fresh venv"
    return env_dir / "bin" / "netfilter"


@pytest.fixture(scope="module", params=["blocked", pytest.param("venv", marks=pytest.mark.slow)])
def netfilter(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Command]:
    """The argv of a `netfilter` command in the chosen install."""
    if request.param == "blocked":
        yield lambda *args: [sys.executable, "-c", BLOCKER, *map(str, args)]
        return
    script = _fresh_venv(tmp_path_factory.mktemp("install"))
    yield lambda *args: [str(script), *map(str, args)]


def _config(tmp_path: Path, dns_port: int) -> Path:
    """dns and proxy sections both: `serve dns` must not need what proxy needs."""
    config = tmp_path / "netfilter.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"id": "install-test.example", "key": str(tmp_path / "node.key")},
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)], "action": "nxdomain"}],
        "audit": {"path": str(tmp_path / "audit.sqlite"), "client": "none"},
        "dns": {"listen": [f"{HOST}:{dns_port}"], "upstreams": [f"{HOST}:9"]},
        "proxy": {"listen": f"{HOST}:{free_port()}", "intercept": "none"},
    }), encoding="utf-8")
    return config


def _answer(port: int, name: str, bound: float = 30.0) -> dns.message.Message:
    """The server's answer, once it answers (bounded)."""
    deadline = time.monotonic() + bound
    while True:
        try:
            return dns.query.udp(dns.message.make_query(name, "A"), HOST, port=port,
                                 timeout=0.5)
        except (dns.exception.Timeout, OSError):
            if time.monotonic() > deadline:
                raise


def test_serve_dns_answers_and_stops_cleanly(netfilter: Command, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(netfilter("serve", "dns", "--config", _config(tmp_path, port)),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        answer = _answer(port, "sub.blocked.example.")
        assert answer.rcode() == dns.rcode.NXDOMAIN, answer
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
    output = log.read_text(encoding="utf-8", errors="replace")
    assert status == 0, output
    assert "Traceback" not in output and "mitmproxy" not in output, output


@pytest.mark.parametrize("parts", [["proxy"], []], ids=["serve proxy", "serve"])
def test_serve_proxy_names_the_extra(netfilter: Command, tmp_path: Path,
                                     parts: list[str]) -> None:
    result = subprocess.run(netfilter("serve", *parts, "--config",
                                      _config(tmp_path, free_port())),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [EXTRA_LINE], result.stderr
    assert not (tmp_path / "audit.sqlite").exists()  # nothing was started


def test_check_works(netfilter: Command, tmp_path: Path) -> None:
    result = subprocess.run(netfilter("check", "--config", _config(tmp_path, free_port()),
                                      "http://blocked.example/", "http://clean.example/"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["BLOCK http://blocked.example/ list=demo ref=DEMO-0001",
                                          "ALLOW http://clean.example/"]
