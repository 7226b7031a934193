"""Prometheus metrics of a node: the running parts' own counters, read at each scrape.

The parts keep plain counters (dict increments, a bucket list for latency); nothing on a
hot path touches a metrics library. At a scrape, `NodeMetrics` reads them and
prometheus-client renders the families: plain counters of a part become
`netfilter_<part>_<name>_total` (gauges `netfilter_<part>_<name>`), and `for_node` adds
the labelled families (requests by front-end and verdict, blocks by list, category and
action, latency per front-end, upstream errors, lists, audit, reloads). The web stack
serves them (`netfilter.web.metrics`): `/metrics`, `/healthz` (alive) and `/readyz`
(ready for traffic) on `metrics.listen`.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from netfilter.childmetrics import ChildCounters, merged
from netfilter.latency import BUCKETS, LatencyHistogram

if TYPE_CHECKING:
    from netfilter.audit.log import AuditLog
    from netfilter.dns.server import DnsServer
    from netfilter.dnsworkers import DnsTotals, DnsWorkers
    from netfilter.engine import Engine
    from netfilter.stoppage.server import StopPageServer

__all__ = ["LatencyHistogram", "NodeMetrics", "for_node"]

Source = Callable[[], Mapping[str, int | float]]
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")
@dataclass(frozen=True)
class _Part:
    name: str
    source: Source
    gauges: frozenset[str]


class NodeMetrics:
    """A registry of the parts' counters; `render()` is the exposition text,
    `not_ready()` the readiness checks that fail."""

    def __init__(self) -> None:
        self._parts: list[_Part] = []
        self._families: list[Callable[[], Iterable[Metric]]] = []
        self._checks: list[tuple[str, Callable[[], bool]]] = []
        self._refreshes: list[Callable[[], None]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def add(self, part: str, source: Source, *, gauges: frozenset[str] = frozenset()) -> None:
        """Read `source()` at every scrape; names in `gauges` go up and down, the others
        only up (counters)."""
        self._parts.append(_Part(part, source, gauges))

    def add_families(self, families: Callable[[], Iterable[Metric]]) -> None:
        """Labelled families, built at every scrape from a part's counters."""
        self._families.append(families)

    def add_refresh(self, refresh: Callable[[], None]) -> None:
        """Called once at the start of every scrape and readiness check, before the
        sources are read (e.g. to ask another process for its counters)."""
        self._refreshes.append(refresh)

    def _refresh(self) -> None:
        for refresh in self._refreshes:
            try:
                refresh()
            except Exception:  # as a failing source: its families are left out
                continue

    def add_check(self, name: str, check: Callable[[], bool]) -> None:
        """A readiness condition; `name` is what /readyz says when it is false."""
        self._checks.append((name, check))

    def collect(self) -> Iterator[Metric]:
        self._refresh()
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
        for families in self._families:
            try:
                built = list(families())
            except Exception:  # as above
                continue
            yield from built

    def not_ready(self) -> list[str]:
        """The names of the readiness checks that fail (a failing check fails)."""
        failing = []
        self._refresh()
        for name, check in self._checks:
            try:
                ok = check()
            except Exception:
                ok = False
            if not ok:
                failing.append(name)
        return failing

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------- the node's families


def dns_verdicts(stats: Mapping[str, int], relay: Mapping[str, int]) -> dict[str, int]:
    """DNS queries answered by verdict, from a server's stats and its relays' counts."""
    relayed = relay.get("relayed", 0) + relay.get("cache_hits", 0)  # upstream, or cached
    cname = stats.get("blocked_cname", 0)
    return {"block": stats.get("blocked", 0) + cname,
            "allow": stats.get("forwarded", 0) + relayed - cname,
            "route": stats.get("routed", 0),
            "invalid": sum(stats.get(key, 0) for key in ("formerr", "notimp", "badvers",
                                                          "dropped"))}


