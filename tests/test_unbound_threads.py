"""The Unbound plugin in a real unbound with `num-threads: 2`: both workers run the
module, verdicts are right under concurrent calls, a list swap under load is seen by
every answer after it with none lost, and the audit log counts every block answered.

Load: WORKERS client threads, each query from a fresh UDP socket (dnspython), so
Unbound's per-thread `so-reuseport` sockets both get queries; `unbound-control
stats_noreset` shows each worker's cache misses (every query below but the cached
clean ones reaches the module). Names are unique per query where a verdict or a count
is checked, so Unbound never merges two clients' queries into one module call; the
one client that repeats names has one query in flight at a time.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.edns
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import yaml

from netfilter.audit.store import AuditStore
from netfilter.audit.verify import verify_log
from netfilter.keys import load_public_key
from tests.dns_support import Unbound, require_tools
from tests.support import HOST, REPO
from tests.test_unbound_plugin import UNBOUND_PYTHON
from tests.test_unbound_update import Authority, ControlledPlugin

WORKERS = 6  # client threads; one query in flight each
BEFORE = 2.0  # seconds of load before the swap
AFTER = 2.0  # seconds of load after both new verdicts were seen
BOUND = 10.0  # seconds from the rename to the new verdicts (README: ~1 s + load + flush)
MAX_QUERIES = 20_000  # per client thread, whatever the clock says
STOPPAGE = "192.0.2.80"
CANARY = "use-application-dns.net"

# name kind -> (address when clean, blocked before the swap, blocked after it)
KINDS = {
    "clean": ("192.0.2.10", False, False),  # clean.example, cached
    "partly": ("192.0.2.20", False, True),  # partly.example, cached until the flush
    "cleared": ("192.0.2.30", True, False),  # cleared.blocked.example
    "new-partly": ("192.0.2.20", False, True),  # w<k>-<i>.partly.example, unique
    "new-cleared": ("192.0.2.30", True, False),  # w<k>-<i>.cleared.blocked.example
}


class RedirectUpstream(Unbound):
    """The tests' upstream, also answering every name under partly.example and
    cleared.blocked.example (redirect zones), so unique names resolve."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        text = self.conf.read_text(encoding="utf-8").replace(
            '  local-zone: "example." static\n',
            '  local-zone: "example." static\n'
            '  local-zone: "partly.example." redirect\n'
            '  local-zone: "cleared.blocked.example." redirect\n')
        self.conf.write_text(text, encoding="utf-8")


class ThreadedPlugin(ControlledPlugin):
    """The plugin's unbound with two worker threads, one socket each (so-reuseport),
    importing netfilter from this checkout (`checkout_site`)."""

    name = "unbound-plugin-threads"

    def __init__(self, directory: Path, upstream: Unbound, netfilter_config: Path) -> None:
        super().__init__(directory, upstream, netfilter_config)
        text = self.conf.read_text(encoding="utf-8").replace(
            "  num-threads: 1\n", "  num-threads: 2\n  so-reuseport: yes\n")
        self.conf.write_text(text, encoding="utf-8")
        self.site = checkout_site(directory)

    def environment(self) -> dict[str, str]:
        return {**super().environment(), "NETFILTER_SITE_PACKAGES": str(self.site)}

    def stats(self) -> dict[str, int]:
        done = subprocess.run(["unbound-control", "-c", str(self.conf), "stats_noreset"],
                              capture_output=True, text=True, timeout=30, check=True)
        return {k: int(float(v)) for k, v in re.findall(r"^(\S+)=(\S+)$", done.stdout, re.M)}


def checkout_site(directory: Path) -> Path:
    """A site directory for the addon's NETFILTER_SITE_PACKAGES: this checkout's src
    first, then the venv's site-packages (whose editable install may name another
    checkout), so the unbound runs the code under test."""
    import site

    venv = site.getsitepackages()[0]
    path = directory / "site"
    path.mkdir(exist_ok=True)
    (path / "checkout.pth").write_text(
        f"{REPO / 'src'}\nimport site; site.addsitedir({venv!r})\n", encoding="utf-8")
    return path


