"""Prometheus metrics of a node: the running parts' own counters, read at each scrape.

The parts keep plain counters (the audit log's appended and shed events, the DNS
server's packet counts, the HTTP servers' connection limits); nothing on a hot path
touches a metrics library. At a scrape, each registered source is read and its
counters become `netfilter_<part>_<name>_total`, its gauges `netfilter_<part>_<name>`.
`MetricsServer` serves `/metrics` (Prometheus text format) and `/health` on
`metrics.listen`, with the connection limits of every small server of the node.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from netfilter.httpd import ReadOnlyServer, Resource

__all__ = ["MetricsServer", "NodeMetrics"]

Source = Callable[[], Mapping[str, int | float]]
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


@dataclass(frozen=True)
class _Part:
    name: str
    source: Source
    gauges: frozenset[str]


class NodeMetrics:
    """A registry of the parts' counters; `render()` is the exposition text."""

    def __init__(self) -> None:
        self._parts: list[_Part] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def add(self, part: str, source: Source, *, gauges: frozenset[str] = frozenset()) -> None:
        """Read `source()` at every scrape; names in `gauges` go up and down, the others
        only up (counters)."""
        self._parts.append(_Part(part, source, gauges))

    def collect(self) -> Iterator[Metric]:
        for part in self._parts:
            try:
                values = dict(part.source())
            except Exception:  # a part that is stopping must not fail the scrape
                continue
            for key, value in sorted(values.items()):
                name = _UNSAFE.sub("_", f"netfilter_{part.name}_{key}")
                if key in part.gauges:
                    yield GaugeMetricFamily(name, f"{part.name}: {key}", value=value)
                else:
                    yield CounterMetricFamily(name, f"{part.name}: {key}", value=value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer(ReadOnlyServer):
    """`/metrics` and `/health` over HTTP (call serve_forever in a thread of its own)."""

    name = "metrics"

    def __init__(self, metrics: NodeMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        super().__init__(host, port)

    def resource(self, path: str) -> Resource | None:
        if path == "/metrics":
            return self.metrics.render(), [("Content-Type", CONTENT_TYPE_LATEST),
                                           ("Cache-Control", "no-store")]
        if path == "/health":
            return b"ok\n", [("Content-Type", "text/plain; charset=utf-8"),
                             ("Cache-Control", "no-store")]
        return None
