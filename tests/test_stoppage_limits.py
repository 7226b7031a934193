"""The stop page server under a slowloris: per-client caps, eviction of the oldest idle
connection, short head deadlines when busy; and the slot keeper's client key.

A real StopPageServer on 127.0.0.1 port 0 with small limits; attackers and normal
clients are real sockets, normal ones also from 127.0.0.2 (Linux loopback is 127/8).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from netfilter.config import load_config
from netfilter.engine import Engine
from netfilter.slots import client_key
from netfilter.stoppage.server import StopPageServer
from tests.support import connect_from

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "lists" / "demo"
REQUEST = b"GET / HTTP/1.1\r\nHost: blocked.example\r\nConnection: close\r\n\r\n"
# The whole server outnumbers the attacker's connections, one address does not.
LIMITS = {"max_clients": 48, "max_clients_per_address": 8, "header_timeout": 5.0,
          "busy_header_timeout": 0.5}
T = TypeVar("T")


def _serve(tmp_path: Path, client: Callable[[StopPageServer], T],
           **limits: Any) -> T:
    """A real server with `limits` in this thread's loop; `client(server)` in a thread."""
    path = tmp_path / "netfilter.yaml"
    path.write_text(yaml.safe_dump({
        "lists": [{"path": str(DEMO / "demo.nfl"), "trust": [str(DEMO / "demo.pub")]}],
        "stoppage": {"listen": "127.0.0.1:0", **LIMITS, **limits}}), encoding="utf-8")
    settings = load_config(path)
    stoppage = settings.stoppage
    assert stoppage is not None

    async def main() -> T:
        server = StopPageServer(Engine(settings), stoppage)
        await server.start()
        try:
            return await asyncio.wait_for(asyncio.to_thread(client, server), 60)
        finally:
            await server.stop()

    return asyncio.run(main())


def _ask(port: int, source: str) -> tuple[bytes, float]:
    """A normal client: the whole request at once; (the answer, seconds it took)."""
    start = time.monotonic()
    with connect_from(port, source) as sock:
        sock.sendall(REQUEST)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, time.monotonic() - start


def _closed(sock: socket.socket, bound: float) -> tuple[bytes, float]:
    """Read until the server closes (an answer or nothing) or `bound` seconds
    passed; (what came, seconds)."""
    start = time.monotonic()
    sock.settimeout(bound)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data, time.monotonic() - start


def _slowloris(port: int, stop: threading.Event, counts: Counter[str],
               connections: int = 40, most: int = 3000) -> None:
    """`connections` at once from 127.0.0.1, each trickling a header byte every 0.1 s
    and reconnecting when closed; until `stop`, at most `most` connects in all."""

    async def one() -> None:
        while not stop.is_set() and counts["connects"] < most:
            counts["connects"] += 1
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                counts["refused"] += 1
                await asyncio.sleep(0.05)
                continue
            try:
                writer.write(b"GET / HTTP/1.1\r\nX-Slow: ")
                while not stop.is_set():
                    try:
                        data = await asyncio.wait_for(reader.read(65536), 0.1)
                    except TimeoutError:
                        writer.write(b"x")
                        await writer.drain()
                        continue
                    counts["answered" if data else "closed"] += 1
                    break
            except OSError:
                counts["closed"] += 1
            finally:
                writer.close()

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(connections)))

    asyncio.run(main())


def test_slowloris_does_not_starve_normal_clients(tmp_path: Path) -> None:
    def client(server: StopPageServer) -> None:
        stop, counts = threading.Event(), Counter[str]()
        attack = threading.Thread(target=_slowloris, args=(server.port, stop, counts))
        attack.start()
        try:
            deadline = time.monotonic() + 10
            while counts["connects"] < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # the attack holds its connections
            answers, peak = [], 0
            for i in range(20):
                answers.append(_ask(server.port, "127.0.0.2" if i % 2 else "127.0.0.1"))
                peak = max(peak, len(server.slots))
                time.sleep(0.05)
        finally:
            stop.set()
            attack.join(15)
        assert not attack.is_alive()
        for answer, took in answers:
            assert answer.startswith(b"HTTP/1.1 451 ") and b"DEMO-0001" in answer
            assert took < 2.0
        assert peak <= 48
        assert server.stats["evicted"] > 0  # the attack did reach its cap
        assert counts["connects"] > 40  # ... and was made to reconnect

    _serve(tmp_path, client)


def test_per_client_cap_evicts_that_clients_oldest_idle(tmp_path: Path) -> None:
    def client(server: StopPageServer) -> None:
        other = [connect_from(server.port, "127.0.0.3") for _ in range(3)]
        mine = [connect_from(server.port) for _ in range(8)]
        try:
            for sock in other + mine:
                sock.sendall(b"GET / HTTP/1.1\r\n")  # a head begun, not finished
            time.sleep(0.2)
            assert len(server.slots) == 11
            newest = connect_from(server.port)  # the 9th from 127.0.0.1
            newest.sendall(b"GET / HTTP/1.1\r\n")
            data, took = _closed(mine[0], 3.0)
            assert data == b"" and took < 2.0  # its oldest idle one made way
            newest.sendall(b"Host: blocked.example\r\n\r\n")
            answer, _ = _closed(newest, 5.0)
            assert answer.startswith(b"HTTP/1.1 451 ")
            for sock in other + mine[1:]:  # the others are left alone
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    sock.recv(1)
            assert server.stats["evicted"] == 1
        finally:
            for sock in other + mine:
                sock.close()

    _serve(tmp_path, client)


def test_full_server_evicts_the_oldest_idle(tmp_path: Path) -> None:
    def client(server: StopPageServer) -> None:
        idle = [connect_from(server.port, f"127.0.0.{10 + i}") for i in range(16)]
        try:
            for sock in idle:
                sock.sendall(b"GET / HTTP/1.1\r\n")
            time.sleep(0.2)
            assert len(server.slots) == 16
            answer, took = _ask(server.port, "127.0.0.2")
            assert answer.startswith(b"HTTP/1.1 451 ") and took < 2.0
            assert _closed(idle[0], 3.0)[0] == b""  # the oldest made way
            assert server.stats["evicted"] == 1 and "refused_busy" not in server.stats
        finally:
            for sock in idle:
                sock.close()

    _serve(tmp_path, client, max_clients=16)


def test_busy_server_shortens_head_deadlines(tmp_path: Path) -> None:
    def client(server: StopPageServer) -> None:
        idle = [connect_from(server.port, f"127.0.0.{10 + i}") for i in range(6)]
        try:
            time.sleep(0.2)
            start = time.monotonic()
            # 6 of 16 in use: not busy, these keep the 5 s deadline
            assert _closed(idle[0], 0.8)[1] >= 0.7
            more = [connect_from(server.port, f"127.0.0.{20 + i}") for i in range(4)]
            idle += more  # now 10 of 16: busy; old and new get 0.5 s
            for sock in idle:
                data, _ = _closed(sock, 4.0)
                assert data.startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - start < 3.5
            assert server.stats["timeout"] == 10
        finally:
            for sock in idle:
                sock.close()

    _serve(tmp_path, client, max_clients=16)


def test_client_key() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key(None) == ""
