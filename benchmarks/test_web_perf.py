"""The stop page on the web stack against the hand-written server it replaced, with wrk;
and the same servers under a slowloris of 600 clients.

    .venv/bin/python -m pytest benchmarks/test_web_perf.py -q -m slow -s -p no:cacheprovider

Four servers render the same page with the same engine and Renderer (webchild.py):
`old` (the hand-written HTTP/1.1 server of before, old_stoppage.py: the baseline), `web`
(netfilter's StopPageServer now: the guard, then uvicorn's httptools protocol and
Starlette), and the two candidate stacks bare, without the guard: `starlette` (uvicorn +
httptools + Starlette) and `aiohttp`. Every answer closes its connection (the stop page's
do), so wrk reconnects for every request: the figure includes the TCP handshake, as a
browser sent to the stop page by a DNS answer pays it.

(a) throughput: ROUNDS rounds, in each every server for SECONDS with
    `wrk -t1 -c50 -H "Host: blocked.example"`, the order rotated every round; the server
    on CPU 0, wrk on CPU 1 (where there are 2). Medians and ratios to `old`, and the
    server's CPU time per request (/proc: less moved by other jobs than requests/s).
(b) slowloris: 600 slow clients (from 30 loopback addresses, 20 each) open a request
    head and send it a byte every 0.5 s, reconnecting when closed; meanwhile normal
    clients from another address ask 20 times (10 s timeout each) and wrk runs -c10.
    Reported: normal answers, requests/s under attack, and how many slow connections
    the server still held at the end (a server without head deadlines holds them all).

Asserted (correctness only, never timing): every server answers a blocked name with its
451 page before the runs; every normal client under the slowloris is answered by the
servers with the guard (`old`, `web`).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from tests.support import DEMO_LIST, DEMO_PUB, free_port

from support import Figures

HERE = Path(__file__).parent
WRK = shutil.which("wrk")
KINDS = ("old", "web", "starlette", "aiohttp")
ROUNDS = 3
SECONDS = 3
CONNECTIONS = 50
SLOW_CLIENTS = 600
SLOW_ADDRESSES = 30
PIN = (os.cpu_count() or 1) >= 2
TABLE = f"Stop page: wrk -c{CONNECTIONS}, a new connection per request"
SLOW_TABLE = f"Stop page under a slowloris of {SLOW_CLIENTS} clients"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(WRK is None, reason="wrk not installed (apt-get install wrk)")]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("web") / "netfilter.yaml"
    path.write_text(yaml.safe_dump({
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
        "stoppage": {"listen": "127.0.0.1:0"}}), encoding="utf-8")
    return path


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _server(kind: str, config: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    command = [sys.executable, str(HERE / "webchild.py"), kind, str(port), str(config)]
    if PIN:
        command = ["taskset", "-c", "0", *command]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                             stderr=subprocess.DEVNULL, cwd=HERE.parent)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for _ in range(100):  # uvicorn prints before its server accepts: bounded wait
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/", headers={
                    "Host": "blocked.example", "Accept": "text/html"}, timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert answer.status_code == 451 and "DEMO-0001" in answer.text, kind
        yield port, child.pid  # taskset execs: the pid is the server's
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)


def _wrk(port: int, seconds: int, connections: int) -> tuple[float, str, int]:
    """Requests/s, wrk's socket-error line ("" when none), requests answered."""
    command = [WRK or "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-H",
               "Host: blocked.example", "-H", "Accept: text/html", f"http://127.0.0.1:{port}/"]
    if PIN:
        command = ["taskset", "-c", "1", *command]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30).stdout
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    errors = re.search(r"Socket errors:.*", out)
    done = re.search(r"([0-9]+) requests in", out)
    assert rate is not None and done is not None, out
    return float(rate.group(1)), errors.group(0) if errors else "", int(done.group(1))


