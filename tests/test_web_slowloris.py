"""The web stack under a slowloris of 600 clients, each sending its request head a byte
at a time: others are still answered, the attack's connections are closed (head
deadlines, per-client caps, eviction), and the server's connections stay bounded.

A real StopPageServer with the transparency routes (the stop page's listener as
`netfilter serve` runs it) on 127.0.0.1 port 0, its limits from the config defaults
except shorter head deadlines; the attackers are 600 real sockets from 30 loopback
addresses, the normal clients httpx from another.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

from netfilter.config import load_config
from netfilter.engine import Engine
from netfilter.stoppage.server import StopPageServer
from netfilter.web.public import transparency_routes
from netfilter.web.transparency import TransparencySource
from tests.support import DEMO_LIST, DEMO_PUB

SLOW = 600
ADDRESSES = 30  # 20 each: above the per-address cap, as a botnet behind NAT would be


def _attack(port: int, stop: threading.Event, counts: Counter[str]) -> None:
    async def one(i: int) -> None:
        source = f"127.0.2.{10 + i % ADDRESSES}"
        while not stop.is_set() and counts["connects"] < SLOW * 10:
            counts["connects"] += 1
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                               local_addr=(source, 0))
            except OSError:
                counts["refused"] += 1
                await asyncio.sleep(0.2)
                continue
            head = b"GET / HTTP/1.1\r\nHost: blocked.example\r\nX-Slow: " + b"x" * 200
            try:
                for byte in head:  # a byte at a time, never the blank line
                    if stop.is_set():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    try:
                        data = await asyncio.wait_for(reader.read(65536), 0.2)
                    except TimeoutError:
                        continue
                    counts["answered" if data else "closed"] += 1
                    break
            except OSError:
                counts["closed"] += 1
            finally:
                writer.close()

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(SLOW)))

    asyncio.run(main())


def test_600_slow_clients_do_not_keep_others_from_their_answer(tmp_path: Path) -> None:
    path = tmp_path / "netfilter.yaml"
    path.write_text(yaml.safe_dump({
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
        "stoppage": {"listen": "127.0.0.1:0", "header_timeout": 3.0,
                     "busy_header_timeout": 1.0}}), encoding="utf-8")
    settings = load_config(path)
    assert settings.stoppage is not None and settings.stoppage.max_clients < SLOW
    engine = Engine(settings)
    source = TransparencySource(settings, engine)
    results: dict[str, object] = {}

    def clients(server: StopPageServer) -> None:
        stop, counts = threading.Event(), Counter[str]()
        attack = threading.Thread(target=_attack, args=(server.port, stop, counts))
        attack.start()
        answers: list[int] = []
        peak = 0
        try:
            for _ in range(200):  # until every attacker has connected once (bounded)
                if counts["connects"] >= SLOW:
                    break
                time.sleep(0.05)
            transport = httpx.HTTPTransport(local_address="127.0.0.3")
            with httpx.Client(transport=transport, timeout=10) as client:
                for i in range(20):
                    peak = max(peak, len(server.slots))
                    url = f"http://127.0.0.1:{server.port}/"
                    if i % 4 == 3:
                        answers.append(client.get(url + "transparency.json").status_code)
                    else:
                        answers.append(client.get(url, headers={
                            "Host": "blocked.example"}).status_code)
                    time.sleep(0.1)
        finally:
            stop.set()
            attack.join(60)
        results.update(answers=answers, peak=peak, counts=counts,
                       alive=attack.is_alive(), stats=dict(server.stats))

    async def main() -> None:
        server = StopPageServer(engine, settings.stoppage,  # type: ignore[arg-type]
                                routes=transparency_routes(source))
        await server.start()
        try:
            await asyncio.wait_for(asyncio.to_thread(clients, server), 120)
        finally:
            await server.stop()
            source.close()

    asyncio.run(main())
    answers = results["answers"]
    assert answers == [200 if i % 4 == 3 else 451 for i in range(20)], results
    assert not results["alive"]
    counts = results["counts"]
    assert isinstance(counts, Counter) and counts["connects"] > SLOW  # made to reconnect
    assert counts["answered"] <= counts["connects"]
    assert isinstance(results["peak"], int)
    assert results["peak"] <= settings.stoppage.max_clients  # type: ignore[union-attr]
    stats = results["stats"]
    assert isinstance(stats, dict) and stats.get("evicted", 0) + stats.get("timeout", 0) > 0
