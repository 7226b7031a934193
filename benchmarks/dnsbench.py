"""Helpers of the DNS throughput benchmarks: the workload, the servers, dnsperf.

Everything runs on 127.0.0.1 only. The upstream is an unbound that answers every name
of the query set from `local-data` (anything else goes to a dead loopback port); the
servers under test forward to it. Every wait is bounded: servers must answer within
START_BOUND, exit within STOP_BOUND of SIGTERM (else they are killed), and dnsperf is
killed if it overruns its own time limit by more than a margin.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import yaml
from tests.support import ChildProcess, free_port

from netfilter.keys import generate_keypair, load_private_key
from netfilter.listfile import build_bundle

__all__ = [
    "HOST",
    "PerfResult",
    "Server",
    "Workload",
    "ask",
    "audit_path",
    "count_blocks",
    "expected_blocks",
    "free_port",
    "make_workload",
    "missing_tools",
    "netfilter_config",
    "netfilter_server",
    "parse_dnsperf",
    "process_cpu",
    "run_dnsperf",
    "sanity_problems",
    "settled_blocks",
    "stderr_problems",
    "unbound_localzone",
    "unbound_plugin",
    "unbound_upstream",
]

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "addons" / "unbound_netfilter.py"
VENV = REPO / ".venv"
SYSTEM_PYTHON_PACKAGES = "/usr/lib/python3/dist-packages"  # unboundmodule (python3-unbound)

START_BOUND = 30.0  # seconds a server may take to answer its first query
STOP_BOUND = 5.0  # seconds a server may take to exit after SIGTERM (unbound takes >1 s)
DNSPERF_MARGIN = 30.0  # seconds dnsperf may run past -l (its -t timeout, start-up)
TTL = 3600  # of the local data: nothing expires during a run
STOPPAGE_V4, STOPPAGE_V6 = "127.0.0.1", "::1"  # netfilter's defaults


def missing_tools() -> list[str]:
    """The external programs these benchmarks need that are not installed."""
    missing = [t for t in ("dnsperf", "unbound") if shutil.which(t) is None]
    if not Path(SYSTEM_PYTHON_PACKAGES, "unboundmodule.py").exists():
        missing.append("python3-unbound")
    return missing


# ---------------------------------------------------------------- the workload


@dataclass
class Workload:
    """A signed list, the query file and the upstream's local data, on disk."""

    directory: Path
    bundle: Path
    public_key: Path
    blocked_domains: list[str]  # the list's entries (domains)
    queries: Path  # dnsperf input: `name TYPE` per line
    lines: int
    blocked_lines: int  # lines whose name is under a blocked domain
    local_data: list[str]  # the upstream's records, for every name of the query file
    clean_sample: tuple[str, str]  # (name, its A address)
    blocked_sample: str  # a blocked name the upstream answers with 192.0.2.66


def _clean_address(i: int) -> tuple[str, str]:
    # RFC 2544 benchmarking range and the RFC 3849 documentation prefix.
    return f"198.18.{i >> 8 & 255}.{i & 255}", f"2001:db8::{i:x}"