def test_throughput(config: Path, figures: Figures) -> None:
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    cpu: dict[str, list[float]] = {kind: [] for kind in KINDS}  # server CPU us per request
    errors: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for round_ in range(ROUNDS):
        order = KINDS[round_ % len(KINDS):] + KINDS[:round_ % len(KINDS)]
        for kind in order:
            with _server(kind, config) as (port, pid):
                _wrk(port, 1, CONNECTIONS)  # warm-up
                before = _cpu(pid)
                rate, error, done = _wrk(port, SECONDS, CONNECTIONS)
                cpu[kind].append((_cpu(pid) - before) / done * 1e6)
            rates[kind].append(rate)
            if error:
                errors[kind].append(error)
    print(f"\n{TABLE}: requests/s per round")
    for kind in KINDS:
        median = statistics.median(rates[kind])
        used = statistics.median(cpu[kind])
        figures.time(TABLE, kind, 1 / median, baseline=kind == "old", unit="request",
                     note=f"runs {', '.join(f'{r:,.0f}' for r in rates[kind])}/s; "
                          f"server CPU {used:,.0f} us/request")
        print(f"  {kind:10} median {median:8,.0f}/s  runs {rates[kind]}  "
              f"x{median / statistics.median(rates['old']):.2f}  cpu {cpu[kind]} us/req  "
              f"{errors[kind][:1]}")


def _slowloris(port: int, stop: threading.Event, counts: Counter[str],
               open_now: list[int]) -> None:
    """SLOW_CLIENTS connections, a head byte every 0.5 s, reconnecting when closed."""

    async def one(i: int) -> None:
        source = f"127.0.1.{10 + i % SLOW_ADDRESSES}"
        while not stop.is_set() and counts["connects"] < SLOW_CLIENTS * 20:
            counts["connects"] += 1
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source, 0))
            except OSError:
                counts["refused"] += 1
                await asyncio.sleep(0.5)
                continue
            open_now[0] += 1
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: blocked.example\r\nX-Slow: ")
                while not stop.is_set():
                    try:
                        data = await asyncio.wait_for(reader.read(65536), 0.5)
                    except TimeoutError:
                        writer.write(b"x")
                        await writer.drain()
                        continue
                    counts["answered" if data else "closed"] += 1
                    break
            except OSError:
                counts["closed"] += 1
            finally:
                open_now[0] -= 1
                writer.close()

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(SLOW_CLIENTS)))

    asyncio.run(main())


def test_slowloris(config: Path, figures: Figures) -> None:
    answered: dict[str, int] = {}
    for kind in ("old", "web", "starlette"):
        with _server(kind, config) as (port, _pid):
            stop, counts, open_now = threading.Event(), Counter[str](), [0]
            attack = threading.Thread(target=_slowloris, args=(port, stop, counts, open_now))
            attack.start()
            try:
                for _ in range(200):  # bounded: until the attack is connected
                    if counts["connects"] >= SLOW_CLIENTS:
                        break
                    time.sleep(0.05)
                time.sleep(3)  # the attack holds what it can
                ok = 0
                transport = httpx.HTTPTransport(local_address="127.0.0.2")
                with httpx.Client(transport=transport, timeout=10) as client:
                    for _ in range(20):
                        try:
                            response = client.get(f"http://127.0.0.1:{port}/",
                                                  headers={"Host": "blocked.example"})
                            ok += response.status_code == 451 and "DEMO-0001" in response.text
                        except httpx.TransportError:
                            pass
                rate, _, _ = _wrk(port, SECONDS, 10)
                held = open_now[0]
            finally:
                stop.set()
                attack.join(60)
        answered[kind] = ok
        figures.row(SLOW_TABLE, kind, f"{ok}/20 normal clients answered, wrk -c10 {rate:,.0f}/s, "
                    f"slow connections held at the end {held}/{SLOW_CLIENTS}, "
                    f"attack connects {counts['connects']}", float(ok))
        print(f"\n{SLOW_TABLE}: {kind}: {ok}/20 answered, {rate:,.0f}/s, held {held}, "
              f"{dict(counts)}")
    assert answered["old"] == 20 and answered["web"] == 20
