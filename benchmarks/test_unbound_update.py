"""A list update inside Unbound: what each way of enforcing a new entry on names that
Unbound cached as clean costs, on loopback.

    .venv/bin/python -m pytest benchmarks/test_unbound_update.py -q -s -p no:cacheprovider
    BENCH_UNBOUND_LINES=200000 .venv/bin/python -m pytest ... -k "flush or shipped"

Workload (dnsbench.make_workload): 1,000 blocked domains, a 20,000-line query file
(BENCH_UNBOUND_LINES) of A/AAAA queries, 99% for clean names (TTL 3600) that an
upstream unbound serves from local data. unbound + the netfilter plugin forwards to
it; both have remote control on loopback (no certificates), so the upstream's
`total.num.queries` counts what the plugin's unbound asked it. Each scenario starts
from a warm cache (one pass of the file).

(a) a full flush (`unbound-control flush_zone .`), then dnsperf at once:
    q/s per second and upstream queries, against the same run with no flush;
(b) a capped `cache-max-ttl`: the upstream queries it costs are names / cap per second
    (each cached name is fetched again once per cap); measured with a 2 s cap;
(c) a Python `inplace_cb_reply_cache` callback that looks each cache hit's name up in
    the engine's host cache: cache-hit q/s with it, against the plugin without it
    (Unbound 1.17 ignores the callback's result: it cannot refuse the cached answer);
(d) what shipped: the plugin reloads the swapped bundle and, as it adds an entry,
    runs `unbound-control flush_zone .`: time from the rename to the block of a cached
    name, and the burst after it; a removal-only swap for comparison.

Timings are printed, never asserted (the 2-core machine is shared); asserted: the
scenarios ran (answers came, the flush emptied the cache).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import dnsbench
from dnsbench import HOST, Server, Workload
from netfilter.keys import load_private_key
from netfilter.listfile import build_bundle

pytestmark = pytest.mark.skipif(
    bool(dnsbench.missing_tools()),
    reason=f"{', '.join(dnsbench.missing_tools())} not installed")

SECONDS = 5
LINES = int(os.environ.get("BENCH_UNBOUND_LINES", "20000"))

CALLBACK_SCRIPT = '''
import os
exec(open(os.environ["NETFILTER_ADDON"]).read())
_addon_init = init


def _on_cache_hit(qinfo, qstate, rep, rcode, edns, opt_list_out, region, **kwargs):
    engine = _plugin._engine
    if engine is not None:
        engine.host_cache.get(qinfo.qname_str.rstrip("."))
    return True


def init_standard(id, env):
    if not _addon_init(id, env.cfg):
        return False
    return register_inplace_cb_reply_cache(_on_cache_hit, env, id)
'''


def _control(port: int) -> list[str]:
    return ["remote-control:", "  control-enable: yes", f"  control-interface: {HOST}",
            f"  control-port: {port}", "  control-use-cert: no"]


def _with_control(conf: str, port: int, extra: list[str] | None = None) -> str:
    conf = conf.replace("remote-control:\n  control-enable: no\n",
                        "\n".join(_control(port)) + "\n")
    if extra:
        conf = conf.replace("server:\n", "server:\n" + "".join(f"  {x}\n" for x in extra), 1)
    return conf


class Controlled:
    def __init__(self, server: Server, conf: Path) -> None:
        self.server = server
        self.conf = conf

    def control(self, *args: str) -> str:
        done = subprocess.run(["unbound-control", "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=60, check=True)
        return done.stdout

    def queries(self) -> int:
        found = re.search(r"^total\.num\.queries=(\d+)$", self.control("stats_noreset"), re.M)
        assert found is not None
        return int(found.group(1))


def _unbound(name: str, directory: Path, conf: str, port: int,
             env: dict[str, str] | None = None) -> Controlled:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.conf"
    path.write_text(conf, encoding="utf-8")
    server = Server(name, ["unbound", "-d", "-c", str(path)], port, directory, env or {})
    return Controlled(server, path)


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Workload:
    return dnsbench.make_workload(tmp_path_factory.mktemp("update") / "workload", lines=LINES)


@pytest.fixture(scope="module")
def upstream(workload: Workload) -> Iterator[Controlled]:
    directory = workload.directory.parent / "upstream"
    port = dnsbench.free_port()
    conf = dnsbench.upstream_conf(workload, directory, port, dnsbench.free_port())
    up = _unbound("upstream", directory, _with_control(conf, dnsbench.free_port()), port)
    with up.server:
        yield up


def _plugin(workload: Workload, upstream: Controlled, name: str, *,
            extra: list[str] | None = None, callback: bool = False,
            control: bool = False) -> Controlled:
    directory = workload.directory.parent / name
    directory.mkdir(parents=True, exist_ok=True)
    port = dnsbench.free_port()
    config = dnsbench.netfilter_config(workload, directory / "plugin-netfilter.yaml",
                                       listen_port=None, upstream_port=upstream.server.port)
    env = {"NETFILTER_CONFIG": str(config), "PYTHONPATH": dnsbench.SYSTEM_PYTHON_PACKAGES,
           "NETFILTER_ADDON": str(dnsbench.PLUGIN),
           "NETFILTER_SITE_PACKAGES": str(next((dnsbench.VENV / "lib").glob(
               "python3.*/site-packages")))}
    conf = dnsbench.plugin_conf(directory, port, upstream.server.port)
    if callback:
        script = directory / "unbound_netfilter_callback.py"
        script.write_text(CALLBACK_SCRIPT, encoding="utf-8")
        conf = conf.replace(str(dnsbench.PLUGIN), str(script))
    path = directory / f"{name}.conf"
    if control:  # the plugin flushes through it
        env["NETFILTER_UNBOUND_CONTROL"] = shlex.join(["unbound-control", "-c", str(path)])
    return _unbound(name, directory, _with_control(conf, dnsbench.free_port(), extra),
                    port, env)


def _dnsperf(server: Server, queries: Path, seconds: float) -> float:
    command = ["dnsperf", "-s", HOST, "-p", str(server.port), "-d", str(queries), "-c", "4",
               "-Q", "300000", "-t", "5", "-l", f"{seconds:g}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 40,
                          check=True)
    found = re.search(r"Queries per second:\s+([\d.]+)", done.stdout)
    assert found is not None, done.stdout
    return float(found.group(1))


def _seconds(plugin: Controlled, upstream: Controlled, queries: Path,
             count: int = 5) -> list[tuple[float, int]]:
    """`count` back-to-back 1-second dnsperf runs: (q/s, upstream queries) of each."""
    out = []
    for _ in range(count):
        before = upstream.queries()
        qps = _dnsperf(plugin.server, queries, 1)
        out.append((qps, upstream.queries() - before))
    return out


def _warm(server: Server, queries: Path) -> None:
    subprocess.run(["dnsperf", "-s", HOST, "-p", str(server.port), "-d", str(queries),
                    "-c", "4", "-n", "1", "-t", "5"], capture_output=True, timeout=300,
                   check=True)


def _table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    for name, text in rows:
        print(f"| {name} | {text} |")


def _per_second(values: list[tuple[float, int]]) -> str:
    return ", ".join(f"{qps:,.0f} q/s ({asked:,} up)" for qps, asked in values)


def test_full_flush_costs(workload: Workload, upstream: Controlled) -> None:
    plugin = _plugin(workload, upstream, "plugin-flush")
    rows: list[tuple[str, str]] = []
    with plugin.server:
        _warm(plugin.server, workload.queries)
        for flush in (False, True, False, True, False, True):
            _warm(plugin.server, workload.queries)
            took, said = 0.0, "-"
            if flush:
                start = time.monotonic()
                said = plugin.control("flush_zone", ".").strip()
                took = time.monotonic() - start
            seconds = _seconds(plugin, upstream, workload.queries)
            rows.append(("flush_zone ." if flush else "no flush",
                         f"{took * 1000:.0f} ms ({said}); second by second: "
                         f"{_per_second(seconds)}"))
            if flush:
                assert sum(asked for _, asked in seconds) > 0
    _table("(a) full flush, then 5 x dnsperf -l 1 at once", rows)


def test_capped_ttl_costs(workload: Workload, upstream: Controlled) -> None:
    cap = 2
    plugin = _plugin(workload, upstream, "plugin-cap", extra=[f"cache-max-ttl: {cap}"])
    rows: list[tuple[str, str]] = []
    with plugin.server:
        _warm(plugin.server, workload.queries)
        seconds = _seconds(plugin, upstream, workload.queries, 10)
        asked = sum(a for _, a in seconds)
        answers = len(set(workload.queries.read_text().splitlines()))
        rows.append((f"cache-max-ttl: {cap}", f"second by second: {_per_second(seconds)}; "
                     f"upstream {asked / 10:,.0f}/s (at most {answers:,} answers / {cap} s "
                     f"= {answers / cap:,.0f}/s)"))
    _table("(b) capped cache-max-ttl", rows)


def test_cache_hit_callback_costs(workload: Workload, upstream: Controlled) -> None:
    rows: list[tuple[str, str]] = []
    results: dict[str, list[float]] = {"plugin": [], "plugin + reply_cache callback": []}
    plain = _plugin(workload, upstream, "plugin-plain")
    hooked = _plugin(workload, upstream, "plugin-callback", callback=True)
    with plain.server, hooked.server:
        _warm(plain.server, workload.queries)
        _warm(hooked.server, workload.queries)
        for _ in range(3):
            for label, server in (("plugin", plain), ("plugin + reply_cache callback", hooked)):
                results[label].append(_dnsperf(server.server, workload.queries, SECONDS))
        assert "error" not in hooked.server.log().lower(), hooked.server.log()
    base = sorted(results["plugin"])[1]
    for label, values in results.items():
        median = sorted(values)[1]
        rows.append((label, f"cache hits q/s {', '.join(f'{v:,.0f}' for v in values)}; "
                            f"median {median:,.0f} = {median / base:.2f}x"))
    _table("(c) a Python callback on every cache hit", rows)


def _install(workload: Workload, bundle: Path, version: int, domains: list[str]) -> None:
    """Version `version` of the bench list: its entries minus none, plus `domains`."""
    source = yaml.safe_load((workload.directory / "bench-source.yaml").read_text())
    source["entries"] += [{"domain": d, "ref": f"BENCH-NEW-{i}", "category": "benchmark"}
                          for i, d in enumerate(domains)]
    src = bundle.with_name(f"v{version}.yaml")
    src.write_text(yaml.safe_dump(source, sort_keys=False), encoding="utf-8")
    staged = bundle.with_name(f"v{version}.nfl")
    build_bundle(src, staged, key=load_private_key(workload.directory / "authority.key"),
                 list_id="dns-bench", version=version)
    os.replace(staged, bundle)


def _until(predicate: Callable[[], bool], bound: float = 30.0) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < bound, "not within the bound"
        time.sleep(0.02)
    return time.monotonic() - start


def test_the_shipped_path(workload: Workload, upstream: Controlled) -> None:
    """The plugin's own reload and flush: from a bundle's rename to the block on a
    cached name; a removal-only swap for comparison (no flush)."""
    own = replace(workload, bundle=workload.directory.parent / "shipped" / "bench.nfl")
    own.bundle.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(workload.bundle, own.bundle)
    plugin = _plugin(own, upstream, "plugin-shipped", control=True)
    name, address = workload.clean_sample
    rows: list[tuple[str, str]] = []

    def answer() -> str:
        found = dnsbench.ask(plugin.server.port, name).answer
        return str(found[0][0]) if found else ""

    with plugin.server:
        _warm(plugin.server, workload.queries)
        assert answer() == address
        _install(own, own.bundle, 2, [name])  # adds an entry: a cached clean name
        took = _until(lambda: answer() == dnsbench.STOPPAGE_V4)
        seconds = _seconds(plugin, upstream, workload.queries, 3)
        rows.append(("swap adding 1 entry", f"blocked {took * 1000:,.0f} ms after the rename; "
                     f"then {_per_second(seconds)}"))
        _warm(plugin.server, workload.queries)
        other = "c1.clean.example"
        before = upstream.queries()
        _install(own, own.bundle, 3, [])  # removes that entry again
        took = _until(lambda: answer() == address)
        seconds = _seconds(plugin, upstream, workload.queries, 3)
        rows.append(("swap removing 1 entry", f"in force {took * 1000:,.0f} ms after the "
                     f"rename; upstream queries since {upstream.queries() - before:,}; "
                     f"then {_per_second(seconds)}"))
        assert dnsbench.ask(plugin.server.port, other).answer
        assert "error" not in plugin.server.log(), plugin.server.log()
    _table("(d) shipped: the plugin reloads and flushes on a swap that adds entries", rows)
