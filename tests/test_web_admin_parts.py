"""The dashboard's parts one by one: `netfilter user add` (the real entry point in a
child process), the accounts and session key files, who counts as loopback, the
dashboard app asked by a client that is not on loopback (httpx's ASGI transport: a
loopback socket cannot have such a peer), and each bound (sessions, login failures,
password checks waiting, the error ring) holding.
"""

from __future__ import annotations

import asyncio
import json
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from netfilter.config import Settings, WebSettings, load_config
from netfilter.engine import Engine
from netfilter.node import make_engine
from netfilter.web import admin
from netfilter.web.accounts import Accounts, session_secret
from netfilter.web.admin import AdminSite, ErrorRing, LoginLimiter, Sessions, _loopback
from netfilter.web.app import build_app
from tests.support import DEMO_LIST, DEMO_PUB

TOKEN = re.compile(r'name="token" value="([^"]+)"')


def _config(tmp_path: Path, **web: object) -> Path:
    data: dict[str, object] = {
        "node": {"id": "admin-parts.example", "key": str(tmp_path / "var" / "node.key")},
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
        "audit": {"path": str(tmp_path / "var" / "audit.sqlite")},
    }
    if web:
        data["web"] = web
    path = tmp_path / "netfilter.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _user(config: Path, *args: str, password: str = "a good password\n"
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netfilter.cli", "user", *args,
                           "--config", str(config)], input=password, capture_output=True,
                          text=True, timeout=60)


def _one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netfilter: error: "), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    for word in words:
        assert word in lines[0], (word, lines[0])


# ------------------------------------------------------------ netfilter user add


def test_user_add_makes_a_private_argon2id_account(tmp_path: Path) -> None:
    config = _config(tmp_path)
    done = _user(config, "add", "alice")
    assert done.returncode == 0, done.stderr
    path = tmp_path / "var" / "admin-accounts.json"
    assert f"added account alice in {path}" in done.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())["accounts"]["alice"]
    assert stored.startswith("$argon2id$") and "a good password" not in path.read_text()
    accounts = Accounts.for_settings(load_config(config))
    assert accounts.verify("alice", "a good password")
    assert not accounts.verify("alice", "a good password ")
    assert not accounts.verify("bob", "a good password")
    assert _user(config, "list").stdout == "alice\n"


def test_user_add_refuses_a_duplicate_unless_replacing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert _user(config, "add", "alice").returncode == 0
    _one_line_error(_user(config, "add", "alice", password="another one\n"),
                    "alice", "exists already")
    accounts = Accounts.for_settings(load_config(config))
    assert accounts.verify("alice", "a good password")  # unchanged
    done = _user(config, "add", "alice", "--replace", password="another one\n")
    assert done.returncode == 0 and "new password for account alice" in done.stdout
    assert accounts.verify("alice", "another one")
    assert not accounts.verify("alice", "a good password")


