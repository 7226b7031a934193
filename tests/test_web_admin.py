"""The operator dashboard (/admin/) of a real `netfilter serve` on loopback, asked with
httpx from several loopback addresses (each a client as the login limits see it).

The node: the stop page (the dashboard's listener), an audit log recording full client
addresses and blocked names, and a list with a directory source and an `updates`
section whose entry-count bound holds the next version for an operator. Accounts are
made with the real `netfilter user add`. What is shown: nothing answers without a
session, forged and replayed forms are refused, logins are limited per client, a held
version confirmed on the dashboard is enforced and recorded naming the operator, the
blocks charts count blocks, and no page ever shows a client address or a blocked name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from netfilter.keys import PrivateKey
from netfilter.listfile import build_bundle
from tests.conftest import SOURCE
from tests.support import free_port, read_events, wait_for

NEW_NAME = "newly.example"  # the held version adds it
V2 = SOURCE + f"  - {{domain: {NEW_NAME}, ref: N-1, category: csam}}\n"
REJECTED_NAME = "rejected.example"  # the version after it adds this one too
V3 = V2 + f"  - {{domain: {REJECTED_NAME}, ref: N-2, category: csam}}\n"
BLOCKED = "blocked.example"  # in SOURCE
BLOCKER = "127.0.0.7"  # the blocked browser, recorded in full in the audit log
PASSWORDS = {"alice": "correct horse battery staple", "bob": "another-long-pass"}
TOKEN = re.compile(r'name="token" value="([^"]+)"')
PAGES = ["/admin/", "/admin/lists", "/admin/held", "/admin/blocks", "/admin/audit",
         "/admin/errors"]


def user_add(config: Path, name: str, password: str, *extra: str,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netfilter.cli", "user", "add", name,
                           "--config", str(config), *extra], input=password + "\n",
                          capture_output=True, text=True, timeout=60, cwd=cwd)


@dataclass
class Node:
    """A `netfilter serve stoppage` child and the files it keeps."""

    dir: Path
    config: Path
    source: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, object]]:
        return read_events(self.dir / "audit.sqlite")

    def publish(self, bundle: Path) -> None:
        tmp = self.source / ".incoming"
        shutil.copyfile(bundle, tmp)
        os.replace(tmp, self.source / "test.nfl")

    def block(self, count: int, name: str = BLOCKED) -> None:
        """`count` blocked page loads by the browser at BLOCKER."""
        transport = httpx.HTTPTransport(local_address=BLOCKER)
        with httpx.Client(transport=transport, timeout=10) as client:
            for _ in range(count):
                answer = client.get(f"{self.base}/some/page", headers={"Host": name})
                assert answer.status_code == 451

    def blocked(self, name: str) -> bool:
        """Whether the stop page names the list's issuer for `name` (the generic page,
        for a name not blocked, names no list; both are 451)."""
        with httpx.Client(timeout=10) as client:
            return "Test Authority" in client.get(f"{self.base}/", headers={"Host": name}).text


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory,
         authority: tuple[Path, Path], authority_key: PrivateKey) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("admin")
    (tmp / "node" / "lists").mkdir(parents=True)
    source = tmp / "published"
    source.mkdir()
    for version, text in ((1, SOURCE), (2, V2), (3, V3)):
        (tmp / f"v{version}.yaml").write_text(text, encoding="utf-8")
        build_bundle(tmp / f"v{version}.yaml", tmp / f"v{version}.nfl", key=authority_key,
                     list_id="test", version=version)
    shutil.copyfile(tmp / "v1.nfl", tmp / "node" / "lists" / "test.nfl")
    port = free_port()
    config = tmp / "node" / "netfilter.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"id": "admin-test.example", "key": "node.key"},
        "lists": [{"path": "lists/test.nfl", "trust": [str(authority[1])],
                   "source": str(source)}],
        "updates": {"interval": 1, "jitter": 0, "retry_min": 1, "retry_max": 2,
                    "max_entry_change": 0.01},
        "stoppage": {"listen": f"127.0.0.1:{port}"},
        "audit": {"path": "audit.sqlite", "client": "full", "record_targets": True,
                  "checkpoint_interval": 0.5, "aggregate_window": 0},
    }), encoding="utf-8")
    for name, password in PASSWORDS.items():
        made = user_add(config, name, password)
        assert made.returncode == 0, made.stderr
    log = tmp / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "netfilter.cli", "serve", "--config",
                                 str(config)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp / "node")
    served = Node(tmp / "node", config, source, port, proc, log)
    try:
        assert wait_for(lambda: "netfilter: serving" in log.read_text(), 60), log.read_text()
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()


class Browser:
    """An httpx client at one loopback address, with its cookies, as a browser is."""

    def __init__(self, node: Node, address: str = "127.0.0.1") -> None:
        self.node = node
        self.client = httpx.Client(base_url=node.base, timeout=30, follow_redirects=False,
                                   transport=httpx.HTTPTransport(local_address=address))
        self.token = ""

    def get(self, path: str) -> httpx.Response:
        answer = self.client.get(path)
        found = TOKEN.search(answer.text)
        if found:
            self.token = found.group(1)
        return answer

    def post(self, path: str, data: dict[str, str], *,
             origin: str | None = "same") -> httpx.Response:
        headers = {} if origin is None else {
            "Origin": self.node.base if origin == "same" else origin}
        answer = self.client.post(path, data=data, headers=headers)
        found = TOKEN.search(answer.text)
        if found:
            self.token = found.group(1)
        return answer

    def login(self, name: str, password: str | None = None) -> httpx.Response:
        self.get("/admin/login")
        return self.post("/admin/login", {"token": self.token, "username": name,
                                          "password": PASSWORDS.get(name, "")
                                          if password is None else password})

    def logged_in(self, name: str = "alice") -> Browser:
        answer = self.login(name)
        assert answer.status_code == 303 and answer.headers["location"] == "/admin/", (
            answer.status_code, answer.text[:300])
        self.get("/admin/")
        return self

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def browser(node: Node) -> Iterator[Browser]:
    made = Browser(node)
    try:
        yield made
    finally:
        made.close()


def _to_login(answer: httpx.Response) -> bool:
    return answer.status_code == 303 and answer.headers["location"] == "/admin/login"


# ------------------------------------------------------------ no session, no page


def test_nothing_under_admin_answers_without_a_session(node: Node) -> None:
    paths = [*PAGES, "/admin", "/admin/logout", "/admin/nowhere", "/admin/held/../held"]
    with httpx.Client(base_url=node.base, timeout=10) as client:
        for path in paths:
            for method in ("GET", "HEAD", "POST", "PUT", "DELETE"):
                answer = client.request(method, path, data={"token": "x"}
                                        if method == "POST" else None)
                assert _to_login(answer), (method, path, answer.status_code)
        # a made-up cookie, and a real one's value with its signature broken
        for cookie in ("forged", "abc.def.ghi"):
            answer = client.get("/admin/", headers={"Cookie": f"netfilter_admin={cookie}"})
            assert _to_login(answer)
        # the login page itself answers, and the public pages stay public
        assert client.get("/admin/login").status_code == 200
        assert client.get("/transparency").status_code == 200


def test_a_wrong_password_or_an_unknown_account_is_refused(node: Node) -> None:
    browser = Browser(node, "127.0.0.11")
    try:
        for name, password in (("alice", "wrong"), ("nobody", "whatever"), ("alice", "")):
            answer = browser.login(name, password)
            assert answer.status_code == 401
            assert "Wrong account name or password." in answer.text
            assert "netfilter_admin" not in browser.client.cookies
            assert _to_login(browser.get("/admin/"))
    finally:
        browser.close()


def test_logins_are_limited_per_client_and_others_still_get_in(node: Node) -> None:
    """Five failures from one address: the sixth attempt is refused, the right password
    too; another address logs in to the same account at once."""
    guesser, other = Browser(node, "127.0.0.12"), Browser(node, "127.0.0.13")
    try:
        for _ in range(5):
            assert guesser.login("bob", "guess").status_code == 401
        refused = guesser.login("bob")
        assert refused.status_code == 429 and "Too many failed attempts" in refused.text
        assert "netfilter_admin" not in guesser.client.cookies
        assert other.login("bob").status_code == 303
        assert other.get("/admin/").status_code == 200
    finally:
        guesser.close()
        other.close()


def test_the_session_cookie_is_httponly_strict_and_scoped(browser: Browser) -> None:
    answer = browser.login("alice")
    assert answer.status_code == 303
    [cookie] = [c for c in answer.headers.get_list("set-cookie")
                if c.startswith("netfilter_admin=")]
    attributes = {part.strip().split("=")[0].lower(): part.strip()
                  for part in cookie.split(";")[1:]}
    assert "httponly" in attributes
    assert attributes["samesite"].lower() == "samesite=strict"
    assert attributes["path"] == "Path=/admin"
    assert "secure" not in attributes  # plain http on loopback: a Secure cookie is lost
    page = browser.get("/admin/")
    assert page.status_code == 200 and "logged in as <strong>alice</strong>" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


# ------------------------------------------------------------ forms


def test_forged_forms_are_refused(node: Node) -> None:
    alice, bob = Browser(node, "127.0.0.14").logged_in("alice"), \
        Browser(node, "127.0.0.15").logged_in("bob")
    try:
        good = alice.token
        assert good and bob.token and good != bob.token
        bogus = {"action": "nothing", "list": "test", "version": "1"}
        for data, origin in (
                (bogus, "same"),  # no token
                (bogus | {"token": "x" * len(good)}, "same"),  # a wrong one
                (bogus | {"token": bob.token}, "same"),  # another session's
                (bogus | {"token": good}, "http://evil.example"),  # another site's page
                (bogus | {"token": good}, "null"),  # a sandboxed or data: page
                (bogus | {"token": good}, None)):  # no Origin, no Referer
            answer = alice.post("/admin/held", data, origin=origin)
            assert answer.status_code == 403, (data, origin)
        # the same form, sound: taken (and refused as a decision, which it is not)
        taken = alice.post("/admin/held", bogus | {"token": good})
        assert taken.status_code == 400 and "Nothing was done" in taken.text
        # a login form without its own token, or from another site, logs nobody in
        other = Browser(node, "127.0.0.16")
        try:
            assert other.post("/admin/login", {"username": "alice",
                                               "password": PASSWORDS["alice"]}
                              ).status_code == 403
            other.get("/admin/login")
            assert other.post("/admin/login", {"token": other.token, "username": "alice",
                                               "password": PASSWORDS["alice"]},
                              origin="http://evil.example").status_code == 403
            assert "netfilter_admin" not in other.client.cookies
        finally:
            other.close()
    finally:
        alice.close()
        bob.close()


def test_a_replayed_form_is_refused(node: Node) -> None:
    alice = Browser(node, "127.0.0.17").logged_in("alice")
    try:
        form = {"token": alice.token, "action": "nothing", "list": "test", "version": "1"}
        assert alice.post("/admin/held", form).status_code == 400  # taken once
        assert alice.post("/admin/held", form).status_code == 403  # never twice
        assert alice.post("/admin/logout", {"token": form["token"]}).status_code == 403
        assert alice.get("/admin/").status_code == 200  # still logged in
    finally:
        alice.close()


def test_logout_ends_the_session(node: Node) -> None:
    alice = Browser(node, "127.0.0.18").logged_in("alice")
    try:
        cookie = alice.client.cookies["netfilter_admin"]
        assert "Log out</button>" in alice.get("/admin/lists").text
        answer = alice.post("/admin/logout", {"token": alice.token})
        assert _to_login(answer)
        assert _to_login(alice.get("/admin/"))
        with httpx.Client(base_url=node.base, timeout=10) as replay:  # the old cookie
            answer = replay.get("/admin/", headers={"Cookie": f"netfilter_admin={cookie}"})
            assert _to_login(answer)
    finally:
        alice.close()


# ------------------------------------------------------------ what the pages show


def _chart_total(page: str, label: str) -> int:
    found = re.search(rf'<svg role="img" aria-label="{re.escape(label)}, blocks per day, '
                      r'(\d+) in all"', page)
    return int(found.group(1)) if found else 0


def test_the_blocks_charts_count_blocks(node: Node, browser: Browser) -> None:
    browser.logged_in()
    before = browser.get("/admin/blocks").text
    node.block(3)
    assert wait_for(lambda: _chart_total(browser.get("/admin/blocks").text,
                                         "By list: test") == _chart_total(before,
                                                                          "By list: test") + 3,
                    15)
    after = browser.get("/admin/blocks").text
    assert _chart_total(after, "By category: csam") == _chart_total(before,
                                                                    "By category: csam") + 3
    assert _chart_total(after, "By front-end: stoppage") == _chart_total(
        before, "By front-end: stoppage") + 3


def test_no_page_shows_a_client_address_or_a_blocked_name(node: Node,
                                                          browser: Browser) -> None:
    node.block(2)
    # the premise: the audit log does hold both
    assert wait_for(lambda: any(e.get("client") == BLOCKER and BLOCKED in str(e.get("target"))
                                for e in node.events()), 15)
    browser.logged_in()
    for path in PAGES:
        page = browser.get(path)
        assert page.status_code == 200, path
        assert BLOCKER not in page.text and BLOCKED not in page.text, path
        assert "No per-client or per-name view exists, by design" in page.text, path


def test_a_held_version_confirmed_on_the_dashboard_is_enforced_and_audited(
        node: Node, browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert not node.blocked(NEW_NAME)
    node.publish(node.dir.parent / "v2.nfl")  # one entry more than 1 %: held
    browser.logged_in("alice")
    label = 'aria-label="Confirm test version 2"'
    assert wait_for(lambda: label in browser.get("/admin/held").text, 20), node.log.read_text()
    page = browser.get("/admin/held").text
    assert 'aria-label="Reject test version 2"' in page
    assert not node.blocked(NEW_NAME)  # held: not in force
    answer = browser.post("/admin/held", {"token": browser.token, "action": "confirm",
                                          "list": "test", "version": "2"})
    assert answer.status_code == 200 and "confirmed by alice" in answer.text
    assert wait_for(lambda: node.blocked(NEW_NAME), 20), node.log.read_text()
    assert "No update is held." in browser.get("/admin/held").text
    assert wait_for(lambda: any(e["type"] == "list-confirmed" for e in node.events()), 10)
    [event] = [e for e in node.events() if e["type"] == "list-confirmed"]
    assert event["frontend"] == "dashboard" and event["version"] == 2
    assert str(event["detail"]).startswith("confirmed by alice:")
    lists = browser.get("/admin/lists").text
    assert re.search(r'<th scope="row">test</th><td class="n">2</td>', lists)


def test_a_held_version_rejected_on_the_dashboard_stays_out_and_is_audited(
        node: Node, browser: Browser) -> None:
    node.publish(node.dir.parent / "v3.nfl")  # more than 1 % again: held
    browser.logged_in("bob")
    label = 'aria-label="Reject test version 3"'
    assert wait_for(lambda: label in browser.get("/admin/held").text, 20), node.log.read_text()
    answer = browser.post("/admin/held", {"token": browser.token, "action": "reject",
                                          "list": "test", "version": "3"})
    assert answer.status_code == 200 and "rejected by bob" in answer.text
    assert "No update is held." in browser.get("/admin/held").text
    assert wait_for(lambda: any(e["type"] == "list-rejected" for e in node.events()), 10)
    [event] = [e for e in node.events() if e["type"] == "list-rejected"]
    assert event["frontend"] == "dashboard" and event["version"] == 3
    assert str(event["detail"]).startswith("rejected by bob:")
    # a second decision on it is not taken (nothing is held), and it is never installed
    again = browser.post("/admin/held", {"token": browser.token, "action": "confirm",
                                         "list": "test", "version": "3"})
    assert again.status_code == 409 and "Nothing was done" in again.text
    assert not node.blocked(REJECTED_NAME)


def test_removing_an_account_or_its_password_ends_its_sessions(node: Node) -> None:
    carol, other = "carol", "carol's first password"
    assert user_add(node.config, carol, other).returncode == 0
    first = Browser(node, "127.0.0.21")
    second = Browser(node, "127.0.0.22")
    try:
        assert first.login(carol, other).status_code == 303
        assert first.get("/admin/").status_code == 200
        # a new password: the session made with the old one ends, the old one is refused
        changed = user_add(node.config, carol, "carol's second password", "--replace")
        assert changed.returncode == 0, changed.stderr
        assert _to_login(first.get("/admin/"))
        assert first.login(carol, other).status_code == 401
        assert second.login(carol, "carol's second password").status_code == 303
        assert second.get("/admin/lists").status_code == 200
        # removed: its session ends at the next request and it cannot log in again
        removed = subprocess.run([sys.executable, "-m", "netfilter.cli", "user", "remove",
                                  carol, "--config", str(node.config)],
                                 capture_output=True, text=True, timeout=60)
        assert removed.returncode == 0, removed.stderr
        assert _to_login(second.get("/admin/lists"))
        assert second.login(carol, "carol's second password").status_code == 401
        again = subprocess.run([sys.executable, "-m", "netfilter.cli", "user", "remove",
                                carol, "--config", str(node.config)],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
        assert "no such account" in again.stderr
    finally:
        first.close()
        second.close()
