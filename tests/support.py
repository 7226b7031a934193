"""Helpers every integration test module shares: loopback ports, bounded waits, the
demo list, the audit log's events, and skipping when a Debian tool is missing."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

__all__ = ["DEMO_ALLOW", "DEMO_LIST", "DEMO_PUB", "HOST", "REPO", "free_port", "read_events",
           "require_tools", "wait_for"]

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
