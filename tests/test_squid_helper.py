"""The Squid external ACL helper: its line protocol, its answers over the real engine
and demo bundle, and a real Squid (Debian `squid`) with curl in front of it: a blocked
URL sent to the node's stop page (451), a clean URL served by a loopback origin, an
HTTPS CONNECT to a blocked domain refused."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netfilter.config import load_config
from netfilter.node import make_engine
from netfilter.squid import SquidHelper, parse_lookup
from netfilter.squid.protocol import MAX_LINE, answer, parse_gate
from tests.proxy_support import Curl, Origin, write_config
from tests.squid_support import (
    NetfilterServe,
    Rig,
    Squid,
    helper_runtime,
    require_squid,
    set_listen,
    squid_directory,
)
from tests.support import HOST, read_events, wait_for

BLOCKED_URL = "partly.example/dir/secret.html"  # a URL-level entry of the demo list


# ---------------------------------------------------------------- protocol


@pytest.mark.parametrize(("line", "match"), [
    ("", "no channel id"),
    ("x 127.0.0.1 GET http://a.example/", "no channel id"),
    ("1234567890 - GET http://a.example/", "no channel id"),
    ("1 - GET", "expected 4 fields"),
    ("1 - GET http://a.example/ - extra", "expected 4 fields"),
    ("1 - G%20T http://a.example/", "bad method"),
])
def test_parse_lookup_refuses_bad_lines(line: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_lookup(line)


def test_parse_lookup_unescapes_and_ignores_squids_data_field() -> None:
    lookup = parse_lookup("7 127.0.0.1 get http://a.example/a%20b -")
    assert lookup == ("7", "127.0.0.1", "GET", "http://a.example/a b")
    assert parse_lookup("0 - CONNECT a.example:443").client is None


def test_answer_quotes_values() -> None:
    assert answer("3", "OK", message='a "b"\\\n') == b'3 OK message="a ?b???"\n'
    assert answer(None, "BH") == b"BH\n"


# ---------------------------------------------------------------- helper over the engine


@pytest.fixture
def helper(tmp_path: Path) -> Iterator[SquidHelper]:
    engine = make_engine(load_config(write_config(tmp_path)))
    yield SquidHelper(engine)
    engine.close()


def test_helper_blocks_listed_urls_and_connects_and_records_them(
        helper: SquidHelper, tmp_path: Path) -> None:
    out = [helper.lookup(line.encode()) for line in [
        f"0 127.0.0.1 GET http://{BLOCKED_URL}",
        "1 127.0.0.1 GET http://partly.example:8080/public/page.html?x=1",
        "2 127.0.0.1 CONNECT blocked.example:443",
        "3 127.0.0.1 CONNECT clean.test:443",
        "4 127.0.0.1 GET http://blocked.example/pic.png",
        "5 127.0.0.1 GET http://clean.example",
    ]]
    assert [line.split()[1] for line in out] == [b"OK", b"ERR", b"OK", b"ERR", b"OK", b"ERR"]
    assert b"DEMO-0003" in out[0]
    helper.engine.close()
    blocks = [e for e in read_events(tmp_path / "audit.sqlite") if e["type"] == "block"]
    assert {e["frontend"] for e in blocks} == {"squid"}
    assert len(blocks) == 3


@pytest.mark.parametrize("line", [
    b"", b"\n", b"\xff\xfe garbage", b"9 - GET not-a-url", b"9 - GET http:///nohost",
    b"9 - CONNECT", b"9 1.2.3.4 GET " + b"\x00" * 100, b"99 - POST ftp//x",
])
def test_helper_answers_bad_lines_bh_and_never_raises(helper: SquidHelper, line: bytes) -> None:
    reply = helper.lookup(line)
    assert reply.endswith(b"\n") and b" BH" in b" " + reply


def test_helper_bounds_line_length(helper: SquidHelper) -> None:
    long_line = b"5 - GET http://a.example/" + b"x" * (3 * MAX_LINE) + b"\n"
    stdin = io.BytesIO(long_line + f"6 - GET http://{BLOCKED_URL}\n".encode())
    stdout = io.BytesIO()
    helper.serve(stdin, stdout)
    assert stdout.getvalue().splitlines() == [
        b'5 BH message="netfilter: line too long"',
        b'6 OK message="netfilter: blocked (list demo, entry DEMO-0003)" '
        b'log="netfilter list=demo ref=DEMO-0003"',
    ]


@pytest.mark.parametrize(("line", "match"), [
    ("", "no channel id"), ("x a.example", "no channel id"), ("1", "expected 2 fields"),
    ("1 a.example - more", "expected 2 fields"), ("1 -", "no host"),
])
def test_parse_gate_refuses_bad_lines(line: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_gate(line)


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[SquidHelper]:
    engine = make_engine(load_config(write_config(tmp_path)))
    yield SquidHelper(engine, gate=True)
    engine.close()


def test_gate_asks_only_for_hosts_a_url_entry_or_a_domain_entry_can_block(
        gate: SquidHelper, tmp_path: Path) -> None:
    hosts = ["partly.example", "blocked.example", "www.blocked.example", "clean.test",
             "clean.example", "127.0.0.1", "PARTLY.example"]
    out = [gate.lookup(f"{n} {host}".encode()).split() for n, host in enumerate(hosts)]
    assert [line[:2] for line in out] == [
        [b"0", b"OK"], [b"1", b"OK"], [b"2", b"OK"], [b"3", b"ERR"], [b"4", b"ERR"],
        [b"5", b"ERR"], [b"6", b"OK"]]
    gate.engine.close()
    # the gate decides nothing: the ICAP server does, and records
    assert not [e for e in read_events(tmp_path / "audit.sqlite") if e["type"] == "block"]


@pytest.mark.parametrize("line", [b"", b"garbage", b"7 -", b"7 a.example b c", b"\xff\xfe",
                                  b"7 [::1", b"7 " + b"a" * 300])
def test_gate_asks_icap_when_it_cannot_judge(gate: SquidHelper, line: bytes) -> None:
    """A line it cannot read is OK (send it to ICAP, which decides and fails closed):
    BH or ERR would let the request pass unchecked."""
    reply = gate.lookup(line)
    assert reply.endswith(b"\n") and b" OK" in b" " + reply


def test_helper_script_runs_as_squid_starts_it(tmp_path: Path) -> None:
    """The addon file itself: lines in, answers out, exit at end of input."""
    config = write_config(tmp_path)
    lines = f"0 - GET http://{BLOCKED_URL}\n1 - GET http://clean.test/\nbad\n"
    done = subprocess.run([sys.executable, "addons/netfilter_squid.py", "--config", str(config)],
                          input=lines.encode(), capture_output=True, timeout=60, check=False,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert [r.split()[:2] for r in done.stdout.splitlines()] == [
        [b"0", b"OK"], [b"1", b"ERR"], [b"BH", b'message="netfilter:']]


def test_helper_script_names_a_bad_config(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "addons/netfilter_squid.py", "--config",
                           str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                          timeout=60, check=False, cwd=Path(__file__).parent.parent)
    assert done.returncode == 1
    assert "missing.yaml" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- a real Squid


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_squid()
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    with contextlib.ExitStack() as stack:
        runtime = stack.enter_context(helper_runtime())
        directory = squid_directory()
        config = runtime.config(directory)
        stop_port = set_listen(config, "stoppage")
        squid = Squid(directory, [
            "external_acl_type netfilter concurrency=50 children-max=2 children-startup=1 "
            f"ttl=0 negative_ttl=30 %>a %>rm %>ru {runtime.command(config)}",
            "acl netfilter_blocked external netfilter",
            "http_access deny netfilter_blocked",
            f"deny_info 307:http://{HOST}:{stop_port}/ netfilter_blocked",
            "http_access allow localhost",
            "http_access deny all",
        ], env=runtime.environment())
        stack.callback(squid.close)
        origin = Origin()
        stack.callback(origin.close)
        stop = NetfilterServe("stoppage", config, stop_port,
                              tmp_path_factory.mktemp("stop") / "stoppage.log")
        stack.callback(stop.stop)
        squid.start()
        stop.start()
        yield Rig(squid, origin, Curl(squid.url, tmp_path_factory.mktemp("curl")),
                  directory / "audit.sqlite", stop_port)


def test_squid_sends_a_blocked_url_to_the_stop_page_451(rig: Rig) -> None:
    url = f"http://partly.example:{rig.origin.port}/dir/secret.html"
    before = rig.origin.snapshot()
    first = rig.curl(url)
    assert first.status == 307, rig.explain()
    assert first.header("location") == f"http://{HOST}:{rig.stop_port}/"
    followed = rig.curl(url, "-L")
    assert followed.status == 451, rig.explain()
    assert "Test School IT" in followed.text  # the node's stop page, its operator
    assert rig.origin.snapshot() == before  # the origin never saw the blocked request
    assert "TCP_DENIED/307" in rig.squid.access_log()


def test_squid_serves_a_clean_url_from_the_origin(rig: Rig) -> None:
    result = rig.curl(f"http://partly.example:{rig.origin.port}/public/page.html?x=1")
    assert result.status == 200, rig.explain()
    assert result.text == "hello from the origin: /public/page.html?x=1\n"


def test_squid_refuses_https_connect_to_a_blocked_domain(rig: Rig) -> None:
    before = rig.origin.snapshot()
    result = rig.curl(f"https://blocked.example:{rig.origin.port}/")
    assert result.connect_status == 307, (result.stderr, rig.explain())
    assert result.status == 0
    assert rig.origin.snapshot() == before


def test_squid_blocks_are_recorded_by_the_engine(rig: Rig) -> None:
    assert rig.curl(f"http://blocked.example:{rig.origin.port}/pic.png").status == 307

    def recorded() -> bool:
        # the helper's audit log (the stop page's process writes to the same store)
        return any(e["type"] == "block" and e["frontend"] == "squid"
                   and e["ref"] == "DEMO-0001" for e in read_events(rig.audit))

    assert wait_for(recorded, bound=10.0), read_events(rig.audit)
