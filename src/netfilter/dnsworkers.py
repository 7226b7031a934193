"""`dns.workers`: the resolver's UDP and TCP listeners on several processes.

One Python process answers at most one core's worth of queries. With `dns.workers: N`
(0: one per core) `netfilter serve` binds N sets of the `dns.listen` sockets with
SO_REUSEPORT before anything starts (a port in use still fails the start in one line),
serves the first set itself (with DoT and DoH, the updater, metrics and the audit
keeper) and hands each other set to a worker child (`python -m netfilter.dnsworkers`).
The kernel spreads clients over the sockets by their address and port.

A worker is a DNS server on an engine of its own: the list files are memory-mapped,
so the pages are shared; its events go to the node's one audit store (sqlite
serializes the appends of every writer into one tree; the first process signs the
checkpoints, so a stop signs the last one once). Its relay cache, TCP slots and
per-client limits are its own, each an N-th of what `dns` says (`worker_share`), so
that the node as a whole keeps to the settings whatever N is. Settings arrive on the
worker's stdin, one JSON line each: the first to start, each next one after a list
swap or config re-read (the engine of the first process reloads first; a refused
reload reaches no worker). The worker's counters reach the node's /metrics as the
proxy child's do (childmetrics.py).

A worker that exits is started again on the same sockets (queries queue in their
buffers meanwhile) after a back-off that doubles up to BACKOFF_MAX, with one log line
per exit; /readyz fails (`dns_workers`) until it answers again. A worker dies with
its parent (PR_SET_PDEATHSIG, and the end of its stdin), so none survives a kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netfilter.audit.log import AuditLog
from netfilter.audit.store import StoredCheckpoint
from netfilter.childmetrics import ENV as METRICS_ENV
from netfilter.childmetrics import ChildCounters, Snapshot, add_snapshots, engine_counters
from netfilter.config import DnsSettings, Settings
from netfilter.errors import NetfilterError
from netfilter.latency import BUCKETS, LatencyHistogram

if TYPE_CHECKING:
    from netfilter.dns.canaries import Canaries
    from netfilter.dns.server import DnsServer, Listening
    from netfilter.engine import Engine

__all__ = ["AppenderLog", "DnsTotals", "DnsWorkers", "WorkerCounters", "bind_workers",
           "worker_count", "worker_share"]

log = logging.getLogger(__name__)
ENV_FDS = "NETFILTER_DNS_WORKER_FDS"  # "udp,tcp;udp,tcp": one pair per dns.listen address
ENV_INDEX = "NETFILTER_DNS_WORKER"
ENV_PARENT = "NETFILTER_DNS_WORKER_PARENT"
ENV_LEVEL = "NETFILTER_DNS_WORKER_LOG_LEVEL"
ENV_COUNT = "NETFILTER_DNS_WORKER_COUNT"  # processes that share the node's bounds
START_BOUND = 30.0  # seconds a worker has to answer its first counters request
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0  # seconds before a restart, doubled per quick exit
STEADY = 60.0  # seconds up after which an exit starts the back-off from its minimum
STOP_BOUND = 15.0  # seconds a worker has to stop after SIGTERM, then it is killed
_PR_SET_PDEATHSIG = 1


# the gauges among a worker's counters: never carried over a restart
GAUGES = {"engine": frozenset({"blocks_pending", "windows_open"}),
          "audit": frozenset({"queued"})}


class WorkerCounters(ChildCounters):
    """A worker's counters as the node adds them up: its last answer (a scrape it
    misses, or its death, freezes them rather than dropping them), plus what its
    earlier runs had counted, carried over a restart, so that the node's sums and the
    worker's own series never go back (Prometheus would take that for a reset)."""

    def __init__(self, earlier: WorkerCounters | None = None) -> None:
        super().__init__()
        self.carried: Snapshot = {} if earlier is None else earlier.latest()
        self._total = add_snapshots(self.carried, {}, GAUGES)

    def refresh(self) -> None:
        """Ask the worker; its answer, if any, added up once for the scrape's reads."""
        super().refresh()
        answer = super().latest()
        if answer:
            self._total = add_snapshots(self.carried, answer, GAUGES)

    def answered(self) -> bool:
        """Whether the worker answered the last refresh (it serves)."""
        return bool(super().latest())

    def latest(self) -> Snapshot:
        return self._total


def worker_count(settings: DnsSettings) -> int:
    """Processes to serve on: `dns.workers`, or one per core this process may use."""
    return settings.workers or len(os.sched_getaffinity(0))


