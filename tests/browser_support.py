"""A real headless Chromium (Debian's, driven by Playwright for Python; nothing downloads
a browser) for the tests that use the web pages as a person would: pages at a given
width and language, screenshots kept as test artifacts, and axe-core's WCAG 2.x A/AA
rules run inside the page.

Chromium only ever reaches loopback: every other name resolves to nothing
(--host-resolver-rules), except the names a test maps to 127.0.0.1 itself (a blocked
name sent to the stop page, as the node's DNS answer would send it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support import REPO

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

__all__ = ["ARTIFACTS", "CHROMIUM", "WIDTHS", "BrowserRig", "browser_rig"]

CHROMIUM = "/usr/bin/chromium"
WIDTHS = (1280, 320)  # CSS pixels: a desktop window and the narrowest phone WCAG 1.4.10 names
HEIGHT = 800
ARTIFACTS = Path(os.environ.get("NETFILTER_ARTIFACTS", REPO / "artifacts")) / "screenshots"
AXE = REPO / ".cache" / "npm" / "node_modules" / "axe-core" / "axe.min.js"
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
MAPPED = ("blocked.example", "partly.example")  # names resolved to 127.0.0.1 (the stop page)

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-features=NetworkTimeServiceQuerying",
    "--host-resolver-rules=" + ", ".join([*(f"MAP {n} 127.0.0.1" for n in MAPPED),
                                          "MAP * ~NOTFOUND", "EXCLUDE 127.0.0.1"]),
]


def _axe_source() -> str:
    """axe.min.js, installed from npm by scripts/axe-core.sh on first use (skip if not)."""
    done = subprocess.run([str(REPO / "scripts" / "axe-core.sh")], capture_output=True,
                          text=True, timeout=300, check=False)
    if done.returncode or not AXE.is_file():
        pytest.skip(f"axe-core could not be installed from npm: {done.stderr.strip()[-300:]}")
    return AXE.read_text(encoding="utf-8")


class BrowserRig:
    """One Chromium; a fresh context (profile state, cookies) for every page opened."""

    def __init__(self, browser: Browser, axe: str) -> None:
        self.browser = browser
        self.axe_source = axe

    def page(self, width: int, *, locale: str = "en-US") -> Page:
        """A new page `width` CSS pixels wide, its Accept-Language from `locale`. Close
        it with `page.context.close()`."""
        context = self.browser.new_context(viewport={"width": width, "height": HEIGHT},
                                           locale=locale, java_script_enabled=True)
        context.set_default_timeout(15_000)
        return context.new_page()

    def screenshot(self, page: Page, name: str) -> Path:
        """The whole page as ARTIFACTS/<name>-<width>.png (kept after the run)."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        width = page.viewport_size["width"] if page.viewport_size else 0
        path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{width}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return path

    def axe(self, page: Page) -> list[dict[str, Any]]:
        """axe-core's WCAG 2.0/2.1 A and AA violations on the page as it is now. Injected
        through the driver (Runtime.evaluate), which the pages' CSP does not govern: the
        pages themselves carry no script."""
        if not page.evaluate("() => typeof window.axe !== 'undefined'"):
            page.evaluate(self.axe_source)
        result: dict[str, Any] = page.evaluate(
            "tags => axe.run(document, {runOnly: {type: 'tag', values: tags},"
            " resultTypes: ['violations']})", AXE_TAGS)
        return list(result["violations"])

    def assert_accessible(self, page: Page, what: str) -> None:
        """No axe violations; otherwise each one's id, impact and nodes' targets."""
        violations = self.axe(page)
        lines = [f"{v['id']} ({v['impact']}): {v['help']}; "
                 + "; ".join(json.dumps(n["target"]) for n in v["nodes"][:10])
                 for v in violations]
        assert not violations, f"{what}: axe-core WCAG A/AA violations:\n" + "\n".join(lines)

    def visit(self, page: Page, url: str, name: str) -> None:
        """Open `url`, screenshot it as `name` and assert axe finds no violations."""
        page.goto(url, wait_until="load")
        self.screenshot(page, name)
        self.assert_accessible(page, f"{name} at {page.viewport_size}")


@pytest.fixture(scope="module")
def browser_rig() -> Iterator[BrowserRig]:
    """Debian's Chromium driven by Playwright (module scope: its event loop lives only
    while the browser tests run). Skips, saying why, without Chromium, Playwright or npm."""
    if shutil.which(CHROMIUM) is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright not installed (pip: the test extra)")
    axe = _axe_source()
    with sync_api.sync_playwright() as driver:
        # Playwright gives the browser a fresh temporary profile (--user-data-dir) itself
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield BrowserRig(browser, axe)
        finally:
            browser.close()
