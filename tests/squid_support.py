"""A real Squid (Debian `squid`) for tests and benchmarks, on a loopback port, with a
generated config in a directory of its own (cache, logs, pid, shared memory names),
and what its external ACL helper runs from.

No network beyond loopback: the test names resolve through Squid's `hosts_file`
(`*.example`, `*.test` -> 127.0.0.1) and `dns_nameservers 127.0.0.1`, where nothing
answers. Started as root, Squid runs as `proxy` (it refuses to run as root and drops
its capabilities), and so does its helper. `proxy` may not reach the checkout (CI
clones below a `mktemp -d`, mode 0700) nor the venv's interpreter (a pyenv under
/root), so the helper runs from a `HelperRuntime`: a world-readable tree under a fresh
/tmp directory with the checkout's `netfilter` package (its .so files included), the
installed distributions it needs (the closure of its requirements) and the list files
its config names, run by Debian's /usr/bin/python3 (the same 3.11 ABI as the venv's
cp311 wheels). Files are hard links where the file system allows (copies otherwise,
and whenever a file is not readable by others): nothing outside the tree the test
made changes its permissions.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from netfilter.audit.log import load_node_key
from tests.proxy_support import Curl, Origin, write_config
from tests.support import HOST, REPO, ChildProcess, free_port, listening

__all__ = ["NAMES", "HelperRuntime", "NetfilterServe", "Rig", "Squid", "clean_environment",
           "helper_runtime", "require_squid", "set_listen", "squid_directory"]

SQUID = shutil.which("squid") or "/usr/sbin/squid"
HELPER = Path("addons") / "netfilter_squid.py"
NAMES = ("partly.example", "blocked.example", "www.mixed.example", "clean.test",
         "clean.example")
SYSTEM_PYTHON = "/usr/bin/python3"
PROJECT = "netfilter"


def _as_root() -> bool:
    return os.geteuid() == 0


def require_squid() -> None:
    """Skip, saying why, when Squid or (as root) the `proxy` user it runs as is missing:
    nothing else skips; anything else missing is a failure."""
    if not os.path.exists(SQUID):
        pytest.skip("squid not installed (Debian: apt-get install squid; "
                    "scripts/system-deps.sh)")
    if _as_root():
        try:
            pwd.getpwnam("proxy")
        except KeyError:
            pytest.skip("no `proxy` user for Squid to run as")


def squid_directory() -> Path:
    """A directory for one Squid and its helper's files (netfilter config, audit log),
    that `proxy` can reach: not below the root-only pytest base directory."""
    directory = Path(tempfile.mkdtemp(prefix="netfilter-squid-"))
    directory.chmod(0o755)
    return directory


def clean_environment() -> dict[str, str]:
    """This environment without proxy settings (curl, wrk and Squid's children talk to
    loopback only)."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


# ---------------------------------------------------------------- the helper's tree


def _distributions(name: str) -> list[importlib.metadata.Distribution]:
    """`name`'s installed runtime requirements, transitively (extras not asked for are
    left out; markers evaluated for this interpreter)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(importlib.metadata.requires(name) or [])
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = canonicalize_name(req.name)
        if key in seen:
            continue
        dist = importlib.metadata.distribution(req.name)
        seen[key] = dist
        todo.extend(dist.requires or [])
    return list(seen.values())


def _top_level(dist: importlib.metadata.Distribution) -> set[str]:
    """The names a distribution puts directly in site-packages (packages, modules,
    extension modules, its .libs and .dist-info directories)."""
    return {Path(str(f)).parts[0] for f in dist.files or []
            if not str(f).startswith("..") and not str(f).endswith(".pth")}


def _place(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` when that keeps it readable by others,
    else as a copy with mode 0644."""
    info = source.stat()
    if not source.is_symlink() and info.st_mode & stat.S_IROTH:
        with contextlib.suppress(OSError):
            os.link(source, target)
            return
    shutil.copyfile(source, target)
    target.chmod(0o644)


def _place_tree(source: Path, target: Path) -> None:
    """`source` (a file or a directory tree) at `target`: directories 0755, files by
    `_place`."""
    if not source.is_dir():
        _place(source, target)
        return
    for top, _dirs, files in os.walk(source, followlinks=True):
        here = target / Path(top).relative_to(source)
        here.mkdir(exist_ok=True)
        here.chmod(0o755)
        for name in files:
            _place(Path(top) / name, here / name)