def _requests(dns: DnsServer | DnsTotals | None, stoppage: StopPageServer | None,
              proxy: ChildCounters | None) -> Iterator[Metric]:
    family = CounterMetricFamily(
        "netfilter_requests", "Queries and requests answered, by front-end and verdict "
        "(dns: block, allow = forwarded upstream, route = sent to the proxy, invalid = "
        "malformed or unsupported; stoppage: block, allow = the generic page; proxy "
        "(HTTP requests, plain or decrypted): block = the stop page, allow = forwarded "
        "to the origin, refuse = outside allowed destinations or not configured, "
        "misdirected = 421, invalid = not checkable)",
        labels=["frontend", "verdict"])
    if dns is not None:
        for verdict, answered in dns_verdicts(dns.stats, dns.relay_counts()).items():
            family.add_metric(["dns", verdict], answered)
    if stoppage is not None:
        family.add_metric(["stoppage", "block"], stoppage.stats["blocked"])
        family.add_metric(["stoppage", "allow"], stoppage.stats["generic"])
    if proxy is not None:
        for verdict, count in sorted(proxy.part("verdicts").items()):
            family.add_metric(["proxy", verdict], count)
    yield family


def _latency(parts: Mapping[str, Callable[[], LatencyHistogram]],
             proxy: ChildCounters | None) -> Iterator[Metric]:
    family = HistogramMetricFamily(
        "netfilter_request_duration_seconds", "Time from a query or request to its answer, "
        "per front-end. dns: only queries decided in Python (blocked, or forwarded by the "
        "full path); clean queries the C relay or the fast path forwards are not timed "
        "one by one. proxy: from a request's first byte to its decision (a local "
        "answer: to the answer); the origin's time is not counted", labels=["frontend"])
    for frontend, read in parts.items():
        histogram = read()
        family.add_metric([frontend], histogram.buckets(), histogram.sum)
    if proxy is not None:
        sent = _child_histogram(proxy, "latency")
        if sent is not None:
            family.add_metric(["proxy"], sent.buckets(), sent.sum)
    yield family


def _child_histogram(child: ChildCounters, name: str) -> LatencyHistogram | None:
    """The histogram `name` of a child's counters, if it sent one."""
    sent = child.histogram(name, len(BUCKETS) + 1)
    if sent is None:
        return None
    histogram = LatencyHistogram()
    histogram.counts, histogram.sum = sent
    return histogram


def _blocks(engine: Engine, children: Callable[[], list[ChildCounters]]) -> Iterator[Metric]:
    blocks = CounterMetricFamily(
        "netfilter_blocks", "Blocks by front-end, list, category and how they were "
        "answered (nxdomain, stoppage, refused)",
        labels=["frontend", "list", "category", "action"])
    lifted = CounterMetricFamily(
        "netfilter_exceptions", "Matches a local exception lifted, by front-end, list "
        "and category", labels=["frontend", "list", "category"])
    matches = engine.matches.copy()
    for child in children():  # the engines of the mitmdump child and of the DNS workers
        matches.update(child.matches())
    for (frontend, list_id, category, action), count in sorted(matches.items()):
        if action == "exception":
            lifted.add_metric([frontend, list_id, category], count)
        else:
            blocks.add_metric([frontend, list_id, category, action], count)
    reloads = CounterMetricFamily("netfilter_reloads", "List reloads by result (ok, "
                                  "refused: the lists in force stay)", labels=["result"])
    for result in ("ok", "refused"):
        reloads.add_metric([result], engine.reloads[result])
    yield from (blocks, lifted, reloads)


def _lists(engine: Engine) -> Iterator[Metric]:
    lists = engine.lists
    now = time.time()
    version = GaugeMetricFamily("netfilter_list_version", "Version of each list in force",
                                labels=["list", "source"])
    entries = GaugeMetricFamily("netfilter_list_entries", "Entries of each list in force",
                                labels=["list", "source"])
    age = GaugeMetricFamily("netfilter_list_age_seconds",
                            "Seconds since the authority issued the list in force",
                            labels=["list"])
    expiry = GaugeMetricFamily("netfilter_list_expiry_seconds", "Seconds until the list "
                               "in force expires (negative: expired)", labels=["list"])
    for matcher in lists.blocking:
        version.add_metric([matcher.list_id, matcher.source], matcher.version)
        entries.add_metric([matcher.list_id, matcher.source], matcher.entry_count)
    for bundle in lists.bundles:
        m = bundle.manifest
        age.add_metric([m.list_id], now - m.issued.timestamp())
        if m.expires is not None:
            expiry.add_metric([m.list_id], m.expires.timestamp() - now)
    yield from (version, entries, age, expiry)


