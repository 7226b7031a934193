"""A virtual environment of its own for dnspython's DoH client (`dnspython[doh]`), which
cannot live in the dev environment: its [doh] extra needs httpx2/h11>=0.16, and
mitmproxy 11.0 refuses that h11.

Made once under the repository's `.cache/` (gitignored) and reused while its stamp file
(written after a successful install) names the same requirement and Python; made again
otherwise. Installs from the package index with bounded time; when that cannot be
reached, the tests that need it skip with one line naming the cause.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.support import REPO

REQUIREMENT = "dnspython[doh]>=2.6,<3"
WHERE = REPO / ".cache" / "dohclient-venv"
INSTALL_BOUND = 600.0  # seconds for the whole pip install
NETWORK_TROUBLE = ("NewConnectionError", "Network is unreachable", "Temporary failure in name",
                   "Name or service not known", "Connection refused", "Read timed out",
                   "ConnectTimeout", "ProxyError", "Max retries exceeded",
                   "No matching distribution", "Could not find a version")


def dohclient_python() -> Path:
    """The python of the dnspython[doh] venv, made if missing or incomplete; skips the
    calling test when it cannot be made for want of a package index."""
    python = WHERE / "bin" / "python"
    stamp = WHERE / ".installed"
    want = f"{REQUIREMENT}\n{sys.version}\n"
    WHERE.parent.mkdir(parents=True, exist_ok=True)
    with open(WHERE.parent / "dohclient-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest run making it at the same time
        if python.exists() and stamp.exists() and stamp.read_text() == want:
            return python
        shutil.rmtree(WHERE, ignore_errors=True)
        try:
            venv.EnvBuilder(with_pip=True).create(WHERE)
        except (OSError, subprocess.CalledProcessError) as error:
            pytest.skip(f"dnspython[doh] venv: python3 -m venv failed: {error}")
        try:
            pip = subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                 "--no-input", "--timeout", "30", "--retries", "2", REQUIREMENT],
                capture_output=True, text=True, timeout=INSTALL_BOUND, check=False)
        except subprocess.TimeoutExpired:
            pytest.skip(f"dnspython[doh] venv: pip install took over {INSTALL_BOUND:.0f} s")
        if pip.returncode != 0:
            output = (pip.stdout + pip.stderr).strip()
            lines = output.splitlines()
            cause = next((line.strip() for trouble in NETWORK_TROUBLE for line in lines
                          if trouble in line), None)  # the first kind of trouble listed wins
            if cause is not None and (errno := re.search(r"\[Errno -?\d+\][^'\")]*", cause)):
                cause = errno.group(0)  # "[Errno 111] Connection refused", not pip's repr
            if cause is not None:
                pytest.skip(f"dnspython[doh] venv: no package index reachable: {cause[:200]}")
            pytest.fail(f"dnspython[doh] venv: pip install {REQUIREMENT!r} failed:\n{output}")
        check = subprocess.run([str(python), "-c", "import dns.query; assert dns.query.have_doh"],
                               capture_output=True, text=True, timeout=60, check=False)
        if check.returncode != 0:
            pytest.fail(f"dnspython[doh] venv: no DoH support after install:\n{check.stderr}")
        stamp.write_text(want)
        return python