def make_workload(directory: Path, *, entries: int = 1000, lines: int = 20_000,
                  blocked_share: float = 0.01, seed: int = 20261124) -> Workload:
    """Key, YAML source and bundle of `entries` domains `blocked<i>.example`; query file.

    Clean lines are A and AAAA queries of `c<i>.clean.example` (each name both types);
    blocked lines are A/AAAA queries of a blocked domain or its `www.` subdomain.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    key_path, pub_path = generate_keypair(directory / "authority")
    blocked = [f"blocked{i}.example" for i in range(entries)]
    source = {
        "issuer": "DNS benchmark authority (synthetic)",
        "legal_basis": "Benchmark only: synthetic list of reserved names",
        "contact": "mailto:appeals@authority.example",
        "entries": [{"domain": d, "ref": f"BENCH-{i:05d}", "category": "benchmark"}
                    for i, d in enumerate(blocked)],
    }
    source_path = directory / "bench-source.yaml"
    source_path.write_text(yaml.safe_dump(source, sort_keys=False), encoding="utf-8")
    bundle = directory / "bench.nfl"
    build_bundle(source_path, bundle, key=load_private_key(key_path), list_id="dns-bench",
                 version=1)

    blocked_lines = round(lines * blocked_share)
    clean_names = (lines - blocked_lines + 1) // 2
    query_lines: list[str] = []
    local_data: list[str] = []
    for i in range(clean_names):
        name = f"c{i}.clean.example"
        v4, v6 = _clean_address(i)
        local_data += [f"{name}. {TTL} IN A {v4}", f"{name}. {TTL} IN AAAA {v6}"]
        query_lines += [f"{name} A", f"{name} AAAA"]
    query_lines = query_lines[: lines - blocked_lines]
    blocked_names: set[str] = set()
    for _ in range(blocked_lines):
        name = rng.choice(blocked)
        if rng.random() < 0.5:
            name = "www." + name
        blocked_names.add(name)
        query_lines.append(f"{name} {rng.choice(('A', 'AAAA'))}")
    for name in sorted(blocked_names):  # the upstream knows them: it does not filter
        local_data += [f"{name}. {TTL} IN A 192.0.2.66", f"{name}. {TTL} IN AAAA 2001:db8::66"]
    rng.shuffle(query_lines)
    queries = directory / "queries.txt"
    queries.write_text("\n".join(query_lines) + "\n", encoding="ascii")
    return Workload(directory, bundle, pub_path, blocked, queries, len(query_lines),
                    blocked_lines, local_data, ("c0.clean.example", _clean_address(0)[0]),
                    sorted(blocked_names)[0])


def netfilter_config(workload: Workload, path: Path, *, listen_port: int | None,
                     upstream_port: int) -> Path:
    """A netfilter YAML: the bench list (stoppage), audit JSON lines beside `path`."""
    stem = path.stem
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "node": {"id": "dns-bench", "key": str(path.parent / f"{stem}-node.key")},
        "lists": [{"path": str(workload.bundle), "trust": [str(workload.public_key)],
                   "action": "stoppage"}],
        # one process: these figures are one Python process's (test_dns_workers.py
        # sets dns.workers to compare 1 and 2)
        "dns": {"upstreams": [f"{HOST}:{upstream_port}"], "timeout": 2.0, "workers": 1},
        # Aggregation windows of 1 s: a run's block counts reach the log within about
        # two seconds (the C relay hands its counts over every second), for the checks.
        "audit": {"path": str(audit_path(path)), "client": "none", "aggregate_window": 1.0},
    }
    if listen_port is not None:
        config["dns"]["listen"] = [f"{HOST}:{listen_port}"]
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def audit_path(config: Path) -> Path:
    """The audit log path that `netfilter_config` writes into the config."""
    return config.parent / f"{config.stem}-audit.sqlite"


# ---------------------------------------------------------------- unbound configs


def _server_lines(directory: Path, port: int) -> list[str]:
    return [
        "server:",
        "  do-daemonize: no",
        '  username: ""',
        '  chroot: ""',
        f'  directory: "{directory}"',
        '  pidfile: ""',
        "  use-syslog: no",
        '  logfile: ""',
        "  verbosity: 0",
        f"  interface: {HOST}@{port}",
        f"  port: {port}",
        "  access-control: 127.0.0.0/8 allow",
        "  do-ip6: no",
        "  num-threads: 1",
        # Room for every answer of the query set (the defaults, 4m/4m, are not).
        "  msg-cache-size: 64m",
        "  rrset-cache-size: 128m",
        "  do-not-query-localhost: no",
        "  minimal-responses: yes",
    ]


def _tail(forward_port: int) -> list[str]:
    return [
        "remote-control:",
        "  control-enable: no",
        "forward-zone:",
        '  name: "."',
        f"  forward-addr: {HOST}@{forward_port}",
    ]


def upstream_conf(workload: Workload, directory: Path, port: int, dead_port: int) -> str:
    """The upstream: every name of the query set from local data; the rest to a dead port."""
    lines = [
        *_server_lines(directory, port),
        '  module-config: "iterator"',
        '  local-zone: "example." static',
        *(f'  local-data: "{d}"' for d in workload.local_data),
        *_tail(dead_port),
    ]
    return "\n".join(lines) + "\n"


def plugin_conf(directory: Path, port: int, upstream_port: int) -> str:
    """Unbound with the netfilter module in front of the iterator, forwarding upstream."""
    lines = [
        *_server_lines(directory, port),
        '  module-config: "python iterator"',
        '  local-zone: "example." nodefault',
        "python:",
        f'  python-script: "{PLUGIN}"',
        *_tail(upstream_port),
    ]
    return "\n".join(lines) + "\n"


def localzone_conf(workload: Workload, directory: Path, port: int, upstream_port: int) -> str:
    """The same names blocked natively: `redirect` zones answering the stoppage addresses."""
    zones: list[str] = []
    for name in workload.blocked_domains:
        zones += [f'  local-zone: "{name}." redirect',
                  f'  local-data: "{name}. 300 IN A {STOPPAGE_V4}"',
                  f'  local-data: "{name}. 300 IN AAAA {STOPPAGE_V6}"']
    lines = [
        *_server_lines(directory, port),
        '  module-config: "iterator"',
        '  local-zone: "example." nodefault',
        *zones,
        *_tail(upstream_port),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- servers


def ask(port: int, name: str, rdtype: str = "A", timeout: float = 2.0) -> dns.message.Message:
    """One UDP query with dnspython (no retries)."""
    query = dns.message.make_query(name, rdtype)
    return dns.query.udp(query, HOST, port=port, timeout=timeout)


def _addresses(message: dns.message.Message, rdtype: str) -> list[str]:
    kind = dns.rdatatype.from_text(rdtype)
    return sorted(rd.to_text() for rrset in message.answer if rrset.rdtype == kind
                  for rd in rrset)


def sanity_problems(port: int, workload: Workload, *, filtering: bool) -> list[str]:
    """One query per case: clean names answered from the upstream's data; blocked names
    answered with the stoppage addresses by a filtering server, with the upstream's
    data by the upstream itself. Returns what was wrong (empty: all good)."""
    clean, clean_v4 = workload.clean_sample
    domain = workload.blocked_domains[0]
    v4, v6 = (STOPPAGE_V4, STOPPAGE_V6) if filtering else ("192.0.2.66", "2001:db8::66")
    cases = [(clean, "A", [clean_v4]), (clean, "AAAA", ["2001:db8::"]),
             (workload.blocked_sample, "A", [v4]), (workload.blocked_sample, "AAAA", [v6])]
    if filtering:  # a domain entry blocks its subdomains; the upstream does not know these
        cases += [(domain, "A", [v4]), (f"www.{domain}", "AAAA", [v6])]
    problems = []
    for name, rdtype, want in cases:
        try:
            answer = ask(port, name, rdtype)
        except (dns.exception.DNSException, OSError) as e:
            problems.append(f"{name} {rdtype}: no answer ({e!r})")
            continue
        got = _addresses(answer, rdtype)
        if answer.rcode() != 0 or got != want:
            problems.append(f"{name} {rdtype}: rcode {answer.rcode()}, {got} (want {want})")
    return problems


@dataclass
class Server(ChildProcess):
    """A server subprocess with its output in a file; started when it answers."""

    name: str
    command: list[str]
    port: int
    directory: Path
    env: dict[str, str] = field(default_factory=dict)
    probe_name: str = "c0.clean.example"
    audit: Path | None = None  # netfilter's audit log (events), for the filtering servers
    proc: subprocess.Popen[bytes] | None = None

    start_bound = START_BOUND
    stop_bound = STOP_BOUND

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.stderr"

    def start(self) -> Server:
        self.popen(self.command, env={**os.environ, **self.env}, cwd=self.directory)
        self.wait_until(self._answers, pause=0.1)
        return self

    def _answers(self) -> bool:
        try:
            ask(self.port, self.probe_name, timeout=0.5)
        except (dns.exception.DNSException, OSError):
            return False
        return True

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _unbound(name: str, directory: Path, port: int, conf: str,
             env: dict[str, str] | None = None) -> Server:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.conf"
    path.write_text(conf, encoding="utf-8")
    checked = subprocess.run(["unbound-checkconf", str(path)], capture_output=True, text=True,
                             timeout=60, check=False, env={**os.environ, **(env or {})})
    if checked.returncode != 0:
        raise RuntimeError(f"unbound-checkconf {path}: {checked.stdout}{checked.stderr}")
    return Server(name, ["unbound", "-d", "-c", str(path)], port, directory, env or {})


def unbound_upstream(workload: Workload, directory: Path) -> Server:
    port = free_port()
    return _unbound("upstream", directory, port,
                    upstream_conf(workload, directory, port, free_port()))


def unbound_plugin(workload: Workload, directory: Path, upstream_port: int) -> Server:
    port = free_port()
    config = netfilter_config(workload, directory / "plugin-netfilter.yaml", listen_port=None,
                              upstream_port=upstream_port)
    env = {"NETFILTER_CONFIG": str(config), "PYTHONPATH": SYSTEM_PYTHON_PACKAGES}
    server = _unbound("unbound-plugin", directory, port,
                      plugin_conf(directory, port, upstream_port), env)
    server.audit = audit_path(config)
    return server


def unbound_localzone(workload: Workload, directory: Path, upstream_port: int) -> Server:
    port = free_port()
    return _unbound("unbound-localzone", directory, port,
                    localzone_conf(workload, directory, port, upstream_port))


def netfilter_server(workload: Workload, directory: Path, upstream_port: int, *,
                     python_listener: bool = False) -> Server:
    """`netfilter serve dns`: UDP by the C relay, or by the Python listener
    (NETFILTER_DNS_PYTHON=1, what runs where the extension is not built)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = netfilter_config(workload, directory / "netfilter.yaml", listen_port=port,
                              upstream_port=upstream_port)
    command = [str(VENV / "bin" / "netfilter"), "serve", "dns", "--config", str(config)]
    if python_listener:
        return Server("netfilter-python", command, port, directory,
                      {"NETFILTER_DNS_PYTHON": "1"}, audit=audit_path(config))
    return Server("netfilter", command, port, directory, audit=audit_path(config))