def worker_share(settings: DnsSettings, count: int) -> DnsSettings:
    """What one of `count` processes serving `settings` may hold: TCP connections (all
    clients, and per client) and relay cache entries, each an even share rounded down
    (at least 1 connection), so that the node's sum never exceeds what the operator
    set. The kernel spreads a client's connections over the processes by port, so a
    client may meet its share's cap in one process a little before the node's cap;
    its own idlest connection then makes room, as at the node's cap."""
    if count <= 1:
        return settings
    return settings.model_copy(update={
        "tcp_max_connections": max(1, settings.tcp_max_connections // count),
        "tcp_per_client": max(1, settings.tcp_per_client // count),
        "cache_size": (max(1, settings.cache_size // count) if settings.cache_size
                       else 0)})


def bind_workers(first: Sequence[Listening], count: int) -> list[list[Listening]]:
    """`count - 1` more sets of sockets on the addresses (and ports) `first` got, each
    with SO_REUSEPORT (as `first` must have). ListenError as `dns.server.bind`."""
    from netfilter.dns.server import bind

    listen = [f"[{b.host}]:{b.port}" if ":" in b.host else f"{b.host}:{b.port}"
              for b in first]
    sets: list[list[Listening]] = []
    try:
        for _ in range(count - 1):
            sets.append(bind(listen, reuse_port=True))
    except BaseException:
        for bound in sets:
            for listening in bound:
                listening.close()
        raise
    return sets


def encode_settings(settings: Settings) -> bytes:
    """One line for a worker's stdin: the settings and the directory they resolve in."""
    return json.dumps({"base": str(settings.base),
                       "settings": settings.model_dump(mode="json")}).encode() + b"\n"


def decode_settings(line: bytes) -> Settings:
    data = json.loads(line)
    return Settings.model_validate({**data["settings"], "base": Path(data["base"])})


# ---------------------------------------------------------------- in the first process


class _Worker:
    """One worker child and the sockets it serves (kept here across restarts)."""

    def __init__(self, index: int, sockets: list[Listening]) -> None:
        self.index = index
        self.sockets = sockets
        self.proc: asyncio.subprocess.Process | None = None
        self.counters = WorkerCounters()
        self.up = False  # answered since it was (re)started
        self.restarts = 0
        self.started_at = 0.0

    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class DnsWorkers:
    """The worker children of `netfilter serve` (the first process is worker 0):
    started, told of every reload, restarted when they exit, stopped with serve."""

    def __init__(self, settings: Settings, sockets: Sequence[list[Listening]]) -> None:
        self.settings = settings
        self.workers = [_Worker(i + 1, list(bound)) for i, bound in enumerate(sockets)]
        self._stopping = False
        self._supervisors: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for worker in self.workers:
            await self._spawn(worker)
        for worker in self.workers:
            await self._ready(worker)
        self._supervisors = [asyncio.create_task(self._supervise(w)) for w in self.workers]
        log.info("dns: %d worker process(es) serve beside this one (pids %s)",
                 len(self.workers), ", ".join(str(w.proc.pid) for w in self.workers
                                              if w.proc is not None))

    async def _spawn(self, worker: _Worker) -> None:
        worker.counters.close()
        worker.counters = WorkerCounters(worker.counters)
        worker.up = False
        fd = worker.counters.child_fd()
        fds = [(b.udp.fileno(), b.tcp.fileno()) for b in worker.sockets]
        env = {**os.environ, METRICS_ENV: str(fd), ENV_INDEX: str(worker.index),
               ENV_FDS: ";".join(f"{udp},{tcp}" for udp, tcp in fds),
               ENV_PARENT: str(os.getpid()), ENV_COUNT: str(len(self.workers) + 1),
               ENV_LEVEL: str(logging.getLogger("netfilter").getEffectiveLevel())}
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "netfilter.dnsworkers", stdin=asyncio.subprocess.PIPE,
            pass_fds=(fd, *(f for pair in fds for f in pair)), env=env)
        worker.counters.started()
        worker.started_at = asyncio.get_running_loop().time()
        self._send(worker, self.settings)

    @staticmethod
    def _send(worker: _Worker, settings: Settings) -> None:
        proc = worker.proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return
        with contextlib.suppress(OSError, RuntimeError):  # exiting: the supervisor sees it
            proc.stdin.write(encode_settings(settings))

    async def _ready(self, worker: _Worker) -> None:
        """Until the worker answers a counters request (it serves then)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_BOUND
        while loop.time() < deadline:
            if not worker.running():
                code = worker.proc.returncode if worker.proc is not None else None
                raise NetfilterError("dns.workers", f"worker {worker.index} exited with "
                                                    f"{code} (its reason is logged above)")
            await loop.run_in_executor(None, worker.counters.refresh)
            if worker.counters.answered():
                worker.up = True
                return
        raise NetfilterError("dns.workers", f"worker {worker.index} did not answer within "
                                            f"{START_BOUND:.0f} s")

    async def _supervise(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_MIN
        while not self._stopping:
            assert worker.proc is not None
            code = await worker.proc.wait()
            worker.up = False
            if self._stopping:
                return
            if loop.time() - worker.started_at >= STEADY:
                backoff = BACKOFF_MIN
            log.error("dns: worker %d (pid %d) exited with %s; starting it again in %.0f s",
                      worker.index, worker.proc.pid, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, BACKOFF_MAX)
            if self._stopping:
                return
            worker.restarts += 1
            try:
                await self._spawn(worker)
                await self._ready(worker)
            except (NetfilterError, OSError) as e:
                log.error("dns: worker %d not started again: %s", worker.index, e)
                if worker.running():
                    assert worker.proc is not None
                    worker.proc.kill()

    def reload(self, settings: Settings) -> None:
        """Hand the settings in force after a reload (lists swapped) to every worker."""
        self.settings = settings
        for worker in self.workers:
            self._send(worker, settings)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.running()]

    def down(self) -> list[int]:
        """The workers that do not serve now (exited, or not answering since)."""
        return [w.index for w in self.workers if not (w.up and w.running())]

    def refresh(self) -> None:
        """Ask every running worker for its counters (at the start of a scrape)."""
        for worker in self.workers:
            if worker.running():
                worker.counters.refresh()
            else:
                worker.up = False

    def counters(self) -> list[ChildCounters]:
        """Every worker's counters as of the last refresh it answered, with what its
        earlier runs counted (a worker down keeps its last figures)."""
        return [w.counters for w in self.workers]

    def per_worker(self) -> Iterable[tuple[int, ChildCounters, bool, int]]:
        """(index, its counters, up, restarts) per worker."""
        for w in self.workers:
            yield w.index, w.counters, w.up and w.running(), w.restarts

    async def stop(self) -> None:
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        for worker in self.workers:
            if worker.running():
                assert worker.proc is not None
                worker.proc.terminate()
        for worker in self.workers:
            if worker.proc is None:
                continue
            try:
                await asyncio.wait_for(worker.proc.wait(), timeout=STOP_BOUND)
            except TimeoutError:
                log.error("dns: worker %d did not stop within %.0f s; killed", worker.index,
                          STOP_BOUND)
                worker.proc.kill()
                await worker.proc.wait()
        for worker in self.workers:
            worker.counters.close()
            for listening in worker.sockets:
                listening.close()


class DnsTotals:
    """The node's DNS counters for metrics: the first process's server plus every
    worker's counters as of the last refresh it answered, with what its earlier runs
    counted (WorkerCounters), so the sums never fall."""

    def __init__(self, server: DnsServer, workers: DnsWorkers) -> None:
        self.server = server
        self.workers = workers
        self.canaries: Canaries = server.canaries

    def _sum(self, own: dict[str, int], part: str) -> Counter[str]:
        total: Counter[str] = Counter(own)
        for child in self.workers.counters():
            total.update({k: int(v) for k, v in child.part(part).items()})
        return total

    @property
    def stats(self) -> Counter[str]:
        return self._sum(dict(self.server.stats), "dns")

    def relay_counts(self) -> dict[str, int]:
        return dict(self._sum(self.server.relay_counts(), "dns_relay"))

    @property
    def canary_counts(self) -> Counter[str]:
        return self._sum(dict(self.server.canary_counts), "canaries")

    @property
    def latency(self) -> LatencyHistogram:
        total = LatencyHistogram()
        total.counts = list(self.server.latency.counts)
        total.sum = self.server.latency.sum
        for child in self.workers.counters():
            sent = child.histogram("latency", len(BUCKETS) + 1)
            if sent is not None:
                total.counts = [a + b for a, b in zip(total.counts, sent[0], strict=True)]
                total.sum += sent[1]
        return total

    def upstream_counts(self) -> list[tuple[str, int, int]]:
        errors: Counter[str] = Counter()
        timeouts: Counter[str] = Counter()
        order = []
        for name, error_count, timeout_count in self.server.upstream_counts():
            order.append(name)
            errors[name] += error_count
            timeouts[name] += timeout_count
        for child in self.workers.counters():
            for row in child.latest().get("upstreams", ()):
                if (isinstance(row, list) and len(row) == 3 and row[0] in errors
                        and isinstance(row[1], int) and isinstance(row[2], int)):
                    errors[row[0]] += row[1]
                    timeouts[row[0]] += row[2]
        return [(name, errors[name], timeouts[name]) for name in order]

    def upstream_answering(self) -> bool:
        """As DnsServer's, over every process: False when any says no upstream answers."""
        own = self.server.upstream_answering()
        return own and all(w.counters.latest().get("upstream_ok", True) is not False
                           for w in self.workers.workers if w.running())


# ---------------------------------------------------------------- in a worker


class AppenderLog(AuditLog):
    """A worker's audit log: it appends to the node's store and signs nothing; the
    first process's keeper signs the checkpoints (its own and the workers' events are
    one tree), keeps the tiles and applies retention, and its stop signs the last one."""

    def _keep(self) -> None:
        return

    def checkpoint(self) -> StoredCheckpoint | None:
        return None


def dns_counters(server: DnsServer, engine: Engine) -> Snapshot:
    """What the first process's metrics need of a worker (see DnsTotals)."""
    snapshot = engine_counters(engine)
    snapshot["dns"] = dict(server.stats)
    snapshot["dns_relay"] = server.relay_counts()
    snapshot["canaries"] = dict(server.canary_counts)
    snapshot["latency"] = {"counts": list(server.latency.counts), "sum": server.latency.sum}
    snapshot["upstreams"] = [list(row) for row in server.upstream_counts()]
    snapshot["upstream_ok"] = server.upstream_answering()
    return snapshot


def _die_with_parent() -> None:
    """SIGTERM when the parent exits, however it exits; none if it is gone already."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    parent = os.environ.pop(ENV_PARENT, "")
    if parent and os.getppid() != int(parent):
        raise SystemExit(1)


def _inherited(value: str) -> list[Listening]:
    from netfilter.dns.server import Listening

    bound = []
    for pair in value.split(";"):
        udp_fd, tcp_fd = (int(fd) for fd in pair.split(","))
        udp = socket.socket(fileno=udp_fd)
        tcp = socket.socket(fileno=tcp_fd)
        bound.append(Listening(str(udp.getsockname()[0]), udp, tcp))
    return bound


async def _serve(index: int, count: int, settings: Settings, engine: Engine,
                 sockets: list[Listening]) -> None:
    from netfilter.childmetrics import export_from_environment
    from netfilter.dns.canaries import Canaries
    from netfilter.dns.server import DnsServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    assert settings.dns is not None
    server = DnsServer(engine, worker_share(settings.dns, count), sockets=sockets,
                       canaries=Canaries.for_settings(settings))
    in_force = settings
    reloads: list[Settings | None] = []  # in order; one runs at a time

    def reload(new: Settings | None) -> None:
        reloads.append(new)
        if len(reloads) == 1:
            run_next()

    def run_next() -> None:
        new = reloads[0]
        done = loop.run_in_executor(None, lambda: engine.reload(new) if new is not None
                                    and new != in_force else engine.reload())
        done.add_done_callback(lambda future: finished(new, future))

    def finished(new: Settings | None, future: asyncio.Future[bool]) -> None:
        nonlocal in_force
        reloads.pop(0)
        ok = not future.cancelled() and future.exception() is None and future.result()
        if ok and new is not None and new.dns is not None:
            in_force = new
            server.settings = worker_share(new.dns, count)
        if reloads:
            run_next()

    def read_stdin() -> None:
        for line in sys.stdin.buffer:
            try:
                new = decode_settings(line)
            except (ValueError, NetfilterError) as e:
                log.error("dns: worker %d: settings not read: %s", index, e)
                continue
            loop.call_soon_threadsafe(reload, new)
        loop.call_soon_threadsafe(stop.set)  # the parent is gone

    try:
        await server.start()
        export_from_environment(lambda: dns_counters(server, engine))
        loop.add_signal_handler(signal.SIGHUP, reload, None)
        threading.Thread(target=read_stdin, name="settings", daemon=True).start()
        log.info("dns: worker %d serving (pid %d)", index, os.getpid())
        await stop.wait()
    finally:
        await server.stop()


def main() -> int:
    """A worker's process: started by DnsWorkers, never by hand."""
    from netfilter.logsetup import chosen_format, setup
    from netfilter.node import make_engine

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: the parent stops us
    setup(int(os.environ.get(ENV_LEVEL, logging.WARNING)), chosen_format())
    index = int(os.environ.get(ENV_INDEX, "0"))
    count = int(os.environ.get(ENV_COUNT, "1"))
    try:
        settings = decode_settings(sys.stdin.buffer.readline())
        sockets = _inherited(os.environ.pop(ENV_FDS))
        engine = make_engine(settings, sink_class=AppenderLog)
    except (NetfilterError, ValueError, KeyError, OSError) as e:
        log.error("dns: worker %d cannot start: %s", index, e)
        return 1
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    try:
        runner(_serve(index, count, settings, engine, sockets))
    except NetfilterError as e:
        log.error("dns: worker %d: %s", index, e)
        return 1
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
