"""Helpers every integration test module (and the benchmarks) share: loopback ports,
bounded waits, server child processes, the demo list, the audit log's events, and
skipping when a Debian tool is missing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

__all__ = ["DEMO_ALLOW", "DEMO_LIST", "DEMO_PUB", "HOST", "REPO", "ChildProcess", "connect_from",
           "fill_disk", "free_port", "hold_write_lock", "listening", "read_events", "require_tools",
           "small_tmpfs", "wait_for"]

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
DEMO_LIST = REPO / "lists" / "demo" / "demo.nfl"
DEMO_PUB = REPO / "lists" / "demo" / "demo.pub"
DEMO_ALLOW = REPO / "lists" / "demo" / "local-allow.yaml"


def require_tools(*tools: str, why: str = "") -> None:
    """Skip (with the reason) when a command-line tool the tests drive is missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed{'; ' + why if why else ''}")


def free_port() -> int:
    """A loopback port free for both UDP and TCP right now (bind 0, check, release)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((HOST, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((HOST, port))
                except OSError:
                    continue
            return int(port)
    raise RuntimeError("no free loopback port found in 50 attempts")


def wait_for(predicate: Callable[[], object], bound: float = 5.0) -> bool:
    """Poll `predicate` every 20 ms until it is true or `bound` seconds passed."""
    deadline = time.monotonic() + bound
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def connect_from(port: int, source: str = HOST) -> socket.socket:
    """A TCP connection to HOST:port from `source` (any 127.0.0.0/8 address on Linux), so
    a test can be several clients as per-client limits see them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect((HOST, port))
    return sock


def listening(port: int) -> bool:
    """Does something accept TCP connections on HOST:port?"""
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


class ChildProcess:
    """A server run as a child process, its stdout and stderr in `log_path`: started
    once `ready()` says so (bounded), stopped with SIGTERM, then SIGKILL (bounded).

    Subclasses (plain classes or dataclasses) provide `name`, `log_path` and `proc`.
    """

    name: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None
    start_bound = 30.0  # seconds the server may take to become ready
    stop_bound = 10.0  # seconds it may take to exit after SIGTERM

    def popen(self, args: list[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None, new_session: bool = False) -> None:
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, cwd=cwd, env=env,
                                         start_new_session=new_session)

    def wait_until(self, ready: Callable[[], bool], pause: float = 0.05) -> None:
        """Poll `ready` until true; RuntimeError with the log if the server exits or
        is not ready within `start_bound` seconds (then it is stopped)."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_bound
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before "
                                   f"it was ready; its output:\n{self.log()}")
            if ready():
                return
            time.sleep(pause)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready within {self.start_bound} s; "
                           f"its output:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL; the exit status (None: never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_bound)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(self.stop_bound)
        return proc.returncode


_HOLD_LOCK = r"""
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
db.execute("BEGIN IMMEDIATE")  # the store's write lock, as another writer holds it
print("held", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


def hold_write_lock(store: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding `store`'s SQLite write lock for `seconds` (as a second
    writer would); returns once it holds it. Wait for it to end with `.wait()`."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(store), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


@contextmanager
def small_tmpfs(directory: Path, megabytes: int) -> Iterator[Path]:
    """A tmpfs of `megabytes` mounted on `directory` (made), to be filled up: a full
    disk. Mounting needs root, as CI has; the test is skipped otherwise."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0700",
                           "tmpfs", str(directory)], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill_disk(disk: Path) -> Path:
    """Write a file on `disk` (a small tmpfs) until the disk is full; the file, to be
    removed when the disk should take writes again."""
    filler = disk / "filler"
    try:
        with filler.open("wb") as f:
            for _ in range(10000):
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass
    assert filler.exists()
    return filler


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events committed so far to a node's audit log (read-only)."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        rows = db.execute("SELECT event FROM leaves WHERE event IS NOT NULL ORDER BY idx")
        return [json.loads(row[0]) for row in rows]
    except sqlite3.OperationalError:  # the writer has not created the tables yet
        return []
    finally:
        db.close()