def _upstreams(dns: DnsServer | DnsTotals) -> Iterator[Metric]:
    errors = CounterMetricFamily(
        "netfilter_upstream_errors", "ICMP errors (upstream unreachable) per DNS upstream",
        labels=["upstream"])
    timeouts = CounterMetricFamily(
        "netfilter_upstream_timeouts", "Forwarding attempts that got no answer in time, "
        "per DNS upstream (the C relay's own are netfilter_dns_relay_given_back_total)",
        labels=["upstream"])
    for upstream, error_count, timeout_count in dns.upstream_counts():
        errors.add_metric([upstream], error_count)
        timeouts.add_metric([upstream], timeout_count)
    yield from (errors, timeouts)


def _canaries(dns: DnsServer | DnsTotals) -> Iterator[Metric]:
    """Canary answers (dns/canaries.py) per canary; none while they are off."""
    family = CounterMetricFamily(
        "netfilter_dns_canary_answers", "Canary names answered by the resolver itself "
        "(firefox_doh, icloud_private_relay, resolver_arpa); counted, never logged",
        labels=["canary"])
    for label in sorted(set(dns.canaries.names.values()) | set(dns.canary_counts)):
        family.add_metric([label], dns.canary_counts[label])
    yield family


def _origins(proxy: ChildCounters) -> Iterator[Metric]:
    family = CounterMetricFamily(
        "netfilter_origin_errors", "Requests the proxy answered 502 or could not finish "
        "because of the origin, by kind (refused, reset, timeout, dns, tls, other)",
        labels=["kind"])
    for kind, count in sorted(proxy.part("origin_errors").items()):
        family.add_metric([kind], count)
    yield family


def _dns_workers(server: DnsServer, workers: DnsWorkers) -> Iterator[Metric]:
    """Per DNS process (0: the first, which also serves DoT and DoH): queries answered
    by verdict, whether it serves, and how often it was started again."""
    requests = CounterMetricFamily(
        "netfilter_dns_worker_requests", "DNS queries answered per worker process "
        "(dns.workers; worker 0 also serves DoT/DoH), by verdict as netfilter_requests",
        labels=["worker", "verdict"])
    up = GaugeMetricFamily("netfilter_dns_worker_up", "1 while the DNS worker serves",
                           labels=["worker"])
    restarts = CounterMetricFamily("netfilter_dns_worker_restarts", "Times the DNS worker "
                                   "was started again after it exited", labels=["worker"])
    for verdict, count in dns_verdicts(server.stats, server.relay_counts()).items():
        requests.add_metric(["0", verdict], count)
    up.add_metric(["0"], 1)
    restarts.add_metric(["0"], 0)
    for index, child, serving, count in workers.per_worker():
        answered = dns_verdicts({k: int(v) for k, v in child.part("dns").items()},
                                {k: int(v) for k, v in child.part("dns_relay").items()})
        for verdict, value in answered.items():
            requests.add_metric([str(index), verdict], value)
        up.add_metric([str(index)], 1 if serving else 0)
        restarts.add_metric([str(index)], count)
    yield from (requests, up, restarts)


def _checkpoint_age(audit: AuditLog) -> Iterator[Metric]:
    if audit.last_checkpoint_time:  # none yet in this process: no sample
        yield GaugeMetricFamily("netfilter_audit_last_checkpoint_age_seconds",
                                "Seconds since the stored log was last found covered by "
                                "a signed checkpoint",
                                value=time.time() - audit.last_checkpoint_time)


