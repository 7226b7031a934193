"""A flood of blocked DNS queries from one loopback client, with the time of every answer.

Raw UDP with prebuilt packets (dnspython per query would be the bottleneck): a window
of queries in flight, each answer timed with the system-wide monotonic clock, so a
test in another process can say which answers came before a given moment (a kill).
Bounded in time and in count.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import dns.message

__all__ = ["Flood", "flood"]


@dataclass
class Flood:
    sent: int = 0
    answers: list[float] = field(default_factory=list)  # monotonic time of each answer
    rcodes: dict[int, int] = field(default_factory=dict)

    def answered_before(self, moment: float) -> int:
        return sum(1 for t in self.answers if t < moment)


def flood(port: int, seconds: float, *, name: str = "x.blocked.example",
          source: str = "127.0.0.1", window: int = 32, limit: int = 2_000_000,
          stop: threading.Event | None = None) -> Flood:
    """Query `name` (type A) as fast as answers come back, for `seconds` at most."""
    wire = bytearray(dns.message.make_query(name, "A").to_wire())
    result = Flood()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.settimeout(0.2)
        end = time.monotonic() + seconds
        qid = 0
        while time.monotonic() < end and result.sent < limit:
            if stop is not None and stop.is_set():
                break
            for _ in range(window):
                qid = (qid + 1) & 0xFFFF
                struct.pack_into("!H", wire, 0, qid)
                try:
                    sock.send(wire)
                except ConnectionRefusedError:  # nothing listens (killed): wait, go on
                    time.sleep(0.05)
                    break
                result.sent += 1
            for _ in range(window):
                try:
                    answer = sock.recv(4096)
                except (TimeoutError, ConnectionRefusedError):
                    break
                result.answers.append(time.monotonic())
                rcode = answer[3] & 0x0F if len(answer) > 3 else -1
                result.rcodes[rcode] = result.rcodes.get(rcode, 0) + 1
    return result