def test_user_add_mistakes_are_one_line_and_exit_2(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _one_line_error(_user(config, "add", "alice", password="\n"), "password must be")
    _one_line_error(_user(config, "add", "alice", password=""), "password must be")
    _one_line_error(_user(config, "add", "not a name"), "not an account name")
    _one_line_error(_user(tmp_path / "missing.yaml", "add", "alice"), "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("node: [\n", encoding="utf-8")
    _one_line_error(_user(broken, "add", "alice"), "broken.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("web: {admin: yes}\n", encoding="utf-8")
    _one_line_error(_user(unknown, "add", "alice"), "unknown key")
    # an accounts path that cannot be written (a directory where the file should be)
    blocked = _config(tmp_path, accounts="taken")
    (tmp_path / "taken").mkdir()
    _one_line_error(_user(blocked, "add", "alice"), "taken")
    assert not (tmp_path / "var" / "admin-accounts.json").exists()


def test_a_configured_accounts_file_is_used(tmp_path: Path) -> None:
    config = _config(tmp_path, accounts="private/operators.json")
    assert _user(config, "add", "alice").returncode == 0
    path = tmp_path / "private" / "operators.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Accounts.for_settings(load_config(config)).path == path


def test_the_session_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    settings = load_config(_config(tmp_path))
    first = session_secret(settings)
    path = tmp_path / "var" / "admin-session.key"
    assert len(first) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert session_secret(settings) == first


# ------------------------------------------------------------ loopback only


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("192.0.2.7", False), ("10.0.0.1", False), ("2001:db8::1", False),
    ("::ffff:192.0.2.7", False), ("0.0.0.0", False), ("testclient", False), ("", False),
    (None, False)])
def test_who_is_on_loopback(host: str | None, loopback: bool) -> None:
    assert _loopback(host) is loopback


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[tuple[Settings, Engine]]:
    settings = load_config(_config(tmp_path))
    made = make_engine(settings)
    try:
        yield settings, made
    finally:
        made.close()


def _ask(site: AdminSite, peer: str, steps: list[tuple[str, str, dict[str, str]]],
         headers: dict[str, str]) -> list[httpx.Response]:
    """Requests to the dashboard's app as the client at `peer` (cookies kept)."""
    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=build_app(site.routes()), client=(peer, 40000))
        out = []
        async with httpx.AsyncClient(transport=transport, base_url="http://filter.test",
                                     headers=headers) as client:
            for method, path, data in steps:
                if "token" in data:
                    found = TOKEN.search(out[-1].text)
                    data = data | {"token": found.group(1) if found else ""}
                out.append(await client.request(method, path, data=data or None))
        return out

    return asyncio.run(run())


LOGIN = [("GET", "/admin/login", {}),
         ("POST", "/admin/login", {"token": "", "username": "alice",
                                   "password": "a good password"}),
         ("GET", "/admin/", {})]


def test_a_client_not_on_loopback_is_refused_whatever_it_claims(
        engine: tuple[Settings, Engine]) -> None:
    settings, running = engine
    Accounts.for_settings(settings).add("alice", "a good password")
    site = AdminSite(settings, running)
    try:
        claims = {"Origin": "http://filter.test", "X-Forwarded-For": "127.0.0.1",
                  "X-Real-IP": "127.0.0.1", "Forwarded": "for=127.0.0.1"}
        answers = _ask(site, "192.0.2.7", LOGIN, claims)
        assert [a.status_code for a in answers] == [403, 403, 403]
        assert "serves loopback only" in answers[0].text
        assert "netfilter_admin" not in answers[1].headers.get("set-cookie", "")
        # the same steps from loopback log in (the claims change nothing either way)
        answers = _ask(site, "127.0.0.1", LOGIN, claims | {"X-Forwarded-For": "192.0.2.7"})
        assert [a.status_code for a in answers] == [200, 303, 200]
    finally:
        site.close()


def test_web_admin_remote_lets_other_clients_log_in(engine: tuple[Settings, Engine]) -> None:
    settings, running = engine
    Accounts.for_settings(settings).add("alice", "a good password")
    remote = settings.model_copy(update={"web": WebSettings(admin_remote=True)})
    site = AdminSite(remote, running)
    try:
        answers = _ask(site, "192.0.2.7", LOGIN, {"Origin": "http://filter.test"})
        assert [a.status_code for a in answers] == [200, 303, 200]
        # still no page without a session
        [answer] = _ask(site, "192.0.2.8", [("GET", "/admin/lists", {})], {})
        assert answer.status_code == 303 and answer.headers["location"] == "/admin/login"
    finally:
        site.close()


def test_logins_waiting_for_a_password_check_are_bounded(
        engine: tuple[Settings, Engine]) -> None:
    """Each check costs 64 MiB for a moment: at most MAX_HASHING run, MAX_HASH_WAITING
    wait; one more is answered 503 at once (the count is the site's own)."""
    settings, running = engine
    site = AdminSite(settings, running)
    try:
        site._waiting = admin.MAX_HASH_WAITING
        answers = _ask(site, "127.0.0.1", LOGIN[:2], {"Origin": "http://filter.test"})
        assert answers[1].status_code == 503 and "Busy" in answers[1].text
        site._waiting = admin.MAX_HASH_WAITING - 1
        answers = _ask(site, "127.0.0.1", LOGIN[:2], {"Origin": "http://filter.test"})
        assert answers[1].status_code == 401  # no such account: checked, refused
    finally:
        site.close()


# ------------------------------------------------------------ bounds


def test_sessions_are_bounded_oldest_first() -> None:
    sessions = Sessions()
    made = [sessions.new("alice")[0] for _ in range(admin.MAX_SESSIONS + 1)]
    assert len(sessions.live) == admin.MAX_SESSIONS
    assert sessions.get(made[0]) is None and sessions.get(made[1]) is not None


def test_sessions_end_at_their_lifetime() -> None:
    now = [1000.0]
    sessions = Sessions(clock=lambda: now[0])
    sid, _ = sessions.new("alice")
    now[0] += admin.SESSION_LIFETIME - 1
    assert sessions.get(sid) is not None
    now[0] += 1
    assert sessions.get(sid) is None and sid not in sessions.live


def test_login_failures_are_counted_per_key_within_the_window_and_bounded() -> None:
    now = [0.0]
    limiter = LoginLimiter(3, window=300.0, clock=lambda: now[0], max_keys=2)
    for _ in range(3):
        assert not limiter.blocked("a")
        limiter.failed("a")
    assert limiter.blocked("a") and not limiter.blocked("b")
    limiter.forgive("a")
    assert not limiter.blocked("a")
    limiter.failed("a")
    now[0] += 300.0  # the window has passed
    assert not limiter.blocked("a")
    for key in ("a", "b", "c"):
        limiter.failed(key)
    assert len(limiter._failures) == 2 and "a" not in limiter._failures


def test_the_error_ring_keeps_the_last_records_without_addresses() -> None:
    import logging

    ring = ErrorRing(size=3)
    logger = logging.getLogger("netfilter.test.ring")
    logger.addHandler(ring)
    try:
        logger.info("not kept: below WARNING")
        for i in range(4):
            logger.warning("upstream %s and [2001:db8::7]:53 failed at 12:30:45, try %d",
                           "192.0.2.9", i)
    finally:
        logger.removeHandler(ring)
    assert [e.message[-1] for e in ring.entries] == ["1", "2", "3"]
    text = ring.entries[-1].message
    assert "192.0.2.9" not in text and "2001:db8::7" not in text
    assert text == "upstream [address] and [[address]]:53 failed at 12:30:45, try 3"