def bare_forwarder(directory: Path, upstream_port: int) -> Server:
    """benchmarks/bare_forwarder.py: forwarding alone in Python on uvloop (the floor)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [str(VENV / "bin" / "python"), str(Path(__file__).with_name("bare_forwarder.py")),
               str(port), str(upstream_port)]
    return Server("bare-forwarder", command, port, directory)


# ---------------------------------------------------------------- dnsperf


@dataclass
class PerfResult:
    server: str
    qps: float
    sent: int
    completed: int
    lost: int
    rcodes: dict[str, int]
    seconds: float
    output: str
    server_cpu: float = 0.0  # the server's CPU time over the run, in cores (1.0 = one core)
    client_cpu: float = 0.0  # dnsperf's, likewise
    server_system: float = 0.0  # the part of server_cpu spent in the kernel
    max_qps: int = 0  # the -Q of the run


_FIELDS = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
    "seconds": re.compile(r"Run time \(s\):\s+([\d.]+)"),
}


def parse_dnsperf(server: str, output: str) -> PerfResult:
    values: dict[str, float] = {}
    for key, pattern in _FIELDS.items():
        found = pattern.search(output)
        if found is None:
            raise RuntimeError(f"dnsperf output has no {key!r}:\n{output}")
        values[key] = float(found.group(1))
    rcodes: dict[str, int] = {}
    codes = re.search(r"Response codes:\s+(.*)", output)
    if codes:
        for code, count in re.findall(r"([A-Z]+) (\d+) \(", codes.group(1)):
            rcodes[code] = int(count)
    return PerfResult(server, values["qps"], int(values["sent"]), int(values["completed"]),
                      int(values["lost"]), rcodes, values["seconds"], output)


def process_cpu_parts(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a running process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process so far."""
    return sum(process_cpu_parts(pid))