class _AuditWritable:
    """Readiness of the audit log, from its counters: not taking writes when appends
    failed since the previous check and none went through."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.seen = (0, 0)
        self.ok = True

    def __call__(self) -> bool:
        now = (self.audit.appended, self.audit.append_failures)
        if now[0] != self.seen[0]:
            self.ok = True
        elif now[1] != self.seen[1]:
            self.ok = False
        self.seen = now
        return self.ok


class _Counted(Protocol):
    stats: Counter[str]


def for_node(engine: Engine, parts: Iterable[object] = (),
             tiles: _Counted | None = None) -> NodeMetrics:
    """The metrics and readiness checks of a node: its engine, its audit log (the
    engine's sink, when it is one), and the running parts among `parts`: a DnsServer,
    a StopPageServer, and a part with `counters` in another process (the proxy's
    mitmdump child: its engine's and audit log's counters are added to this
    process's); others are ignored."""
    from netfilter.audit.log import AuditLog
    from netfilter.dns.encrypted import EncryptedDns
    from netfilter.dns.server import DnsServer
    from netfilter.dnsworkers import DnsTotals, DnsWorkers
    from netfilter.stoppage.server import StopPageServer

    metrics = NodeMetrics()
    dns: DnsServer | None = None
    workers: DnsWorkers | None = None
    stoppage: StopPageServer | None = None
    proxy: ChildCounters | None = None
    for part in parts:
        if isinstance(part, DnsServer):
            dns = part
        elif isinstance(part, DnsWorkers):
            workers = part
        elif isinstance(part, EncryptedDns):  # DoT and DoH: queries, errors, limits
            metrics.add("dns_encrypted", part.counts)
        elif isinstance(part, StopPageServer):
            stoppage = part
        elif isinstance(getattr(part, "counters", None), ChildCounters):
            proxy = part.counters  # type: ignore[attr-defined]

    def children() -> list[ChildCounters]:
        """The other processes' counters: the proxy's, the DNS workers' (with what
        their earlier runs counted)."""
        return ([proxy] if proxy is not None else []) + (
            workers.counters() if workers is not None else [])

    def theirs(part: str) -> list[Source]:
        """The same part's counters in the other processes."""
        def total() -> dict[str, int | float]:
            out: Counter[str] = Counter()
            for child in children():
                out.update(child.part(part))
            return dict(out)

        return [total]

    if workers is not None:
        metrics.add_refresh(workers.refresh)
    metrics.add("engine", merged(engine.stats, theirs("engine")),
                gauges=frozenset({"blocks_pending", "windows_open"}))
    metrics.add_families(lambda: _blocks(engine, children))
    metrics.add_families(lambda: _lists(engine))
    metrics.add_check("lists", lambda: bool(engine.lists.blocking))
    audit = engine.sink
    if isinstance(audit, AuditLog):  # appended, queued (the queue's depth), shed, failures
        metrics.add("audit", merged(audit.stats, theirs("audit")), gauges=frozenset({"queued"}))
        metrics.add_families(lambda: _checkpoint_age(audit))
        metrics.add_check("audit", _AuditWritable(audit))
    latency: dict[str, Callable[[], LatencyHistogram]] = {}
    totals: DnsServer | DnsTotals | None = dns
    if dns is not None and workers is not None:
        first, pool = dns, workers
        totals = DnsTotals(first, pool)
        metrics.add_families(lambda: _dns_workers(first, pool))
        metrics.add_check("dns_workers", lambda: not pool.down())
    if totals is not None:
        server = totals
        metrics.add("dns", lambda: server.stats.copy())
        metrics.add("dns_relay", server.relay_counts)
        metrics.add_families(lambda: _upstreams(server))
        metrics.add_families(lambda: _canaries(server))
        metrics.add_check("upstream", server.upstream_answering)
        latency["dns"] = lambda: server.latency
    if stoppage is not None:
        page = stoppage
        metrics.add("stoppage", page.stats.copy)
        latency["stoppage"] = lambda: page.latency
    if proxy is not None:
        child = proxy
        metrics.add_refresh(child.refresh)
        metrics.add("proxy", lambda: child.part("proxy"))
        metrics.add_families(lambda: _origins(child))
        metrics.add_check("proxy", lambda: bool(child.latest()))
    if dns is not None or stoppage is not None or proxy is not None:
        metrics.add_families(lambda: _requests(totals, stoppage, proxy))
        metrics.add_families(lambda: _latency(latency, proxy))
    if tiles is not None:
        metrics.add("tiles", tiles.stats.copy)
    return metrics
