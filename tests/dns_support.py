"""Helpers for the DNS front-end's integration tests: a real unbound as the upstream,
`netfilter serve dns` as a real subprocess, free loopback ports, real DNS clients.

Everything talks to 127.0.0.1 only. unbound is configured so that it can never recurse
to the internet: all data is local (`local-zone` / `local-data`), and anything outside
those zones is forwarded to a loopback port where nothing listens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import dns.exception
import dns.message
import dns.opcode
import dns.query
import yaml

from tests.support import (
    DEMO_ALLOW,
    DEMO_LIST,
    DEMO_PUB,
    HOST,
    ChildProcess,
    free_port,
    read_events,
    wait_for,
)
from tests.support import require_tools as _require_tools

__all__ = [
    "BIG_TXT",
    "DEMO_ALLOW",
    "DEMO_LIST",
    "DEMO_PUB",
    "HOST",
    "HUGE_TXT",
    "Netfilter",
    "Unbound",
    "build_list",
    "dig",
    "free_port",
    "mutate",
    "read_events",
    "require_tools",
    "running",
    "start_all",
    "tcp",
    "udp",
    "wait_for",
]


START_BOUND = 20.0  # seconds a server may take to answer its first query
STOP_BOUND = 8.0  # seconds a server may take to exit after SIGTERM


# ---------------------------------------------------------------- zone data

# Big TXT records: BIG_TXT's answer is >512 bytes (truncated over UDP without EDNS) but
# fits in 1232; HUGE_TXT's does not fit even in 1232 (unbound itself truncates over UDP).
BIG_TXT = [f"big-{i}-" + "b" * 190 for i in range(4)]
HUGE_TXT = [f"huge-{i:02d}-" + "h" * 190 for i in range(12)]

LOCAL_DATA = [
    "clean.example. 300 IN A 192.0.2.10",
    "clean.example. 300 IN AAAA 2001:db8::10",
    'clean.example. 300 IN TXT "clean text"',
    "clean.example. 300 IN HTTPS 1 . alpn=h2",
    "www.clean.example. 300 IN A 192.0.2.11",
    "alias.clean.example. 300 IN CNAME target.blocked.example.",
    "alias2.clean.example. 300 IN CNAME clean.example.",
    "alias3.clean.example. 300 IN CNAME x.stop.example.",
    "target.blocked.example. 300 IN A 192.0.2.66",
    "cleared.blocked.example. 300 IN A 192.0.2.30",
    "partly.example. 300 IN A 192.0.2.20",
    "clean.test. 300 IN A 192.0.2.40",
    *(f'big.clean.example. 300 IN TXT "{t}"' for t in BIG_TXT),
    *(f'huge.clean.example. 300 IN TXT "{t}"' for t in HUGE_TXT),
]


def _unbound_conf(directory: Path, port: int, dead_port: int) -> str:
    lines = [
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
        '  module-config: "iterator"',
        "  do-not-query-localhost: no",
        f"  outgoing-interface: {HOST}",
        "  minimal-responses: yes",
        '  local-zone: "example." static',
        '  local-zone: "test." static',
        '  local-zone: "invalid." static',
        *(f'  local-data: "{d}"' if '"' not in d else f"  local-data: '{d}'"
          for d in LOCAL_DATA),
        "remote-control:",
        "  control-enable: no",
        # Anything outside the local zones goes to a loopback port with nothing on it,
        # from a loopback address: this unbound never sends a query off the machine.
        "forward-zone:",
        '  name: "."',
        f"  forward-addr: {HOST}@{dead_port}",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- clients


def udp(message: dns.message.Message, port: int, timeout: float = 2.0,
        **kwargs: Any) -> dns.message.Message:
    return dns.query.udp(message, HOST, port=port, timeout=timeout, **kwargs)


def tcp(message: dns.message.Message, port: int, timeout: float = 2.0,
        **kwargs: Any) -> dns.message.Message:
    return dns.query.tcp(message, HOST, port=port, timeout=timeout, **kwargs)


def dig(port: int, *args: str, timeout: float = 10.0) -> str:
    """Run dig against 127.0.0.1:port (one try, 2 s) and return its output."""
    cmd = ["dig", f"@{HOST}", "-p", str(port), "+tries=1", "+time=2", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    return done.stdout + done.stderr


def _probe(port: int, message: dns.message.Message) -> bool:
    try:
        dns.query.udp(message, HOST, port=port, timeout=0.2)
    except (dns.exception.DNSException, OSError):
        return False
    return True


class _Process(ChildProcess):
    """A DNS server subprocess with its output in a file; started once it answers."""

    name = "server"
    start_bound = START_BOUND
    stop_bound = STOP_BOUND

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.log_path = directory / f"{self.name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def probe_message(self) -> dns.message.Message:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        return None  # the test's own

    def spawn(self) -> None:
        self.popen(self.command(), env=self.environment(), cwd=self.directory)

    def wait_ready(self) -> None:
        """Query it until it answers (bounded); RuntimeError with its output otherwise."""
        probe = self.probe_message()
        self.wait_until(lambda: _probe(self.port, probe))

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    def __enter__(self) -> _Process:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if exc[0] is not None:
            print(f"----- {self.name} stderr ({self.log_path}) -----\n{self.log()}",
                  file=sys.stderr)


class Unbound(_Process):
    """unbound in the foreground on a free loopback port, serving LOCAL_DATA."""

    name = "unbound"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, free_port())
        self.dead_port = free_port()
        self.conf = directory / "unbound.conf"
        self.conf.write_text(_unbound_conf(directory, self.port, self.dead_port),
                             encoding="utf-8")

    def command(self) -> list[str]:
        return ["unbound", "-d", "-c", str(self.conf)]

    def probe_message(self) -> dns.message.Message:
        return dns.message.make_query("clean.example", "A")

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


class Netfilter(_Process):
    """`netfilter serve dns --config <dir>/nf.yaml` on a free loopback port."""

    name = "netfilter"

    def __init__(self, directory: Path, *, upstreams: Sequence[str],
                 lists: Sequence[dict[str, Any]] | None = None,
                 local: dict[str, Any] | None = None, audit_client: str = "truncated",
                 env: dict[str, str] | None = None, ipv6: bool = False,
                 audit: dict[str, Any] | None = None, **dns_settings: Any) -> None:
        """`env`: extra environment; `ipv6`: listen on [::1] too, same port; `audit`:
        more keys of the audit section (e.g. `aggregate_window: 0`). One DNS process
        unless `workers` is given: what these tests read (the server's counters in its
        log, its caches and limits) is then the whole node's (tests/test_dns_workers.py
        covers several)."""
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory, free_port())
        self.env = env or {}
        self.ipv6 = ipv6
        if lists is None:
            lists = [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)], "action": "nxdomain"}]
        self.events_path = directory / "audit.sqlite"
        self.config: dict[str, Any] = {
            "node": {"id": "dns-test"},
            "lists": list(lists),
            "local": local or {},
            "dns": {"listen": self._listen(), "upstreams": list(upstreams), "workers": 1,
                    **dns_settings},
            "audit": {"path": str(directory / "audit.sqlite"), "client": audit_client,
                      **(audit or {})},
        }
        self.conf = directory / "nf.yaml"
        self.conf.write_text(yaml.safe_dump(self.config), encoding="utf-8")

    def _listen(self) -> list[str]:
        return [f"{HOST}:{self.port}"] + ([f"[::1]:{self.port}"] if self.ipv6 else [])

    def command(self) -> list[str]:
        return [sys.executable, "-m", "netfilter.cli", "serve", "dns", "--config",
                str(self.conf)]

    def environment(self) -> dict[str, str] | None:
        return {**os.environ, **self.env} if self.env else None

    def wait_ready(self) -> None:
        """It answers on its first address, and has said it serves on every one (the
        first may answer while the others, [::1] say, are still being opened)."""
        super().wait_ready()
        self.wait_until(lambda: "netfilter: serving" in self.log())

    def probe_message(self) -> dns.message.Message:
        # A STATUS query is answered NOTIMP locally: no upstream, no event.
        message = dns.message.make_query("probe.invalid", "A")
        message.set_opcode(dns.opcode.STATUS)
        return message

    def start(self) -> None:
        for attempt in range(3):  # the free port may have been taken meanwhile
            if attempt:
                self.port = free_port()
                self.config["dns"]["listen"] = self._listen()
                self.conf.write_text(yaml.safe_dump(self.config), encoding="utf-8")
            self.spawn()
            try:
                self.wait_ready()
                return
            except RuntimeError:
                if "already in use" not in self.log().lower() or attempt == 2:
                    raise


def start_all(servers: Sequence[_Process]) -> None:
    """Start several servers at once (their imports overlap), each checked ready."""
    for server in servers:
        server.spawn()
    try:
        for server in servers:
            try:
                server.wait_ready()
            except RuntimeError:
                if "already in use" not in server.log().lower():
                    raise
                server.stop()
                server.start()  # retries on new ports
    except BaseException:
        for server in servers:
            server.stop()
        raise


def build_list(directory: Path, key: Any, list_id: str, entries: Sequence[dict[str, str]],
               *, issuer: str = "Test Authority") -> Path:
    """A signed bundle from domain/url entries (the authority's own code path)."""
    from netfilter.listfile import build_bundle

    source = {
        "issuer": issuer,
        "legal_basis": "Test Act s. 1",
        "contact": "mailto:appeals@authority.test",
        "appeal_url": "https://appeals.authority.test/",
        "entries": list(entries),
    }
    src = directory / f"{list_id}.yaml"
    src.write_text(yaml.safe_dump(source, allow_unicode=True), encoding="utf-8")
    out = directory / f"{list_id}.nfl"
    build_bundle(src, out, key=key, list_id=list_id, version=1)
    return out



_Server = TypeVar("_Server", bound="Netfilter")


@contextmanager
def running(server: _Server) -> Iterator[_Server]:
    """`server` started, stopped at the end; its stderr shown when the block fails."""
    server.start()
    try:
        yield server
    except BaseException:
        print(f"----- netfilter stderr -----\n{server.log()}", file=sys.stderr)
        raise
    finally:
        server.stop()


def require_tools(*tools: str) -> None:
    """Skip (with the reason) when a command-line tool the tests drive is missing."""
    _require_tools(*tools, why="Debian: apt-get install dnsutils unbound; the DNS "
                               "integration tests need them")


def mutate(seed: bytes, edits: list[tuple[int, int, str]]) -> bytes:
    """`seed` with each (position, value, kind) edit applied: x flips a bit, s sets a
    byte, d deletes 1-4 bytes, i inserts one, anything else cuts the rest off."""
    data = bytearray(seed)
    for position, value, kind in edits:
        at = position % (len(data) + 1)
        if kind == "x" and at < len(data):
            data[at] ^= 1 << (value % 8)
        elif kind == "s" and at < len(data):
            data[at] = value
        elif kind == "d":
            del data[at : at + value % 4 + 1]
        elif kind == "i":
            data[at:at] = bytes([value])
        else:
            del data[at:]
    return bytes(data)