def run_dnsperf(server: Server, queries: Path, *, seconds: float = 5, clients: int = 4,
                max_qps: int = 300_000, runs: int | None = None,
                timeout: float = 5.0) -> PerfResult:
    """dnsperf against `server` for `seconds` (or `runs` passes of the file), parsed.

    A query is lost when no answer came within `timeout` (dnsperf's default, 5 s).
    """
    assert server.proc is not None and server.alive(), (
        f"{server.name} is not running (exit status "
        f"{server.proc.returncode if server.proc else None}); its stderr:\n{server.log()}")
    command = ["dnsperf", "-s", HOST, "-p", str(server.port), "-d", str(queries),
               "-c", str(clients), "-Q", str(max_qps), "-t", f"{timeout:g}"]
    if runs is not None:
        command += ["-n", str(runs)]
    command += ["-l", f"{seconds:g}"]
    user_before, system_before = process_cpu_parts(server.proc.pid)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          timeout=seconds + timeout + DNSPERF_MARGIN)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n"
                           f"{done.stdout}{done.stderr}")
    result = parse_dnsperf(server.name, done.stdout)
    user_after, system_after = process_cpu_parts(server.proc.pid)
    result.server_cpu = (user_after + system_after - user_before - system_before) / wall
    result.server_system = (system_after - system_before) / wall
    result.client_cpu = (after.ru_utime + after.ru_stime
                         - children.ru_utime - children.ru_stime) / wall
    result.max_qps = max_qps
    return result


