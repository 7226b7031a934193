"""`/metrics`, `/healthz` and `/readyz` on the web stack, for `metrics.listen`.

/metrics: the node's counters in Prometheus text (`netfilter.metrics.NodeMetrics`).
/healthz: the process answers; under `netfilter serve` it is answered on the loop that
serves DNS, so a stuck loop is not reported alive. /readyz: 200 when every readiness
check passes, else 503 naming the ones that fail (for load balancers).

A scrape and a readiness check may block: they ask the proxy's mitmdump child and the
DNS workers for their counters, up to a second each (`netfilter.childmetrics`). That
work runs on a thread of its own, one at a time, never on the loop, so DNS answers do
not wait on a scraper. Requests that come while one runs wait on the loop (holding no
thread) and share the next run: a flood of scrapes costs one run at a time, and each
gets counters read after it arrived. Neither reads the audit log (its readiness comes
from its counters).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from netfilter.metrics import NodeMetrics
from netfilter.web.app import build_app
from netfilter.web.server import SMALL, Limits, Listener

__all__ = ["MetricsSite"]

T = TypeVar("T")

_TEXT = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


class _Fresh(Generic[T]):
    """`work` on `executor`, one run at a time; a caller gets the result of a run that
    began after it called (a run already under way is too old for it)."""

    def __init__(self, executor: ThreadPoolExecutor, work: Callable[[], T]) -> None:
        self._executor = executor
        self._work = work
        self._lock = asyncio.Lock()
        self._begun = 0  # runs begun
        self._last: tuple[int, T] | None = None  # the latest finished run: its number, result

    async def __call__(self) -> T:
        arrived = self._begun
        async with self._lock:
            if self._last is not None and self._last[0] > arrived:
                return self._last[1]  # begun after this call, finished while it waited
            self._begun += 1
            number = self._begun
            result = await asyncio.get_running_loop().run_in_executor(self._executor,
                                                                      self._work)
            self._last = (number, result)
            return result


class MetricsSite:
    """The routes of `metrics.listen` over `metrics`; `close` ends its thread."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        self._render = _Fresh(self._executor, metrics.render)
        self._not_ready = _Fresh(self._executor, metrics.not_ready)

    def routes(self) -> list[Route]:
        return [Route("/metrics", self._scrape, methods=["GET", "HEAD"]),
                Route("/healthz", self._healthz, methods=["GET", "HEAD"]),
                Route("/readyz", self._readyz, methods=["GET", "HEAD"])]

    def listener(self, sock: socket.socket, limits: Limits = SMALL) -> Listener:
        """The listener of `metrics.listen` on `sock`."""
        return Listener("metrics", sock, build_app(self.routes()), limits)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _scrape(self, _request: Request) -> Response:
        body = await self._render()
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST, **_TEXT})

    async def _healthz(self, _request: Request) -> Response:
        return PlainTextResponse("ok\n", headers=_TEXT)

    async def _readyz(self, _request: Request) -> Response:
        failing = await self._not_ready()
        if failing:
            return PlainTextResponse(f"not ready: {', '.join(failing)}\n", status_code=503,
                                     headers=_TEXT)
        return PlainTextResponse("ready\n", headers=_TEXT)
