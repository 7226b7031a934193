"""A real Squid (Debian `squid`) for tests and benchmarks, on a loopback port, with a
generated config in a directory of its own (cache, logs, pid, shared memory names).

No network beyond loopback: the test names resolve through Squid's `hosts_file`
(`*.example`, `*.test` -> 127.0.0.1) and `dns_nameservers 127.0.0.1`, where nothing
answers. Started as root, Squid runs as `proxy` (it refuses to run as root and drops
its capabilities): its directory is then made the `proxy` user's, and the helper runs
under Debian's /usr/bin/python3 (same 3.11 as the venv) with the checkout's src and the
venv's site-packages on PYTHONPATH, since the venv's interpreter may live where
`proxy` cannot reach (a pyenv under /root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support import HOST, REPO, ChildProcess, free_port, listening

__all__ = ["HELPER", "NAMES", "Squid", "helper_command", "require_squid", "squid_directory"]

SQUID = shutil.which("squid") or "/usr/sbin/squid"
HELPER = REPO / "addons" / "netfilter_squid.py"
NAMES = ("partly.example", "blocked.example", "www.mixed.example", "clean.test",
         "clean.example")
SYSTEM_PYTHON = "/usr/bin/python3"


def _as_root() -> bool:
    return os.geteuid() == 0


def require_squid() -> None:
    """Skip with the reason when Squid (or, as root, a matching system Python) is missing."""
    if not os.path.exists(SQUID):
        pytest.skip("squid not installed (Debian: apt-get install squid; "
                    "scripts/system-deps.sh)")
    if _as_root():
        try:
            pwd.getpwnam("proxy")
        except KeyError:
            pytest.skip("no `proxy` user for Squid to run as")
        version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, check=False).stdout.strip()
        if version != str(sys.version_info[:2]):
            pytest.skip(f"{SYSTEM_PYTHON} is {version or 'missing'}, the venv is "
                        f"{sys.version_info[:2]}: Squid's helper could not load the venv")
        # Squid runs its helper as `proxy`, which must reach this checkout and the
        # venv (a checkout below a 0700 directory, as `mktemp -d` makes, it cannot)
        reach = subprocess.run(["runuser", "-u", "proxy", "--", SYSTEM_PYTHON, "-c",
                                "import netfilter.engine"], env=helper_environment(),
                               capture_output=True, text=True, check=False, timeout=60)
        if reach.returncode != 0:
            pytest.skip("the `proxy` user Squid runs its helper as cannot import netfilter "
                        f"from {REPO} (a parent directory closed to others?)")


def helper_environment() -> dict[str, str]:
    """What Squid's children need to import netfilter from this checkout."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *site.getsitepackages()])
    return env


def helper_command(config: Path) -> str:
    """The external_acl_type program and arguments for `config`."""
    python = SYSTEM_PYTHON if _as_root() else sys.executable
    return f"{python} {HELPER} --config {config}"


def squid_directory() -> Path:
    """A directory for one Squid and its helper's files (netfilter config, audit log),
    that `proxy` can reach: not below the root-only pytest base directory."""
    directory = Path(tempfile.mkdtemp(prefix="netfilter-squid-"))
    directory.chmod(0o755)
    return directory


class Squid(ChildProcess):
    """`squid -N` with `directives` (http_access and the rest) added to a base config
    that keeps everything in `directory` and on loopback."""

    name = "squid"
    start_bound = 30.0
    stop_bound = 15.0

    def __init__(self, directory: Path, directives: Sequence[str], *,
                 port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.log_path = self.directory / "squid.out"
        self.service = f"nf{os.getpid()}x{self.port}"  # shared memory segment names
        self.proc = None
        hosts = self.directory / "hosts"
        hosts.write_text(f"{HOST} {' '.join(NAMES)}\n", encoding="ascii")
        d = self.directory
        base = [
            f"http_port {HOST}:{self.port}",
            "visible_hostname netfilter-test.invalid",
            f"pid_filename {d}/squid.pid",
            f"cache_log {d}/cache.log",
            f"access_log stdio:{d}/access.log",
            f"coredump_dir {d}",
            "cache deny all",
            "cache_mem 8 MB",
            "netdb_filename none",
            "pinger_enable off",
            f"hosts_file {hosts}",
            "dns_nameservers 127.0.0.1",
            "shutdown_lifetime 0 seconds",
            "forwarded_for delete",
        ]
        if _as_root():
            base.append("cache_effective_user proxy")
        self.config = d / "squid.conf"
        self.config.write_text("\n".join([*base, *directives, ""]), encoding="utf-8")

    def own(self) -> None:
        """Everything in the directory to the user Squid and its helpers run as."""
        if _as_root():
            for path in [self.directory, *self.directory.rglob("*")]:
                shutil.chown(path, "proxy", "proxy")

    def start(self) -> Squid:
        self.own()
        self.popen([SQUID, "-N", "-n", self.service, "-f", str(self.config)],
                   env=helper_environment(), cwd=self.directory, new_session=True)
        self.wait_until(lambda: listening(self.port))
        return self

    def cache_log(self) -> str:
        path = self.directory / "cache.log"
        return path.read_text("utf-8", "replace") if path.exists() else ""

    def access_log(self) -> str:
        path = self.directory / "access.log"
        return path.read_text("utf-8", "replace") if path.exists() else ""

    def close(self) -> None:
        self.stop()
        for name in os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []:
            if name.startswith(f"{self.service}-"):
                (Path("/dev/shm") / name).unlink(missing_ok=True)
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"