@dataclass
class Answer:
    kind: str
    name: str
    sent: float
    received: float  # 0.0: no answer within the time-out (lost)
    rcode: int = -1
    addresses: tuple[str, ...] = ()
    ede: tuple[int, ...] = ()
    ede_text: str = ""

    @property
    def blocked(self) -> bool:
        return self.addresses == (STOPPAGE,) and self.ede == (dns.edns.EDECode.CENSORED,)

    @property
    def clean(self) -> bool:
        return self.addresses == (KINDS[self.kind][0],) and not self.ede


@dataclass
class Run:
    answers: list[Answer] = field(default_factory=list)
    swapped: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)
    canaries: int = 0
    log: str = ""
    directory: Path = Path()


def _ask(kind: str, name: str) -> Answer:
    query = dns.message.make_query(name, "A", use_edns=0)
    sent = time.monotonic()
    try:
        response = dns.query.udp(query, HOST, port=_PORT[0], timeout=2.0)
    except dns.exception.Timeout:
        return Answer(kind, name, sent, 0.0)
    errors = response.extended_errors()
    return Answer(kind, name, sent, time.monotonic(), response.rcode(),
                  tuple(sorted(r.to_text() for rrset in response.answer
                               if rrset.rdtype == dns.rdatatype.A for r in rrset)),
                  tuple(e.code for e in errors), errors[0].text or "" if errors else "")


_PORT = [0]


def _client(k: int, stop: threading.Event, out: list[Answer]) -> None:
    """Client 0 repeats the fixed names and the canary, one at a time; the others ask
    unique names, half to be blocked after the swap, half no longer."""
    fixed = itertools.cycle([("clean", "clean.example"), ("partly", "partly.example"),
                             ("cleared", "cleared.blocked.example"), ("canary", CANARY)])
    for i in range(MAX_QUERIES):
        if stop.is_set():
            return
        if k == 0:
            kind, name = next(fixed)
        elif i % 2:
            kind, name = "new-partly", f"w{k}-{i}.partly.example"
        else:
            kind, name = "new-cleared", f"w{k}-{i}.cleared.blocked.example"
        out.append(_ask(kind, name))


def _seen(answers: list[Answer], kind: str) -> float | None:
    """When the first answer with the post-swap verdict of `kind` arrived."""
    new = KINDS[kind][2]
    times = [a.received for a in answers if a.kind == kind and a.received
             and (a.blocked if new else a.clean)]
    return min(times, default=None)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    require_tools("unbound", "unbound-control")
    if not UNBOUND_PYTHON.exists():
        pytest.skip("Debian's python3-unbound (unboundmodule.py) is not installed")
    base = tmp_path_factory.mktemp("threads")
    authority = Authority(base)
    authority.install(["blocked.example"])
    (base / "upstream").mkdir()
    upstream = RedirectUpstream(base / "upstream")
    (base / "plugin").mkdir()
    config = base / "plugin" / "netfilter.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"id": "resolver-threads.example", "key": str(base / "plugin" / "node.key")},
        "lists": [{"path": str(authority.installed), "trust": [str(authority.public)],
                   "action": "stoppage"}],
        "dns": {"ede": 16, "block_ttl": 60, "canaries": True, "stoppage_ipv4": STOPPAGE},
        "audit": {"path": str(base / "plugin" / "audit.sqlite"), "client": "none",
                  "aggregate_window": 1.0},
    }), encoding="utf-8")
    plugin = ThreadedPlugin(base / "plugin", upstream, config)
    result = Run(directory=base / "plugin")
    with upstream, plugin:
        _PORT[0] = plugin.port
        stop = threading.Event()
        outs: list[list[Answer]] = [[] for _ in range(WORKERS)]
        clients = [threading.Thread(target=_client, args=(k, stop, outs[k]), daemon=True)
                   for k in range(WORKERS)]
        for client in clients:
            client.start()
        try:
            time.sleep(BEFORE)
            result.swapped = time.monotonic()
            authority.install(["partly.example"])  # blocked.example leaves, partly comes
            deadline = result.swapped + BOUND
            while time.monotonic() < deadline:
                answers = [a for out in outs for a in list(out)]
                if all(_seen(answers, kind) for kind in ("partly", "new-partly", "cleared")):
                    break
                time.sleep(0.1)
            time.sleep(AFTER)
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=10)
        result.stats = plugin.stats()
    result.log = plugin.log()  # stopped: deinit committed the log and wrote its counters
    result.answers = sorted((a for out in outs for a in out), key=lambda a: a.sent)
    result.canaries = sum(1 for a in result.answers if a.kind == "canary")
    yield result


