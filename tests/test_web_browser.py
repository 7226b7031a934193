"""The stop page and the public transparency page as a person sees them: a real
`netfilter serve`, Debian's headless Chromium (Playwright), en/de/fr at 1280 and 320 CSS
pixels; each page screenshotted into artifacts/screenshots/ and checked by axe-core for
WCAG 2.0/2.1 A and AA violations (none allowed).

The stop page is reached as the node's DNS answer sends a browser there: the blocked
name resolves to the stop page's address (here Chromium's own resolver rule), and the
browser asks for it with that name in Host.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from netfilter.config import Settings
from netfilter.updates.state import Held, VersionState, state_path
from tests.browser_support import ARTIFACTS, WIDTHS, BrowserRig, browser_rig
from tests.support import wait_for
from tests.test_web_transparency import Node

__all__ = ["browser_rig"]  # the fixture, imported to be used here

LANGUAGES = {"en": "en-US", "de": "de-DE", "fr": "fr-FR"}  # page language -> browser locale
STOP_WORDS = {"en": "Access to this address has been restricted",
              "de": "Zugang zu dieser Adresse", "fr": "accès à cette adresse a été restreint"}
LIST_WORDS = {"en": "Lists in force", "de": "Geltende Listen", "fr": "Listes en vigueur"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node with the stop page, the audit log (with a checkpoint) and a held update, so
    that every part of the transparency page has something to show."""
    tmp_path = tmp_path_factory.mktemp("browser-node")
    settings = Settings(audit={"path": tmp_path / "audit.sqlite"}, base=tmp_path)
    state = VersionState(state_path(settings))
    state.hold(Held("demo", 99, "0" * 64, "protected", "held for the browser test",
                    tmp_path / "held.nfl", datetime(2026, 12, 1, 8, 0, tzinfo=UTC)))
    state.close()
    served = Node(tmp_path)
    try:
        served.block(3)
        assert wait_for(served.checkpointed, 10)
        yield served
    finally:
        if served.proc.poll() is None:
            served.stop()


def test_axe_finds_violations_where_there_are_some(browser_rig: BrowserRig) -> None:
    """The checker itself can fail: a page without a language, an image without text and
    grey-on-white text is reported."""
    page = browser_rig.page(1280)
    try:
        page.set_content('<html><body><main><img src="data:,x"><p style="color:#bbbbbb">'
                         'faint</p></main></body></html>')
        found = {v["id"] for v in browser_rig.axe(page)}
        assert {"html-has-lang", "image-alt", "color-contrast"} <= found, found
        with pytest.raises(AssertionError, match=r"image-alt \(critical\)"):
            browser_rig.assert_accessible(page, "a bad page")
    finally:
        page.context.close()


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("lang", list(LANGUAGES))
def test_stop_page_in_a_browser(browser_rig: BrowserRig, node: Node, lang: str,
                                width: int) -> None:
    port = node.ports["stoppage"]
    page = browser_rig.page(width, locale=LANGUAGES[lang])
    try:
        response = page.goto(f"http://blocked.example:{port}/some/page")
        assert response is not None and response.status == 451
        assert page.get_attribute("html", "lang") == lang
        assert "DEMO-0001" in page.inner_text("main")
        assert STOP_WORDS[lang] in page.inner_text("h1")
        assert page.evaluate("document.documentElement.scrollWidth") <= width  # reflows
        shot = browser_rig.screenshot(page, f"stoppage-blocked-{lang}")
        assert shot.parent == ARTIFACTS and shot.stat().st_size > 1000
        browser_rig.assert_accessible(page, f"stop page ({lang}, {width} px)")
        # a name the node does not block: the generic page, which names no list
        page.goto(f"http://partly.example:{port}/")
        assert page.get_attribute("html", "lang") == lang
        assert "DEMO-" not in page.inner_text("main")
        browser_rig.screenshot(page, f"stoppage-generic-{lang}")
        browser_rig.assert_accessible(page, f"generic stop page ({lang}, {width} px)")
    finally:
        page.context.close()


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("lang", list(LANGUAGES))
def test_transparency_page_in_a_browser(browser_rig: BrowserRig, node: Node, lang: str,
                                        width: int) -> None:
    base = f"http://127.0.0.1:{node.web}/transparency"
    page = browser_rig.page(width, locale=LANGUAGES[lang])  # the language it asks for
    try:
        response = page.goto(base)
        assert response is not None and response.status == 200
        assert page.get_attribute("html", "lang") == lang
        assert LIST_WORDS[lang] in page.inner_text("main")
        assert page.locator("table td").count() > 0  # blocks per day were recorded
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        browser_rig.screenshot(page, f"transparency-{lang}")
        browser_rig.assert_accessible(page, f"transparency page ({lang}, {width} px)")
        # the language links switch the page: the first link that is not this language
        other = next(code for code in LANGUAGES if code != lang)
        page.click(f'nav a[hreflang="{other}"]')
        page.wait_for_load_state("load")
        assert page.get_attribute("html", "lang") == other
        assert page.url.endswith(f"?lang={other}")
        assert page.get_attribute(f'nav a[hreflang="{other}"]', "aria-current") == "page"
    finally:
        page.context.close()
