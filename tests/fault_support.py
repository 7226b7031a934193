"""Upstreams a fault test can break on purpose, on 127.0.0.1 only.

`StubUpstream`: a DNS upstream on UDP that answers every query with one A record
(192.0.2.1), or, switched by `mode`, stays silent, sends garbage, answers with the wrong
query id, or is down (its socket closed, so the kernel answers ICMP port unreachable;
switched back, it binds the same port again).

`FaultyOrigin`: an HTTP origin that answers 200, resets every connection after reading
the request head (RST, SO_LINGER 0), or is down (its listening socket closed: connection
refused; switched back, it listens on the same port again).

Each runs one thread with bounded waits; `close()` ends it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time

import dns.message
import dns.rrset

__all__ = ["FaultyOrigin", "StubUpstream"]

HOST = "127.0.0.1"
ANSWER_ADDRESS = "192.0.2.1"
_LINGER_0 = struct.pack("ii", 1, 0)


def _answer(data: bytes) -> bytes | None:
    try:
        query = dns.message.from_wire(data)
    except Exception:
        return None
    response = dns.message.make_response(query)
    if query.question:
        question = query.question[0]
        response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A",
                                                   ANSWER_ADDRESS))
    return response.to_wire()


class _Switchable:
    """A thread that owns one socket; `switch(mode)` returns once the thread applied it."""

    modes: tuple[str, ...] = ()
    kind = socket.SOCK_DGRAM

    def __init__(self) -> None:
        self.sock: socket.socket | None = self._bind(0)
        self.port = int(self.sock.getsockname()[1])
        self.mode = self.modes[0]
        self._applied = self.mode
        self._closed = False
        self.received = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, self.kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        if self.kind == socket.SOCK_STREAM:
            sock.listen(64)
        return sock

    def switch(self, mode: str) -> None:
        assert mode in self.modes, mode
        self.mode = mode
        deadline = time.monotonic() + 5
        while self._applied != mode:
            assert time.monotonic() < deadline, f"{type(self).__name__} did not switch"
            time.sleep(0.01)

    def close(self) -> None:
        self._closed = True
        self.thread.join(5)

    def _apply(self) -> None:
        mode = self.mode
        if mode == "down" and self.sock is not None:
            self.sock.close()
            self.sock = None
        elif mode != "down" and self.sock is None:
            for _ in range(100):  # the port was ours a moment ago: bounded retries
                try:
                    self.sock = self._bind(self.port)
                    break
                except OSError:
                    time.sleep(0.02)
            assert self.sock is not None, f"cannot bind port {self.port} again"
        self._applied = mode

    def _run(self) -> None:
        try:
            while not self._closed:
                self._apply()
                if self.sock is None:
                    time.sleep(0.01)
                    continue
                ready, _, _ = select.select([self.sock], [], [], 0.02)
                if ready:
                    self._serve(self.sock)
        finally:
            if self.sock is not None:
                self.sock.close()

    def _serve(self, sock: socket.socket) -> None:
        raise NotImplementedError


class StubUpstream(_Switchable):
    """modes: answer, silent, garbage, wrong-id, down."""

    modes = ("answer", "silent", "garbage", "wrong-id", "down")

    def _serve(self, sock: socket.socket) -> None:
        try:
            data, addr = sock.recvfrom(4096)
        except OSError:
            return
        self.received += 1
        mode = self.mode
        replies: list[bytes] = []
        if mode == "answer":
            replies = [a for a in (_answer(data),) if a]
        elif mode == "garbage":
            # not DNS at all, and the right id with junk where the question should be
            replies = [b"garbage", data[:2] + b"\x81\x80" + b"\xff" * 40]
        elif mode == "wrong-id":
            answer = _answer(data)
            if answer:
                replies = [struct.pack("!H", struct.unpack("!H", answer[:2])[0] ^ 0x5A5A)
                           + answer[2:]]
        for reply in replies:
            with contextlib.suppress(OSError):
                sock.sendto(reply, addr)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


class FaultyOrigin(_Switchable):
    """modes: up, reset, down. Every connection is handled on a thread of its own."""

    modes = ("up", "reset", "down")
    kind = socket.SOCK_STREAM

    def _serve(self, sock: socket.socket) -> None:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        self.received += 1
        threading.Thread(target=self._connection, args=(conn, self.mode), daemon=True).start()

    @staticmethod
    def _connection(conn: socket.socket, mode: str) -> None:
        with conn:
            conn.settimeout(5)
            head = b""
            try:
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                if mode == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
                    return  # closed with a reset
                body = b"hello from the origin\n"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
            except OSError:
                return