@dataclass(frozen=True)
class HelperRuntime:
    """A world-readable tree the `proxy` user runs the Squid helper from."""

    root: Path

    @property
    def python(self) -> str:
        """As root, Debian's interpreter (the venv's may be unreachable); else ours."""
        return SYSTEM_PYTHON if _as_root() else sys.executable

    def environment(self) -> dict[str, str]:
        env = clean_environment()
        env["PYTHONPATH"] = os.pathsep.join([str(self.root / "src"),
                                             str(self.root / "site-packages")])
        env["PYTHONNOUSERSITE"] = "1"
        return env

    def command(self, config: Path) -> str:
        """The external_acl_type program and arguments for `config` (`-S`: only this
        tree and the standard library, not the system's dist-packages)."""
        return f"{self.python} -S {self.root / HELPER} --config {config}"

    def config(self, directory: Path) -> Path:
        """`write_config(directory)` with the list files it names taken from this tree,
        and its node key made now: helpers started together would each try to create
        it, and all but one fail (netfilter.audit.log.load_node_key is not race-free)."""
        path = write_config(directory)
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
        load_node_key(Path(settings["node"]["key"]))
        path.write_text(yaml.safe_dump(self._repoint(settings), sort_keys=False),
                        encoding="utf-8")
        return path

    def _repoint(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._repoint(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._repoint(v) for v in value]
        if isinstance(value, str) and value.startswith(f"{REPO}/"):
            source = Path(value)
            target = self.root / "repo" / source.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            for parent in [target.parent, *target.parent.relative_to(self.root).parents]:
                (self.root / parent).chmod(0o755)
            if not target.exists():
                _place(source, target)
            return str(target)
        return value


def _build(root: Path) -> HelperRuntime:
    root.chmod(0o755)
    for sub in ("src", "site-packages", "addons"):
        (root / sub).mkdir(mode=0o755)
        (root / sub).chmod(0o755)
    _place_tree(REPO / "src" / PROJECT, root / "src" / PROJECT)
    _place(REPO / HELPER, root / HELPER)
    for dist in _distributions(PROJECT):
        base = Path(str(dist.locate_file("")))
        for name in _top_level(dist):
            if (base / name).exists() and not (root / "site-packages" / name).exists():
                _place_tree(base / name, root / "site-packages" / name)
    return HelperRuntime(root)


def _check(runtime: HelperRuntime) -> None:
    """The helper's imports, as the user Squid runs it as: a failure says why here
    rather than as Squid's `BH` answers later."""
    if _as_root():
        version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, check=False).stdout.strip()
        if version != str(sys.version_info[:2]):
            pytest.fail(f"{SYSTEM_PYTHON} is {version or 'missing'}, the venv is "
                        f"{sys.version_info[:2]}: Squid's helper could not load the venv's "
                        "wheels (Debian 12's python3 is 3.11)")
    user = ["runuser", "-u", "proxy", "--"] if _as_root() else []
    done = subprocess.run([*user, runtime.python, "-S", "-c",
                           "import netfilter.squid.helper, netfilter.node, numpy, yaml"],
                          env=runtime.environment(), capture_output=True, text=True,
                          check=False, timeout=120, cwd="/")
    if done.returncode:
        pytest.fail(f"the Squid helper's tree {runtime.root} does not import as "
                    f"{'proxy' if user else 'this user'}: {done.stderr.strip()[-2000:]}")


@contextlib.contextmanager
def helper_runtime() -> Iterator[HelperRuntime]:
    """A fresh helper tree (checked as the helper's user), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="netfilter-squid-helper-"))
    try:
        runtime = _build(root)
        _check(runtime)
        yield runtime
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- processes


class Squid(ChildProcess):
    """`squid -N` with `directives` (http_access and the rest) added to a base config
    that keeps everything in `directory` and on loopback."""

    name = "squid"
    start_bound = 30.0
    stop_bound = 15.0

    def __init__(self, directory: Path, directives: Sequence[str], *,
                 port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.log_path = self.directory / "squid.out"
        self.service = f"nf{os.getpid()}x{self.port}"  # shared memory segment names
        self.env = env or clean_environment()
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
                   env=self.env, cwd=self.directory, new_session=True)
        self.wait_until(lambda: listening(self.port))
        return self

    def cache_log(self) -> str:
        path = self.directory / "cache.log"
        return path.read_text("utf-8", "replace") if path.exists() else ""

    def access_log(self) -> str:
        path = self.directory / "access.log"
        return path.read_text("utf-8", "replace") if path.exists() else ""

    def explain(self) -> str:
        """Its logs, for an assertion's message."""
        return f"cache.log:\n{self.cache_log()[-3000:]}\naccess.log:\n{self.access_log()}"

    def close(self) -> None:
        self.stop()
        for name in os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []:
            if name.startswith(f"{self.service}-"):
                (Path("/dev/shm") / name).unlink(missing_ok=True)
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


class NetfilterServe(ChildProcess):
    """`netfilter serve PART --config FILE` (its own process, as an operator runs it),
    ready once `port` listens."""

    def __init__(self, part: str, config: Path, port: int, log: Path) -> None:
        self.name = f"netfilter serve {part}"
        self.part, self.config, self.port, self.log_path, self.proc = (
            part, config, port, log, None)

    def start(self) -> NetfilterServe:
        netfilter = Path(sys.executable).parent / "netfilter"
        self.popen([str(netfilter), "serve", self.part, "--config", str(self.config)])
        self.wait_until(lambda: listening(self.port))
        return self


def set_listen(config: Path, part: str, key: str = "listen") -> int:
    """Give `part` of `config` a free loopback port; the port."""
    port = free_port()
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    settings.setdefault(part, {})[key] = f"{HOST}:{port}"
    config.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return port


@dataclass
class Rig:
    """A Squid with netfilter in it, a loopback origin behind it, curl in front."""

    squid: Squid
    origin: Origin
    curl: Curl
    audit: Path  # the audit store the blocks are recorded in
    stop_port: int | None = None  # the stop page deny_info points to (helper)

    def explain(self) -> str:
        return self.squid.explain()