def test_both_threads_run_the_module(run: Run) -> None:
    misses = [run.stats.get(f"thread{t}.num.cachemiss", 0) for t in (0, 1)]
    assert "thread1.num.queries" in run.stats and "thread2.num.queries" not in run.stats
    # every unique name is a cache miss, and went through the module on that thread
    assert min(misses) >= 0.1 * sum(misses), f"cache misses per thread: {misses}"


def test_no_answer_is_lost_or_servfail(run: Run) -> None:
    assert len(run.answers) > 200
    lost = [a for a in run.answers if not a.received]
    assert not lost, f"{len(lost)} of {len(run.answers)} lost, e.g. {lost[:3]}"
    failed = Counter(a.kind for a in run.answers if a.rcode != dns.rcode.NOERROR
                     and a.kind != "canary")
    assert not failed, f"not NOERROR: {failed}"
    assert "Traceback" not in run.log and "error" not in run.log.lower(), run.log


def test_verdicts_before_and_after_the_swap(run: Run) -> None:
    """Before the rename, the old verdict; after the first answer with the new verdict
    of a kind, every query of that kind sent later gets it; each kind gets it within
    BOUND."""
    for kind, (_, before, after) in KINDS.items():
        answers = [a for a in run.answers if a.kind == kind]
        early = [a for a in answers if a.received < run.swapped]
        assert early and all(a.blocked if before else a.clean for a in early), (
            kind, [a for a in early if not (a.blocked if before else a.clean)][:3])
        first = _seen(run.answers, kind)
        assert first is not None and first - run.swapped < BOUND, (kind, first)
        late = [a for a in answers if a.sent > first]
        wrong = [a for a in late if not (a.blocked if after else a.clean)]
        assert late and not wrong, f"{kind}: {len(wrong)} of {len(late)} old verdicts {wrong[:3]}"
    blocked = [a for a in run.answers if a.blocked]
    assert all(a.ede_text.startswith("UPD-") or "UPD-" in a.ede_text for a in blocked)


def test_canaries_are_counted_across_threads(run: Run) -> None:
    canaries = [a for a in run.answers if a.kind == "canary"]
    assert canaries and all(a.rcode == dns.rcode.NXDOMAIN for a in canaries)
    counters = _counters(run.log)
    assert counters["canaries"] == {"firefox_doh": run.canaries}
    assert counters["flushes"] >= 1 and counters["reloads"] == {"ok": 1}


def test_audit_log_counts_every_block_answered(run: Run) -> None:
    answered = sum(1 for a in run.answers if a.blocked)
    store = AuditStore(run.directory / "audit.sqlite", create=False)
    events = [json.loads(leaf.event) for leaf in store.leaves() if leaf.event]
    recorded = sum(e.get("count", 1) for e in events if e["type"] == "block")
    assert recorded == answered
    counters = _counters(run.log)
    assert sum(row[-1] for row in counters["matches"]) == answered  # one engine saw all
    assert counters["audit"]["shed"] == 0
    report = verify_log(store, load_public_key(run.directory / "node.pub"))
    assert report.ok and report.size == len(events), report


def _counters(log: str) -> dict[str, Any]:
    lines = [line for line in log.splitlines() if "netfilter: counters at exit: " in line]
    assert len(lines) == 1, log  # one plugin, one engine in the process
    counters: dict[str, Any] = json.loads(lines[0].split("netfilter: counters at exit: ", 1)[1])
    return counters
