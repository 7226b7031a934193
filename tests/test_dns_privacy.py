"""`netfilter serve dns` logs name no client and no queried name by default: a real
server (text lines, and `--log-format json`) asked by dig and dnspython from a client
address of the test's own, for blocked and clean names, over UDP and TCP, while its
upstream (a stub on loopback) answers, then stays silent, then is down. The log must
say what went wrong (the upstream faults' lines are there) and must not hold the
client's address, its source ports or any name asked.

(The proxy's side: tests/test_proxy_privacy.py. DNS has no setting that puts clients
in the log: `audit.client` says how the audit log records them, never the log lines.)
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from tests.dns_support import Netfilter
from tests.fault_support import StubUpstream
from tests.support import HOST, free_port, require_tools, wait_for

CLIENT = "127.0.0.79"  # the test's client address, never to be seen in the log
TIMEOUT = 1.0  # dns.timeout of the server
BLOCKED = "q7blk-privacy.blocked.example"  # the demo list blocks blocked.example
CLEAN = "q7cln-privacy.clean.test"
# what the log must never hold: the address, and every label the client asked
SECRETS = (CLIENT, "q7blk", "q7cln", "q7tcp", "q7flt")


class LoggedNetfilter(Netfilter):
    """`netfilter [--log-format FORMAT] serve dns` with audit.client at its default."""

    def __init__(self, directory: Path, upstream: str, fmt: str) -> None:
        super().__init__(directory, upstreams=[upstream], timeout=TIMEOUT)
        del self.config["audit"]["client"]  # the default, whatever it is
        self.fmt = fmt

    def command(self) -> list[str]:
        command = super().command()
        at = command.index("serve")
        return [*command[:at], "--log-format", self.fmt, *command[at:]]

    def spawn(self) -> None:
        self.conf.write_text(yaml.safe_dump(self.config), encoding="utf-8")
        super().spawn()


@pytest.fixture
def upstream() -> Iterator[StubUpstream]:
    stub = StubUpstream()
    try:
        yield stub
    finally:
        stub.close()


def dig(port: int, name: str, source_port: int, *options: str) -> str:
    """dig from CLIENT#source_port; its output."""
    done = subprocess.run(["dig", f"@{HOST}", "-p", str(port), "-b", f"{CLIENT}#{source_port}",
                           "+tries=1", f"+time={int(TIMEOUT) + 2}", *options, name, "A"],
                          capture_output=True, text=True, timeout=20, check=False)
    return done.stdout + done.stderr


def _traffic(node: Netfilter, upstream: StubUpstream) -> list[int]:
    """Blocked and clean names over UDP and TCP, while the upstream answers, is silent
    and is down: each answered as it should be; the client's source ports."""
    ports: list[int] = []

    def ask(name: str, expected: str, *options: str) -> None:
        ports.append(free_port())
        out = dig(node.port, name, ports[-1], *options)
        assert f"status: {expected}" in out, out

    ask(BLOCKED, "NXDOMAIN")
    ask(CLEAN, "NOERROR")
    ask(f"q7tcp.{BLOCKED}", "NXDOMAIN", "+tcp")
    ask(f"q7tcp-{CLEAN}", "NOERROR", "+tcp")
    answer = dns.query.udp(dns.message.make_query(f"q7cln-py.{CLEAN}", "A"), HOST,
                           port=node.port, timeout=TIMEOUT + 2, source=CLIENT)
    assert answer.rcode() == dns.rcode.NOERROR, answer
    def said(line: str) -> Callable[[], bool]:
        return lambda: line in node.log()

    for mode, line in (("silent", "did not answer within"),
                       ("down", "unreachable (ICMP error)")):
        upstream.switch(mode)
        ask(f"q7flt-{mode}-{CLEAN}", "SERVFAIL")
        ask(f"q7flt-{mode}.{BLOCKED}", "NXDOMAIN")  # blocks never need the upstream
        assert wait_for(said(line), 3), (mode, node.log())
        upstream.switch("answer")
    return ports


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_serve_dns_logs_no_client_and_no_name(tmp_path: Path, upstream: StubUpstream,
                                              fmt: str) -> None:
    require_tools("dig")
    node = LoggedNetfilter(tmp_path, upstream.address, fmt)
    node.start()
    try:
        ports = _traffic(node, upstream)
    finally:
        status = node.stop()
    log = node.log()
    assert status == 0, log
    lines = log.splitlines()
    # json: every line a record, the fault lines among their messages
    messages = [json.loads(line)["message"] for line in lines] if fmt == "json" else lines
    assert any("unreachable (ICMP error)" in m for m in messages), log
    assert any("did not answer within" in m for m in messages), log
    assert any("dns: stopped;" in m for m in messages), log
    for secret in SECRETS:
        assert secret not in log, (secret, log)
    for port in ports:
        assert not re.search(rf"\b{port}\b", log), (port, log)
