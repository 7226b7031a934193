"""The guard's bodies: a route that reads one (as a dashboard's forms will, under
/admin/) gets it whole and bounded, the stop page never gets one; and a kept-alive
connection serves several requests, each head read strictly.

A real StopPageServer with one extra route on 127.0.0.1 port 0; httpx and raw sockets.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import yaml
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from netfilter.config import load_config
from netfilter.engine import Engine
from netfilter.stoppage.server import StopPageServer
from netfilter.web.guard import MAX_BODY
from netfilter.web.head import Request as Head
from tests.support import DEMO_LIST, DEMO_PUB

T = TypeVar("T")


async def _echo(request: Request) -> Response:
    body = await request.body()
    return PlainTextResponse(f"{len(body)} {body[:16].decode()}")


def _serve(tmp_path: Path, client: Callable[[int], T]) -> T:
    path = tmp_path / "netfilter.yaml"
    path.write_text(yaml.safe_dump({
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
        "stoppage": {"listen": "127.0.0.1:0"}}), encoding="utf-8")
    settings = load_config(path)
    assert settings.stoppage is not None

    def forms(head: Head) -> bool:
        return head.target.startswith("/admin/")

    async def main() -> T:
        server = StopPageServer(Engine(settings), settings.stoppage,  # type: ignore[arg-type]
                                routes=[Route("/admin/echo", _echo, methods=["POST"])],
                                keeps_body=forms)
        await server.start()
        try:
            return await asyncio.wait_for(asyncio.to_thread(client, server.port), 60)
        finally:
            await server.stop()

    return asyncio.run(main())


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_bodies_reach_routes_that_read_them_and_only_those(tmp_path: Path) -> None:
    def client(port: int) -> None:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=10) as http:
            answer = http.post(f"{base}/admin/echo", content=b"name=value&x=1")
            assert (answer.status_code, answer.text) == (200, "14 name=value&x=1")
            too_big = http.post(f"{base}/admin/echo", content=b"x" * (MAX_BODY + 1))
            assert too_big.status_code == 413
            page = http.post(f"{base}/elsewhere", content=b"y" * 100_000,
                             headers={"Host": "blocked.example"})
            assert page.status_code == 451 and "DEMO-0001" in page.text
        chunked = _raw(port, b"POST /admin/echo HTTP/1.1\r\nHost: a.example\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        assert chunked.startswith(b"HTTP/1.1 400 ")
        # kept alive: two requests on one connection, the second answered too
        two = _raw(port, b"POST /admin/echo HTTP/1.1\r\nHost: a.example\r\n"
                         b"Content-Length: 3\r\n\r\nabc"
                         b"GET /x HTTP/1.1\r\nHost: blocked.example\r\n\r\n")
        assert two.startswith(b"HTTP/1.1 200 ") and b"3 abc" in two
        assert two.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 451 " in two

    _serve(tmp_path, client)
