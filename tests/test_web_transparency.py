"""The public transparency page and its JSON twin, served by a real `netfilter serve`
(stop page, audit log with full client addresses and blocked names recorded, tiles),
asked with httpx over loopback; and the RFC 7725 Link every 451 carries by default.

The privacy test is the point: the audit log does hold the client's address and the
blocked name (checked in the log itself), and neither appears on the page or in the JSON.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from netfilter.audit.store import AuditStore
from netfilter.config import Settings
from netfilter.stoppage.render import blocked_by_url
from netfilter.updates.state import Held, VersionState, state_path
from tests.support import DEMO_LIST, DEMO_PUB, free_port, wait_for

CLIENT = "127.0.0.7"  # the blocked browser's address, as the audit log records it
BLOCKED = "blocked.example"
HELD_REASON = "held-because-of-secret.example"
WITNESS = "witness.example"


class Node:
    """A `netfilter serve` child with the stop page, audit log and tiles (and `web`)."""

    def __init__(self, tmp_path: Path, web: dict[str, Any] | None = None) -> None:
        self.ports = {p: free_port() for p in ("stoppage", "tiles", "web")}
        data: dict[str, Any] = {
            "node": {"id": "transparency-test.example", "key": str(tmp_path / "node.key")},
            "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
            "stoppage": {"listen": f"127.0.0.1:{self.ports['stoppage']}"},
            "audit": {"path": str(tmp_path / "audit.sqlite"), "client": "full",
                      "record_targets": True, "checkpoint_interval": 0.2,
                      "aggregate_window": 0,  # every block an event: none come later
                      "tiles": str(tmp_path / "tiles"),
                      "tiles_listen": f"127.0.0.1:{self.ports['tiles']}"},
        }
        if web is not None:
            data["web"] = {k: (v.format(**self.ports) if isinstance(v, str) else v)
                           for k, v in web.items()}
        self.config = tmp_path / "netfilter.yaml"
        self.config.write_text(yaml.safe_dump(data), encoding="utf-8")
        self.audit = tmp_path / "audit.sqlite"
        self.proc = subprocess.Popen([sys.executable, "-m", "netfilter.cli", "serve",
                                      "--config", str(self.config)],
                                     stderr=subprocess.PIPE, text=True)
        self.web = self.ports["web" if web and "listen" in web else "stoppage"]
        assert wait_for(self._up, 60), "serve did not start"

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
        try:
            httpx.get(f"http://127.0.0.1:{self.ports['stoppage']}/", timeout=2)
        except httpx.TransportError:
            return False
        return True

    def block(self, count: int) -> httpx.Response:
        transport = httpx.HTTPTransport(local_address=CLIENT)
        with httpx.Client(transport=transport, timeout=10) as client:
            for _ in range(count):
                response = client.get(f"http://127.0.0.1:{self.ports['stoppage']}/some/page",
                                      headers={"Host": BLOCKED})
        return response

    def logged(self, text: str) -> bool:
        with sqlite3.connect(self.audit) as db:
            return any(text.encode() in bytes(row[0]) for row in
                       db.execute("SELECT event FROM leaves WHERE event IS NOT NULL"))

    def checkpointed(self) -> bool:
        with sqlite3.connect(self.audit) as db:
            size = db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM leaves").fetchone()[0]
            row = db.execute("SELECT MAX(size) FROM checkpoints").fetchone()
        return bool(row[0]) and row[0] >= size

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _, stderr = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0, stderr
        return stderr


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    settings = Settings(audit={"path": tmp_path / "audit.sqlite"}, base=tmp_path)
    state = VersionState(state_path(settings))  # a version held, as `list update` leaves it
    state.hold(Held("demo", 99, "0" * 64, "protected", HELD_REASON, tmp_path / "held.nfl",
                    datetime(2026, 12, 1, 8, 0, tzinfo=UTC)))
    state.close()
    served = Node(tmp_path)
    try:
        yield served
    finally:
        if served.proc.poll() is None:
            served.stop()


def test_public_page_shows_lists_counts_checkpoint_and_nothing_personal(node: Node) -> None:
    answer = node.block(5)
    assert answer.status_code == 451
    assert answer.headers["link"] == (f'<http://127.0.0.1:{node.ports["stoppage"]}'
                                      f'/transparency>; rel="blocked-by"')
    # the log does hold the client and the name (the premise of the privacy check)
    assert wait_for(lambda: node.logged(CLIENT) and node.logged(BLOCKED), 10)
    assert wait_for(node.checkpointed, 10)
    store = AuditStore(node.audit, create=False, read_only=False)  # a witness cosigned
    latest = store.latest_checkpoint()
    assert latest is not None
    store.add_cosignature(latest.size, WITNESS, f"\u2014 {WITNESS} AAAA")
    store.close()

    base = f"http://127.0.0.1:{node.web}"
    twin = httpx.get(f"{base}/transparency.json", timeout=10)
    assert twin.status_code == 200 and twin.headers["content-type"] == "application/json"
    data = twin.json()
    assert data["node"] == "transparency-test.example"
    [demo] = data["lists"]
    assert demo["id"] == "demo" and demo["version"] >= 1 and len(demo["signing_key_id"]) == 16
    assert demo["issuer"] and demo["legal_basis"] and demo["appeal"] and demo["hotline"]
    assert demo["entries"]["total"] == demo["entries"]["domain"] + demo["entries"]["url"]
    assert sum(demo["entries"]["by_category"].values()) == demo["entries"]["total"]
    assert demo["published"].endswith("Z")
    assert data["held"] == [{"list": "demo", "version": 99, "held_since": "2026-12-01T08:00:00Z"}]
    today = datetime.now(UTC).date().isoformat()
    blocks = [row for row in data["blocks"]["per_day"] if row["list"] == "demo"]
    assert blocks and blocks[0]["day"] == today and sum(r["count"] for r in blocks) >= 1
    assert set(blocks[0]) == {"day", "list", "category", "count"}
    checkpoint = data["checkpoint"]
    assert checkpoint["note"].startswith("transparency-test.example\n")
    assert checkpoint["size"] == latest.size
    assert checkpoint["cosignatures"] == [{"witness": WITNESS, "line": f"\u2014 {WITNESS} AAAA"}]
    tiles = f"http://127.0.0.1:{node.ports['tiles']}/"
    assert data["verify"]["commands"][0] == (
        f"netfilter audit follow {tiles} --key transparency-test.example.pub --state DIR")
    assert data["verify"]["node_key"].startswith("transparency-test.example+")
    served = httpx.get(f"{tiles}checkpoint", timeout=10)  # the tiles on the web stack
    assert served.status_code == 200 and served.text.startswith("transparency-test.example\n")

    pages = {
        "en": httpx.get(f"{base}/transparency", timeout=10),
        "de": httpx.get(f"{base}/transparency?lang=de", timeout=10),
        "fr": httpx.get(f"{base}/transparency", headers={"Accept-Language": "fr-CH, fr;q=0.9"},
                        timeout=10),
    }
    words = {"en": "Lists in force", "de": "Geltende Listen", "fr": "Listes en vigueur"}
    for lang, page in pages.items():
        assert page.status_code == 200 and page.headers["content-language"] == lang
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        text = page.text
        assert f'<html lang="{lang}">' in text and words[lang] in text
        assert "netfilter audit follow" in text and demo["signing_key_id"] in text
        assert f"\u2014 {WITNESS} AAAA" in text
        assert "<script" not in text and " src=" not in text
    for body in (twin.text, *(p.text for p in pages.values())):
        assert CLIENT not in body and BLOCKED not in body and HELD_REASON not in body
        assert "some/page" not in body and "DEMO-0001" not in body  # no entry reference
    assert "Traceback" not in node.stop()


def test_hostile_language_and_unknown_paths(node: Node) -> None:
    base = f"http://127.0.0.1:{node.web}"
    page = httpx.get(f"{base}/transparency", params={"lang": "<script>x</script>"},
                     headers={"Accept-Language": "\"><img src=x>"}, timeout=10)
    assert page.status_code == 200 and page.headers["content-language"] == "en"
    assert "<img" not in page.text and "<script>x" not in page.text
    # everything else on the stop page's listener is the stop page
    other = httpx.get(f"{base}/transparency/x", headers={"Host": BLOCKED}, timeout=10)
    assert other.status_code == 451 and "DEMO-0001" in other.text


def test_web_listen_moves_the_public_pages(tmp_path: Path) -> None:
    node = Node(tmp_path, web={"listen": "127.0.0.1:{web}",
                               "public_url": "https://filter.example/"})
    try:
        answer = node.block(1)
        assert answer.headers["link"] == '<https://filter.example/transparency>; rel="blocked-by"'
        own = httpx.get(f"http://127.0.0.1:{node.ports['web']}/transparency.json", timeout=10)
        assert own.status_code == 200 and json.loads(own.text)["lists"][0]["id"] == "demo"
        assert httpx.get(f"http://127.0.0.1:{node.ports['web']}/elsewhere",
                         timeout=10).status_code == 404
        on_stop_page = httpx.get(f"http://127.0.0.1:{node.ports['stoppage']}/transparency",
                                 timeout=10)
        assert on_stop_page.status_code == 451
    finally:
        node.stop()


@pytest.mark.parametrize(("config", "url"), [
    ({}, "http://127.0.0.1:8081/transparency"),
    ({"stoppage": {"listen": "0.0.0.0:80"}, "dns": {"stoppage_ipv4": "192.0.2.5"}},
     "http://192.0.2.5/transparency"),
    ({"stoppage": {"listen": "[::1]:8081"}}, "http://[::1]:8081/transparency"),
    ({"stoppage": {}, "web": {"listen": "127.0.0.2:8443"}}, "http://127.0.0.2:8443/transparency"),
    ({"web": {"public_url": "https://filter.example/node-1/"}},
     "https://filter.example/node-1/transparency"),
])
def test_blocked_by_url(config: dict[str, Any], url: str) -> None:
    assert blocked_by_url(Settings(**config)) == url
