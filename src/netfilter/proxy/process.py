"""`netfilter serve proxy`: mitmdump with the netfilter addon, as a child process.

mitmproxy runs its own event loop and master; a child keeps it apart from the DNS and
stop page servers (and from uvloop) while `netfilter serve` still starts and stops
every configured part together.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from netfilter.childmetrics import ENV as METRICS_ENV
from netfilter.childmetrics import ChildCounters
from netfilter.config import ProxySettings, parse_hostport
from netfilter.errors import NetfilterError

__all__ = ["ProxyProcess"]

log = logging.getLogger(__name__)
START_BOUND = 30.0
# mitmdump's terminal log formats with mitmproxy.log.MitmFormatter; under
# `netfilter --log-format json` (NETFILTER_LOG_FORMAT, inherited) the child's lines
# are JSON too, so a log collector reads one format from every process. The child dies
# with serve however serve exits (PR_SET_PDEATHSIG; a kill -9 included), so no orphan
# keeps the proxy's port from the next start.
PARENT_ENV = "NETFILTER_PROXY_PARENT"
_LAUNCH = f"""import ctypes, os, signal
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
parent = os.environ.pop("{PARENT_ENV}", "")
if parent and os.getppid() != int(parent):  # serve was gone before the prctl
    raise SystemExit(1)
if os.environ.get("NETFILTER_LOG_FORMAT") == "json":
    import mitmproxy.log
    from netfilter.logsetup import JsonFormatter
    mitmproxy.log.MitmFormatter = lambda *args, **kwargs: JsonFormatter()
from mitmproxy.tools.main import mitmdump
mitmdump()
"""


class ProxyProcess:
    """The mitmdump child: started, reloaded (SIGHUP) and stopped with serve; its
    counters are asked for over `counters` at each scrape of the node's /metrics."""

    def __init__(self, settings: ProxySettings, config_path: Path, base: Path) -> None:
        self.settings = settings
        self.config_path = config_path
        self.host, self.port = parse_hostport(settings.listen)
        self.confdir = (settings.confdir if settings.confdir is None or
                        settings.confdir.is_absolute() else base / settings.confdir)
        self.proc: asyncio.subprocess.Process | None = None
        self.counters = ChildCounters()

    def command(self) -> list[str]:
        script = Path(__file__).with_name("script.py")
        args = [sys.executable, "-c", _LAUNCH, "--listen-host", self.host,
                "-p", str(self.port), "--set", "flow_detail=0", "-s", str(script),
                "--set", f"netfilter_config={self.config_path}"]
        if self.confdir is not None:
            args += ["--set", f"confdir={self.confdir}"]
        return args

    async def start(self) -> None:
        fd = self.counters.child_fd()
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(), stdin=asyncio.subprocess.DEVNULL, pass_fds=(fd,),
            env={**os.environ, METRICS_ENV: str(fd), PARENT_ENV: str(os.getpid())})
        self.counters.started()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_BOUND
        while loop.time() < deadline:
            if self.proc.returncode is not None:
                raise NetfilterError("proxy", f"mitmdump exited with {self.proc.returncode} "
                                              "(its reason is printed above)")
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                log.info("proxy: serving on %s port %d (mitmdump pid %d)", self.host,
                         self.port, self.proc.pid)
                return
            except OSError:
                await asyncio.sleep(0.2)
        await self.stop()
        raise NetfilterError("proxy", f"mitmdump did not listen within {START_BOUND:.0f} s")

    def reload(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        self.counters.close()
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