def _blocks(line: str) -> int:
    """The blocks one event stands for: an aggregated block event carries `count`."""
    event = json.loads(line)
    return int(event.get("count") or 1) if event.get("type") == "block" else 0


def count_blocks(audit: Path) -> int:
    """Blocks netfilter recorded for the audit path `audit` (block events, each with
    its count: aggregation folds repeats into one event): rows of the SQLite audit log
    there, plus lines of the interim JSON-lines file beside it, if any."""
    count = 0
    jsonl = audit.with_suffix(".jsonl")
    if jsonl.exists():
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            count += _blocks(line)
    if audit.exists():
        db = sqlite3.connect(f"file:{audit}?mode=ro", uri=True, timeout=10)
        try:
            has_leaves = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                    "AND name = 'leaves'").fetchone()
            if has_leaves:
                for (event,) in db.execute("SELECT event FROM leaves WHERE event IS NOT NULL"):
                    count += _blocks(event)
        finally:
            db.close()
    return count


def settled_blocks(audit: Path, want: int, bound: float = 10.0) -> int:
    """count_blocks once it reaches `want` or stops growing (the audit log commits in
    batches on a writer thread), waiting at most `bound` seconds."""
    deadline = time.monotonic() + bound
    last, since = count_blocks(audit), time.monotonic()
    while last < want and time.monotonic() < deadline:
        time.sleep(0.1)
        now = count_blocks(audit)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 3.0:  # the relay records counts every second
            break
    return last


def expected_blocks(workload: Workload, sent: int) -> int:
    """Blocked queries among the first `sent` queries dnsperf reads (it reads in order)."""
    passes, rest = divmod(sent, workload.lines)
    lines = workload.queries.read_text(encoding="ascii").splitlines()[:rest]
    return passes * workload.blocked_lines + sum(1 for line in lines if "blocked" in line)


def stderr_problems(server: Server) -> list[str]:
    """Lines of a server's stderr that report errors or tracebacks."""
    flags = ("Traceback", "ERROR", "error:", "Exception", "CRITICAL")
    return [line for line in server.log().splitlines() if any(f in line for f in flags)]
