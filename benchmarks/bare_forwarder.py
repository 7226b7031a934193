"""A bare uvloop DNS forwarder: the floor netfilter's resolver is compared against.

It relays each query to one upstream by a fresh query id and relays the answer back,
with no parsing, no filtering, no timeouts and no retries: what forwarding alone
costs in Python on uvloop. Benchmarks only (the issue quotes such a forwarder at
~58% of the upstream's direct rate on this machine kind).

    python bare_forwarder.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys

import uvloop

HOST = "127.0.0.1"


class Upstream(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, tuple[bytes, tuple[str, int]]] = {}
        self.ids = itertools.cycle(range(65536))
        self.client: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        item = self.pending.pop(int.from_bytes(data[:2], "big"), None)
        if item is not None and self.client is not None:
            self.client.sendto(item[0] + data[2:], item[1])


class Listener(asyncio.DatagramProtocol):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.upstream.client = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        upstream = self.upstream
        new_id = next(upstream.ids)
        upstream.pending[new_id] = (data[:2], addr)
        assert upstream.transport is not None
        upstream.transport.sendto(new_id.to_bytes(2, "big") + data[2:])


async def main(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)  # exit 0, as the servers compared
    _, upstream = await loop.create_datagram_endpoint(
        Upstream, remote_addr=(HOST, upstream_port))
    await loop.create_datagram_endpoint(lambda: Listener(upstream),
                                        local_addr=(HOST, listen_port))
    await stop.wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
