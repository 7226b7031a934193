"""The operator dashboard as a person uses it, in Debian's headless Chromium (Playwright)
against a real `netfilter serve` (tests/test_web_admin.py's node: a list with a source
whose next version the updater holds, accounts made with the real `netfilter user add`):
log in, see the status, see the blocks chart grow after pages were blocked in another
browser window, confirm a held update, log out. Every dashboard page (and the login
page) is screenshotted into artifacts/screenshots/ and checked by axe-core for WCAG
2.0/2.1 A and AA violations at 1280 and 320 CSS pixels.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from tests.browser_support import WIDTHS, BrowserRig, browser_rig
from tests.support import wait_for
from tests.test_web_admin import NEW_NAME, PAGES, PASSWORDS, Node, node

if TYPE_CHECKING:
    from playwright.sync_api import Page

__all__ = ["browser_rig", "node"]  # the fixtures, imported to be used here

TOTAL = re.compile(r", blocks per day, (\d+) in all$")


def _login(page: Page, node: Node, name: str = "alice") -> None:
    """What a person does: open the dashboard, get the login form, fill it in, send it."""
    page.goto(f"{node.base}/admin/")
    assert page.url == f"{node.base}/admin/login"
    page.get_by_label("Account name").fill(name)
    page.get_by_label("Password").fill(PASSWORDS[name])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{node.base}/admin/")


def _slug(path: str) -> str:
    return path.strip("/").replace("/", "-") or "admin"


def _chart_total(page: Page, label: str) -> int:
    """The total an <svg role="img"> chart's label states (0: no chart, no blocks)."""
    chart = page.locator(f'svg[role="img"][aria-label^="{label},"]')
    if chart.count() == 0:
        return 0
    found = TOTAL.search(chart.get_attribute("aria-label") or "")
    assert found, chart.get_attribute("aria-label")
    return int(found.group(1))


def _block_in_a_browser(rig: BrowserRig, node: Node, count: int) -> None:
    """`count` page loads of a blocked name in another browser window, sent to the stop
    page as the node's DNS answer sends it (here Chromium's resolver rule)."""
    page = rig.page(1280)
    try:
        for n in range(count):
            answer = page.goto(f"http://blocked.example:{node.port}/page-{n}")
            assert answer is not None and answer.status == 451
    finally:
        page.context.close()


@pytest.mark.parametrize("width", WIDTHS)
def test_every_dashboard_page_is_accessible(browser_rig: BrowserRig, node: Node,
                                            width: int) -> None:
    _block_in_a_browser(browser_rig, node, 2)  # so that the charts have bars
    page = browser_rig.page(width)
    try:
        page.goto(f"{node.base}/admin/login")
        assert page.get_attribute("html", "lang") == "en"
        browser_rig.screenshot(page, "admin-login")
        browser_rig.assert_accessible(page, f"login page at {width} px")
        _login(page, node)
        for path in PAGES:
            page.goto(f"{node.base}{path}")
            assert page.url == f"{node.base}{path}"  # not sent back to the login page
            assert page.evaluate("document.documentElement.scrollWidth") <= width, path
            browser_rig.screenshot(page, _slug(path))
            browser_rig.assert_accessible(page, f"{path} at {width} px")
        # a wrong password: the error as it is shown
        error = browser_rig.page(width)
        try:
            error.goto(f"{node.base}/admin/login")
            error.get_by_label("Account name").fill("alice")
            error.get_by_label("Password").fill("not her password")
            error.get_by_role("button", name="Log in").click()
            error.get_by_role("alert").wait_for()
            browser_rig.screenshot(error, "admin-login-refused")
            browser_rig.assert_accessible(error, f"refused login at {width} px")
        finally:
            error.context.close()
    finally:
        page.context.close()


def test_a_person_walks_through_the_dashboard(browser_rig: BrowserRig, node: Node) -> None:
    page = browser_rig.page(1280)
    try:
        _login(page, node)
        assert "logged in as alice" in page.inner_text("header")
        status = page.get_by_role("table")
        for part in ("Lists", "Stop page", "Audit log", "Updater"):
            row = status.get_by_role("row").filter(
                has=page.get_by_role("rowheader", name=part, exact=True))
            assert row.count() == 1, part
        assert "ready" in status.get_by_role("row").filter(
            has=page.get_by_role("rowheader", name="Stop page")).inner_text()

        # the blocks chart grows by the pages blocked in another window meanwhile
        page.get_by_role("link", name="Blocks").click()
        page.wait_for_url(f"{node.base}/admin/blocks")
        before = {label: _chart_total(page, label) for label in
                  ("By list: test", "By category: csam", "By front-end: stoppage")}
        browser_rig.screenshot(page, "walk-blocks-before")
        _block_in_a_browser(browser_rig, node, 3)

        def grown() -> bool:
            page.reload()
            return _chart_total(page, "By list: test") == before["By list: test"] + 3

        assert wait_for(grown, 20), before
        for label, total in before.items():
            assert _chart_total(page, label) == total + 3, label
        browser_rig.screenshot(page, "walk-blocks-after")

        # a new version is published; the updater holds it; the operator confirms it
        assert not node.blocked(NEW_NAME)
        node.publish(node.dir.parent / "v2.nfl")
        page.get_by_role("link", name="Held updates").click()
        page.wait_for_url(f"{node.base}/admin/held")
        confirm = page.get_by_role("button", name="Confirm test version 2", exact=True)

        def shown() -> bool:
            page.reload()
            return confirm.count() == 1

        assert wait_for(shown, 30), node.log.read_text()[-2000:]
        assert page.get_by_role("button", name="Reject test version 2").count() == 1
        for width in reversed(WIDTHS):  # the page with its buttons, narrow and wide
            page.set_viewport_size({"width": width, "height": 800})
            browser_rig.screenshot(page, "walk-held")
            browser_rig.assert_accessible(page, f"/admin/held with a held version, {width} px")
        assert not node.blocked(NEW_NAME)
        confirm.click()
        page.wait_for_load_state("load")
        assert "confirmed by alice" in page.get_by_role("status").inner_text()
        browser_rig.screenshot(page, "walk-held-confirmed")
        browser_rig.assert_accessible(page, "/admin/held after the decision")
        assert wait_for(lambda: node.blocked(NEW_NAME), 20), node.log.read_text()[-2000:]
        assert wait_for(lambda: any(e["type"] == "list-confirmed" and e["frontend"] == "dashboard"
                                    for e in node.events()), 10)

        # log out: the dashboard is behind the login page again
        page.get_by_role("button", name="Log out").click()
        page.wait_for_url(f"{node.base}/admin/login")
        page.goto(f"{node.base}/admin/held")
        assert page.url == f"{node.base}/admin/login"
        assert page.get_by_label("Password").count() == 1
        browser_rig.screenshot(page, "walk-logged-out")
    finally:
        page.context.close()
