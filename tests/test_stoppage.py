"""The stop page: what it says, in which language, how it escapes, its HTTP semantics,
its accessibility, and the small server that DNS `stoppage` answers point browsers to.

Renderer tests use a real Engine over the demo bundle; server tests start the real
asyncio server on 127.0.0.1 port 0 and talk to it with http.client and raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from netfilter.config import Settings, StoppageSettings, load_config
from netfilter.engine import Action, Engine, Verdict
from netfilter.errors import ConfigError
from netfilter.events import MemorySink
from netfilter.listfile import Transparency
from netfilter.matcher import Match
from netfilter.stoppage import Renderer, StopPage, choose_language, wants_html
from netfilter.stoppage.server import MAX_HEAD, StopPageServer, split_host

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "lists" / "demo"
NOW = datetime(2025, 3, 4, 13, 45, 7, tzinfo=UTC)
ISSUER = "Demo Blocking Authority (not a real authority)"
LEGAL = "Demo only: Art. 25 of Directive 2011/93/EU as transposed by a fictional § 1 Demo Act"
APPEAL = "https://appeals.authority.example/"
HOTLINE = "https://hotline.example/report"
OPERATOR = {"operator": "Example Net Ltd", "operator_url": "https://net.example/blocking"}
HELP = {"help_service": "Stop It Now (0800 000 000)", "help_url": "https://help.example/"}

# The page's colours (base.html): every text colour against every background.
TEXT_COLOURS = {"#1f1f1f", "#0b4fa8", "#4d4d4d"}
BACKGROUNDS = {"#ffffff", "#fdf2f2", "#f3f4f6"}


def _settings(tmp_path: Path, stoppage: dict[str, Any] | None = None, *,
              local: bool = False) -> Settings:
    data: dict[str, Any] = {
        "lists": [{"path": str(DEMO / "demo.nfl"), "trust": [str(DEMO / "demo.pub")]}],
        "stoppage": {"listen": "127.0.0.1:0", **(stoppage or {})},
    }
    if local:
        data["local"] = {"block": str(DEMO / "local-block.yaml")}
    path = tmp_path / "netfilter.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_config(path)


def _stoppage(settings: Settings) -> StoppageSettings:
    assert settings.stoppage is not None
    return settings.stoppage


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return Engine(_settings(tmp_path))


@pytest.fixture
def renderer(tmp_path: Path) -> Renderer:
    return Renderer(_stoppage(_settings(tmp_path, OPERATOR)))


def _blocked(engine: Engine, host: str = "blocked.example") -> Verdict:
    verdict = engine.check_host(host, frontend="stoppage")
    assert verdict.blocked
    return verdict


def _page(renderer: Renderer, verdict: Verdict, *, host: str | None = "blocked.example",
          accept: str | None = "text/html", accept_language: str | None = None,
          sec_fetch_dest: str | None = None) -> tuple[StopPage, str, dict[str, str]]:
    page = renderer.render(verdict, host=host, accept=accept, accept_language=accept_language,
                           sec_fetch_dest=sec_fetch_dest, now=NOW)
    headers = {name.lower(): value for name, value in page.headers}
    assert len(headers) == len(page.headers), "a header field appears twice"
    return page, page.body.decode("utf-8"), headers


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of <title> and <style>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.texts: dict[str, str] = {}
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._open = tag

    def handle_endtag(self, tag: str) -> None:
        self._open = None

    def handle_data(self, data: str) -> None:
        if self._open in ("title", "style"):
            self.texts[self._open] = self.texts.get(self._open, "") + data


def _parse(body: str) -> _Tags:
    parser = _Tags()
    parser.feed(body)
    parser.close()
    return parser


ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "div", "p", "h1",
                "h2", "span", "dl", "dt", "dd", "time", "a", "strong", "em", "br"}
ALLOWED_ATTRS = {"lang", "charset", "name", "content", "class", "href", "rel", "datetime"}


def _assert_safe_html(body: str) -> _Tags:
    """Only the expected elements and attributes, no resources, links only as <a>."""
    parsed = _parse(body)
    for tag, attrs in parsed.tags:
        assert tag in ALLOWED_TAGS, tag
        assert set(attrs) <= ALLOWED_ATTRS, (tag, attrs)
        if "href" in attrs:
            assert tag == "a"
            href = attrs["href"] or ""
            assert href.startswith(("https://", "http://", "mailto:", "tel:")), href
            assert "noreferrer" in (attrs.get("rel") or "")
    style = parsed.texts.get("style", "")
    assert "url(" not in style and "@import" not in style
    assert not re.search(r"<\s*(script|img|iframe|object|embed|link|svg|form|input)", body, re.I)
    assert not re.search(r"\s(src|srcset|action|formaction|style|on\w+)\s*=", body, re.I)
    return parsed


# ---------------------------------------------------------------- what the page says


def test_blocked_page_says_who_why_which_entry_when_and_where_to_turn(
        engine: Engine, renderer: Renderer) -> None:
    page, body, headers = _page(renderer, _blocked(engine))
    assert page.status == 451
    for text in (ISSUER, LEGAL, ">demo, version 1<", "DEMO-0001", APPEAL,
                 "appeals@authority.example", HOTLINE, "2025-03-04 13:45:07 UTC",
                 'datetime="2025-03-04T13:45:07Z"', OPERATOR["operator"],
                 OPERATOR["operator_url"], "blocked.example"):
        assert text in body, text
    # plain words on why, as identified by the issuer (csam category)
    assert f"may contain child sexual abuse material as identified by {ISSUER}" in body
    assert "report it to" in body and "mistake" in body
    # never other entries, never the list's other content
    for other in ("DEMO-0002", "blocked.test", "partly.example", "DEMO-0003"):
        assert other not in body
    assert headers["content-language"] == "en"
    assert '<html lang="en">' in body
    _assert_safe_html(body)


def test_neutral_wording_for_other_categories_and_local_lists(tmp_path: Path) -> None:
    settings = _settings(tmp_path, {**OPERATOR, **HELP}, local=True)
    engine = Engine(settings)
    renderer = Renderer(_stoppage(settings))
    verdict = _blocked(engine, "gambling.example")  # operator's own list, category `local`
    _, body, _ = _page(renderer, verdict, host="gambling.example")
    assert "child sexual abuse" not in body
    assert "on a block list issued by Example Net Ltd" in body
    assert verdict.match is not None and verdict.match.ref in body
    assert "Confidential help" not in body  # help referral only on csam blocks
    assert "Legal basis" not in body  # the local list has none


def test_generic_page_when_the_host_is_not_blocked(renderer: Renderer) -> None:
    page, body, headers = _page(renderer, Verdict(Action.ALLOW), host="clean.example")
    assert page.status == 451
    assert "restricted on this network" in body and "clean.example" in body
    assert "demo" not in body.lower()
    assert ISSUER not in body and HOTLINE not in body
    assert OPERATOR["operator_url"] in body  # whom to ask
    assert "2025-03-04 13:45:07 UTC" in body
    assert headers["cache-control"] == "no-store"
    _assert_safe_html(body)
    # A lifted block (a local exception) is no block either: nothing about the list.
    lifted = Verdict(Action.ALLOW, Match("demo", 1, "DEMO-0001", "csam", "domain",
                                         "authority", "blocked.example/", "APPEAL-1"))
    _, body, _ = _page(renderer, lifted)
    assert "DEMO-0001" not in body


def test_help_service_only_when_configured(engine: Engine, tmp_path: Path) -> None:
    without = Renderer(_stoppage(_settings(tmp_path, OPERATOR)))
    _, body, _ = _page(without, _blocked(engine))
    assert "Confidential help" not in body and "help.example" not in body
    with_help = Renderer(_stoppage(_settings(tmp_path, {**OPERATOR, **HELP})))
    _, body, _ = _page(with_help, _blocked(engine))
    assert "Confidential help" in body
    assert "worried about your own thoughts or behaviour" in body
    assert HELP["help_service"] in body and 'href="https://help.example/"' in body
    _, body, _ = _page(with_help, _blocked(engine), accept_language="de")
    assert "Vertrauliche Hilfe" in body and HELP["help_service"] in body
    # never on the generic page
    _, body, _ = _page(with_help, Verdict(Action.ALLOW))
    assert "help.example" not in body


# ---------------------------------------------------------------- languages


@pytest.mark.parametrize(("accept_language", "expected"), [
    ("de-DE,de;q=0.9", "de"),
    ("fr", "fr"),
    ("fr-CH, fr;q=0.9, en;q=0.8, de;q=0.7, *;q=0.5", "fr"),
    ("en;q=0.1, de;q=0.9", "de"),
    ("it, de;q=0.5", "de"),
    ("DE", "de"),
    ("de-x-private", "de"),
    ("de;q=0, fr;q=0.5", "fr"),
    ("de-AT;q=1.0, de;q=0", "en"),  # `de` refused: de-AT finds nothing else
    ("*", "en"),
    ("it", "en"),
    ("", "en"),
    (None, "en"),
    ("garbage;;;q=x,,,=", "en"),
    ("de;q=2", "en"),  # no such q-value: the item is ignored
    ("de;q=abc, fr", "fr"),
    ("<script>alert(1)</script>", "en"),
    ("de\r\nX-Injected: 1", "en"),
    ("a" * 100_000, "en"),
    ("ünïcödé, fr", "fr"),
])
def test_choose_language(accept_language: str | None, expected: str) -> None:
    assert choose_language(accept_language, ["de", "en", "fr"], "en") == expected


def test_choose_language_default_and_star() -> None:
    assert choose_language("it", ["de", "en", "fr"], "de") == "de"
    assert choose_language("*", ["de", "en", "fr"], "fr") == "fr"
    assert choose_language("fr;q=0, *", ["en", "fr"], "fr") == "en"
    assert choose_language("pt-BR", ["pt-br", "en"], "en") == "pt-br"
    assert choose_language("pt-BR", ["pt", "en"], "en") == "pt"


def test_pages_in_german_and_french(engine: Engine, renderer: Renderer) -> None:
    _, body, headers = _page(renderer, _blocked(engine), accept_language="de-DE,de;q=0.9")
    assert headers["content-language"] == "de" and '<html lang="de">' in body
    assert "Demo-Sperrbehörde (keine echte Behörde)" in body
    assert "Rechtsgrundlage" in body and "fiktiven § 1 Demo-Gesetz" in body
    assert "Darstellungen sexuellen Kindesmissbrauchs" in body
    assert "DEMO-0001" in body and APPEAL in body and HOTLINE in body
    _, body, headers = _page(renderer, _blocked(engine), accept_language="fr")
    assert headers["content-language"] == "fr" and '<html lang="fr">' in body
    assert "Autorité de blocage de démonstration (fictive)" in body
    assert "Base légale" in body and "DEMO-0001" in body and HOTLINE in body
    # a language without a translation in the bundle: the default text, English page
    _, body, headers = _page(renderer, _blocked(engine), accept_language="it, en;q=0.5")
    assert headers["content-language"] == "en" and ISSUER in body


def test_configured_default_language(engine: Engine, tmp_path: Path) -> None:
    renderer = Renderer(_stoppage(_settings(tmp_path, {"default_language": "fr"})))
    _, body, headers = _page(renderer, _blocked(engine), accept_language="it")
    assert headers["content-language"] == "fr" and '<html lang="fr">' in body
    _, _, headers = _page(renderer, _blocked(engine), accept_language=None)
    assert headers["content-language"] == "fr"
    with pytest.raises(ConfigError, match="default_language"):
        Renderer(_stoppage(_settings(tmp_path, {"default_language": "it"})))


@pytest.mark.parametrize("lang", ["en", "de", "fr"])
def test_lang_attribute_and_title(engine: Engine, renderer: Renderer, lang: str) -> None:
    for verdict in (_blocked(engine), Verdict(Action.ALLOW)):
        _, body, _ = _page(renderer, verdict, accept_language=lang)
        parsed = _parse(body)
        html = [attrs for tag, attrs in parsed.tags if tag == "html"]
        assert html == [{"lang": lang}]
        assert len(parsed.texts.get("title", "").strip()) > 5
        assert sum(1 for tag, _ in parsed.tags if tag == "h1") == 1
        assert any(tag == "main" for tag, _ in parsed.tags)


# ---------------------------------------------------------------- HTTP semantics


def test_headers(engine: Engine, renderer: Renderer, tmp_path: Path) -> None:
    page, _, headers = _page(renderer, _blocked(engine))
    assert page.status == 451
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["cache-control"] == "no-store"
    assert headers["content-language"] == "en"
    assert headers["link"] == '<https://net.example/blocking>; rel="blocked-by"'
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["content-security-policy"].startswith("default-src 'none'")
    assert "content-length" not in headers and "connection" not in headers
    # no operator_url: no Link
    plain = Renderer(_stoppage(_settings(tmp_path)))
    _, _, headers = _page(plain, _blocked(engine))
    assert "link" not in headers
    # an operator URL with characters a header cannot carry is percent-encoded
    odd = Renderer(_stoppage(_settings(tmp_path, {"operator_url":
                                                  'https://net.example/a b>"\r\nX: 1'})))
    _, _, headers = _page(odd, _blocked(engine))
    assert headers["link"] == '<https://net.example/a%20b%3E%22%0D%0AX:%201>; rel="blocked-by"'


@pytest.mark.parametrize(("accept", "dest", "html"), [
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "document", True),
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", None, True),
    ("*/*", None, True),  # curl
    (None, None, True),
    ("", None, True),
    ("text/*", None, True),
    ("*/*", "iframe", True),
    ("image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8", "image", False),
    ("image/webp,*/*", None, False),  # an image request without Fetch metadata
    ("*/*", "image", False),
    ("*/*", "script", False),
    ("text/css,*/*;q=0.1", "style", False),
    ("*/*", "font", False),
    ("*/*", "empty", False),  # fetch() / XHR
    ("application/json, text/plain, */*", None, False),
    ("application/json", None, False),
    ("text/html;q=0, */*", None, False),
    ("*/*;q=0", None, False),
    ("<script>", None, True),  # unreadable: as if absent
    ("*/*", "<script>", True),  # unknown destination: by Accept
])
def test_wants_html(accept: str | None, dest: str | None, html: bool) -> None:
    assert wants_html(accept, dest) is html


@pytest.mark.parametrize(("accept", "dest"), [
    ("image/*", None), ("*/*", "image"), ("*/*", "empty"), ("application/json", None),
    ("*/*", "script"),
])
def test_plain_text_for_requests_that_do_not_take_html(
        engine: Engine, renderer: Renderer, accept: str, dest: str | None) -> None:
    page, body, headers = _page(renderer, _blocked(engine), accept=accept,
                                sec_fetch_dest=dest, accept_language="de")
    assert page.status == 451
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["content-language"] == "de" and headers["cache-control"] == "no-store"
    assert "link" in headers and "content-security-policy" not in headers
    assert body.startswith("451 Unavailable For Legal Reasons\n")
    assert "DEMO-0001" in body and "Demo-Sperrbehörde" in body and APPEAL in body
    assert "<" not in body and len(body) < 1000
    assert "blocked.example" not in body  # the host is not echoed in the short answer


# ---------------------------------------------------------------- escaping


HOSTILE_HOSTS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "'onmouseover='alert(1)",
    "a\r\nSet-Cookie: x=1",
    "a\r\n\r\n<script>alert(2)</script>",
    "x" * 10_000 + "<script>",
    "bl\u00f6cked.example\u202e\u0000\u0007",
    "\ud800\udfff-lone-surrogates",
    "{{ 7 * 7 }}{% if 1 %}jinja{% endif %}",
    "&amp;&lt;",
]


@pytest.mark.parametrize("host", HOSTILE_HOSTS)
@pytest.mark.parametrize("lang", ["en", "de", "fr"])
def test_hostile_hosts_are_escaped(engine: Engine, renderer: Renderer, host: str,
                                   lang: str) -> None:
    for verdict in (_blocked(engine), Verdict(Action.ALLOW)):
        page, body, headers = _page(renderer, verdict, host=host, accept_language=lang)
        _assert_safe_html(body)
        lower = body.lower()
        assert "<script" not in lower and "<img" not in lower and "onerror=" not in lower
        assert "set-cookie" not in lower
        assert len(page.body) < 20_000
        for name, value in page.headers:
            assert "\r" not in value and "\n" not in value, name
        assert headers["content-language"] == lang
    _, body, _ = _page(renderer, _blocked(engine), host="<b>bold</b>.example")
    assert "&lt;b&gt;bold&lt;/b&gt;.example" in body
    _, body, _ = _page(renderer, _blocked(engine), host="{{7*7}}{%raw%}")
    assert "{{7*7}}{%raw%}" in body and ">49" not in body  # input is never a template
    # a "host" with spaces is no host name: not shown (no sentences injected)
    _, body, _ = _page(renderer, _blocked(engine), host="Call 0800 to unblock")
    assert "0800" not in body


def test_long_host_is_cut(engine: Engine, renderer: Renderer) -> None:
    _, body, _ = _page(renderer, _blocked(engine), host="a" * 5000)
    assert "a" * 253 + "\u2026" in body and "a" * 254 not in body


@pytest.mark.parametrize("value", [
    "<script>alert(1)</script>", '"\'><x>', "de\r\nX: 1", "\u202e\u0000", "x" * 100_000,
    "text/html<script>", "*/*;q=\"<script>\"",
])
def test_hostile_header_values(engine: Engine, renderer: Renderer, value: str) -> None:
    for accept, lang, dest in ((value, None, None), (None, value, None), (None, None, value),
                               (value, value, value)):
        page, body, headers = _page(renderer, _blocked(engine), accept=accept,
                                    accept_language=lang, sec_fetch_dest=dest)
        assert page.status == 451
        assert "<script" not in body.lower() and "<x>" not in body
        assert headers["content-language"] in ("en", "de", "fr")
        for _, header in page.headers:
            assert "\r" not in header and "\n" not in header
        if headers["content-type"].startswith("text/html"):
            _assert_safe_html(body)


def test_unsafe_links_from_a_bundle_are_not_links(renderer: Renderer) -> None:
    transparency = Transparency(
        issuer="<b>Authority</b>", legal_basis="Act & <i>Regulation</i>",
        contact="javascript:alert(1)", appeal_url="https://appeal.example/?a=1&b=\"><script>",
        hotline_url="data:text/html,<script>alert(1)</script>")
    verdict = Verdict(Action.BLOCK, Match("x", 3, "X-1", "csam", "domain", "authority",
                                          "x.example/"), transparency=transparency)
    _, body, _ = _page(renderer, verdict)
    _assert_safe_html(body)
    assert "&lt;b&gt;Authority&lt;/b&gt;" in body and "Act &amp; &lt;i&gt;" in body
    assert 'href="javascript:' not in body and 'href="data:' not in body
    assert "javascript:alert(1)" in body  # shown as text, not as a link
    assert 'href="https://appeal.example/?a=1&amp;b=&#34;&gt;&lt;script&gt;"' in body


# ---------------------------------------------------------------- accessibility, resources


def _ratio(a: str, b: str) -> float:
    """WCAG 2.x contrast ratio of two #rrggbb colours."""

    def luminance(colour: str) -> float:
        channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_contrast_ratio_function() -> None:
    assert _ratio("#000000", "#ffffff") == pytest.approx(21.0)
    assert _ratio("#767676", "#ffffff") == pytest.approx(4.54, abs=0.01)
    assert _ratio("#777777", "#ffffff") < 4.5


def test_colours_meet_wcag_aa_contrast(engine: Engine, renderer: Renderer) -> None:
    _, body, _ = _page(renderer, _blocked(engine))
    style = _parse(body).texts["style"].lower()
    texts = set(re.findall(r"(?<![-\w])color\s*:\s*(#[0-9a-f]{6})\b", style))
    backgrounds = set(re.findall(r"background(?:-color)?\s*:\s*(#[0-9a-f]{6})\b", style))
    assert texts == TEXT_COLOURS and backgrounds == BACKGROUNDS  # the colours, stated
    assert not re.search(r"(?<![-\w])color\s*:(?!\s*#[0-9a-f]{6}\b)", style)
    for text in texts:
        for background in backgrounds:
            assert _ratio(text, background) >= 4.5, (text, background)
    # the worst pair, for the record
    assert min(_ratio(t, b) for t in texts for b in backgrounds) > 6.5
    # links are underlined: their meaning is not carried by colour alone
    assert re.search(r"\ba\s*\{[^}]*text-decoration:\s*underline", style)


def test_phone_layout_reflows_at_320px(engine: Engine, renderer: Renderer) -> None:
    _, body, _ = _page(renderer, _blocked(engine))
    parsed = _parse(body)
    assert ("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}) \
        in parsed.tags
    style = parsed.texts["style"]
    for prop, value in re.findall(r"((?:min-|max-)?width)\s*:\s*([^;}]+)", style):
        for number, unit in re.findall(r"([\d.]+)\s*(px|rem|em|vw|%)?", value):
            if prop != "max-width" and unit in ("px", ""):
                assert float(number) <= 320, (prop, value)
            if prop == "min-width" and unit in ("rem", "em"):
                assert float(number) * 16 <= 320, (prop, value)
    assert "overflow-wrap: anywhere" in style  # long names and references wrap


@pytest.mark.parametrize("lang", ["en", "de", "fr"])
def test_no_external_resources(engine: Engine, renderer: Renderer, lang: str) -> None:
    for verdict in (_blocked(engine), Verdict(Action.ALLOW)):
        _, body, headers = _page(renderer, verdict, accept_language=lang)
        parsed = _assert_safe_html(body)
        assert "<script" not in body and "<link" not in body
        # anchors only, to the appeal, hotline, operator and help addresses
        hrefs = {attrs["href"] for tag, attrs in parsed.tags if "href" in attrs}
        assert hrefs <= {APPEAL, "mailto:appeals@authority.example", HOTLINE,
                         OPERATOR["operator_url"]}
        assert "default-src 'none'" in headers["content-security-policy"]


# ---------------------------------------------------------------- operator templates


def test_operator_template_directory_overrides(engine: Engine, tmp_path: Path) -> None:
    own = tmp_path / "own-templates"
    own.mkdir()
    (own / "stop.en.html").write_text(
        '<!DOCTYPE html><html lang="{{ lang }}"><head><title>Our stop page</title></head>'
        "<body><main><h1>OPERATOR PAGE</h1><p>{{ host }} {{ ref }} {{ issuer }}</p>"
        "</main></body></html>\n", encoding="utf-8")
    (own / "stop.it.html").write_text(
        '{% extends "base.html" %}{% block title %}Accesso limitato{% endblock %}'
        "{% block content %}<h1>Accesso limitato</h1><p>{{ ref }}</p>{% endblock %}\n",
        encoding="utf-8")
    (own / "stop.it.txt").write_text("Accesso limitato {{ ref }}\n", encoding="utf-8")
    settings = _settings(tmp_path, {"templates": "own-templates"})
    renderer = Renderer(_stoppage(settings), base=settings.base)  # relative to the config
    assert renderer.languages == ["de", "en", "fr", "it"]
    _, body, _ = _page(renderer, _blocked(engine), host="<i>x</i>")
    assert "OPERATOR PAGE" in body and "DEMO-0001" in body and ISSUER in body
    assert "&lt;i&gt;x&lt;/i&gt;" in body  # autoescape holds in the operator's template
    _, body, headers = _page(renderer, _blocked(engine), accept_language="it")
    assert headers["content-language"] == "it" and "Accesso limitato" in body
    assert '<html lang="it">' in body  # the shipped base.html, extended
    _, body, _ = _page(renderer, _blocked(engine), accept_language="de")
    assert "Rechtsgrundlage" in body  # the shipped German page still applies
    _, body, _ = _page(renderer, _blocked(engine), accept="image/*", accept_language="it")
    assert body == "Accesso limitato DEMO-0001\n"


def test_broken_operator_templates_fail_at_start(tmp_path: Path) -> None:
    own = tmp_path / "broken"
    own.mkdir()
    (own / "stop.en.html").write_text("{% if %}", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"stop\.en\.html"):
        Renderer(_stoppage(_settings(tmp_path, {"templates": str(own)})))
    (own / "stop.en.html").write_text("{{ nothing.at.all }}", encoding="utf-8")
    with pytest.raises(ConfigError, match="does not render"):
        Renderer(_stoppage(_settings(tmp_path, {"templates": str(own)})))
    (own / "stop.en.html").unlink()
    (own / "stop.es.html").write_text("<p>{{ ref }}</p>", encoding="utf-8")  # no stop.es.txt
    with pytest.raises(ConfigError, match=r"stop\.es\.txt"):
        Renderer(_stoppage(_settings(tmp_path, {"templates": str(own)})))
    with pytest.raises(ConfigError, match="not a directory"):
        Renderer(_stoppage(_settings(tmp_path, {"templates": str(tmp_path / "missing")})))


def test_template_failing_at_run_time_gets_the_built_in_page(engine: Engine,
                                                             tmp_path: Path) -> None:
    own = tmp_path / "fragile"
    own.mkdir()
    # renders for the start-up trial (ref SAMPLE-1), fails for the real entry
    (own / "stop.en.html").write_text(
        '{{ 1 // (0 if ref == "DEMO-0001" else 1) }}', encoding="utf-8")
    renderer = Renderer(_stoppage(_settings(tmp_path, {"templates": str(own)})))
    page, body, headers = _page(renderer, _blocked(engine), host="<script>")
    assert page.status == 451 and headers["content-type"].startswith("text/html")
    assert "DEMO-0001" in body and '<html lang="en">' in body and "<title>" in body
    assert "<script" not in body
    _assert_safe_html(body)


def test_templates_ship_with_the_package() -> None:
    from netfilter.stoppage.render import SHIPPED_TEMPLATES

    names = {p.name for p in SHIPPED_TEMPLATES.iterdir()}
    assert {"base.html", "base.txt"} <= names
    for lang in ("en", "de", "fr"):
        assert {f"stop.{lang}.html", f"stop.{lang}.txt"} <= names
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"stoppage/templates/*"' in pyproject


def test_now_in_another_zone_is_shown_in_utc(engine: Engine, renderer: Renderer) -> None:
    when = datetime(2025, 3, 4, 15, 45, 7, tzinfo=timezone(timedelta(hours=2)))
    page = renderer.render(_blocked(engine), host=None, accept=None, accept_language=None,
                           now=when)
    assert b"2025-03-04 13:45:07 UTC" in page.body
    page = renderer.render(_blocked(engine), host=None, accept=None, accept_language=None)
    assert datetime.now(UTC).strftime("%Y-%m-%d").encode() in page.body


# ---------------------------------------------------------------- kept pages


LATER = datetime(2031, 12, 30, 23, 59, 58, 999_999, tzinfo=UTC)


def test_kept_pages_are_the_pages_rendered_afresh(tmp_path: Path) -> None:
    """Pages answered from the cache are byte for byte what a render gives, with each
    request's own time; the list's text, entry, host and language all tell pages apart."""
    full = _settings(tmp_path, {**OPERATOR, **HELP}, local=True)
    engine, settings = Engine(full), _stoppage(full)
    kept, fresh = Renderer(settings), Renderer(settings, cache_size=0)
    assert fresh.cache_size == 0 and not fresh._kept
    assert kept._kept == {(lang, html) for lang in ("de", "en", "fr") for html in (True, False)}
    match = Match("x", 3, "X-1", "csam", "domain", "authority", "x.example/")
    one = Transparency(issuer="One", appeal_url=APPEAL, translations={"de": {"issuer": "Eins"}})
    two = Transparency(issuer="Two", hotline_url=HOTLINE)  # the same entry, a reloaded list
    verdicts = [_blocked(engine), _blocked(engine, "gambling.example"), Verdict(Action.ALLOW),
                Verdict(Action.BLOCK, match, transparency=one),
                Verdict(Action.BLOCK, match, transparency=two), Verdict(Action.BLOCK, match),
                Verdict(Action.BLOCK)]
    hosts = [None, "blocked.example", "x.example", "<script>alert(1)</script>", "a" * 300]
    calls = [dict(verdict=v, host=h, accept=accept, accept_language=lang)
             for v in verdicts for h in hosts for accept in ("text/html", "image/png")
             for lang in ("en", "de-DE", "fr;q=0.5")]
    for now in (NOW, LATER, NOW.replace(microsecond=123)):
        for call in calls:
            page = kept.render(**call, now=now)  # type: ignore[arg-type]
            assert page == fresh.render(**call, now=now), call  # type: ignore[arg-type]
            assert now.strftime("%Y-%m-%d %H:%M:%S UTC").encode() in page.body
        # the two verdicts without a match share pages; the 300-character host is not kept
        assert len(kept._pages) == (len(verdicts) - 1) * (len(hosts) - 1) * 2 * 3
    page = kept.render(verdicts[3], host="x.example", accept=None, accept_language="de",
                       now=LATER)
    assert b"Eins" in page.body and b"2031-12-30T23:59:58Z" in page.body
    assert b"2025" not in page.body and b"nftime" not in page.body


def test_templates_that_use_the_time_otherwise_are_rendered_each_time(
        engine: Engine, tmp_path: Path) -> None:
    own = tmp_path / "timed"
    own.mkdir()
    (own / "stop.en.html").write_text(
        "<p>{{ ref }} in {{ time.year }}, "
        "{% if time.hour < 12 %}morning{% else %}afternoon{% endif %}</p>", encoding="utf-8")
    (own / "stop.en.txt").write_text('{{ time_text|replace("UTC", "GMT") }}', encoding="utf-8")
    (own / "stop.it.html").write_text("<p>{{ ref }} {{ time_iso }}</p>", encoding="utf-8")
    (own / "stop.it.txt").write_text("{{ ref }} {{ time_text }}", encoding="utf-8")
    renderer = Renderer(_stoppage(_settings(tmp_path, {"templates": str(own)})))
    assert ("en", True) not in renderer._kept and ("en", False) not in renderer._kept
    assert {("it", True), ("it", False), ("de", True)} <= renderer._kept
    verdict = _blocked(engine)
    for now, shown in ((NOW, "DEMO-0001 in 2025, afternoon"),
                       (LATER.replace(hour=9), "DEMO-0001 in 2031, morning"),
                       (NOW, "DEMO-0001 in 2025, afternoon")):
        page = renderer.render(verdict, host=None, accept=None, accept_language="en", now=now)
        assert page.body.decode() == f"<p>{shown}</p>"
        page = renderer.render(verdict, host=None, accept="image/*", accept_language="en",
                               now=now)
        assert page.body.decode() == now.strftime("%Y-%m-%d %H:%M:%S GMT")
        page = renderer.render(verdict, host=None, accept=None, accept_language="it", now=now)
        assert page.body.decode() == f"<p>DEMO-0001 {now.strftime('%Y-%m-%dT%H:%M:%SZ')}</p>"
    assert {key[:2] for key in renderer._pages} == {("it", True)}


@pytest.mark.parametrize(("source", "kept"), [
    ("{{ time_iso }} {{ time_text }} {{ ref|upper }}", True),
    ("{% if blocked %}{% for i in range(2) %}{{ time_text }}{% endfor %}{% endif %}", True),
    ('{% extends "base" %}{% block b %}{{ super() }} {{ time_iso }}{% endblock %}', True),
    ('{% include "base" %}{{ self.b() }}', True),
    ("no time at all", True),
    ("{{ time }}", False),
    ("{% if ref == 'X' %}{{ time.strftime('%H') }}{% endif %}", False),
    ("{{ time_iso[:4] }}", False),
    ("{{ time_text|lower }}", False),
    ("{% if time_iso %}x{% endif %}", False),
    ("{% set t %}{{ time_text }}{% endset %}{{ t|upper }}", False),
    ("{% filter upper %}{{ time_text }}{% endfilter %}", False),
    ('{% filter upper %}{% include "base" %}{% endfilter %}', False),
    ("{% macro m() %}{{ time_iso }}{% endmacro %}{{ m() }}", False),
    ('{% extends "caught" %}{% block b %}{{ time_iso }}{% endblock %}', False),
    ("{% with time_iso = 'x' %}{{ time_iso }}{% endwith %}", False),
    ("{{ super()|lower }}", False),
    ('{% import "base" as b %}{{ b }}', False),
    ("{% extends layout %}", False),
    ('{% include "missing" %}', False),
    ("{{ lipsum() }}", False),
    ("{{ [1, 2]|random }}", False),
])
def test_which_templates_show_the_time_only_as_text(source: str, kept: bool) -> None:
    from jinja2 import DictLoader
    from jinja2.sandbox import SandboxedEnvironment

    from netfilter.stoppage.render import _time_only_shown

    env = SandboxedEnvironment(loader=DictLoader({
        "page": source, "base": "<p>{% block b %}{{ time_text }}{% endblock %}</p>",
        "caught": "{% filter lower %}{% block b %}{% endblock %}{% endfilter %}"}))
    assert _time_only_shown(env, "page") is kept


def test_a_failing_template_is_never_kept(engine: Engine, tmp_path: Path) -> None:
    own = tmp_path / "fragile"
    own.mkdir()
    (own / "stop.en.html").write_text(
        '{{ 1 // (0 if ref == "DEMO-0001" else 1) }} {{ time_text }}', encoding="utf-8")
    renderer = Renderer(_stoppage(_settings(tmp_path, {"templates": str(own)})))
    assert ("en", True) in renderer._kept
    for now in (NOW, LATER):
        page = renderer.render(_blocked(engine), host=None, accept=None, accept_language=None,
                               now=now)
        body = page.body.decode()
        assert "DEMO-0001" in body and "<title>" in body  # the built-in page, every time
        assert now.strftime("%Y-%m-%d %H:%M:%S UTC") in body
    assert renderer._pages == {}


# ---------------------------------------------------------------- the server

T = TypeVar("T")


def _serve(engine: Engine, settings: StoppageSettings, client: Callable[[int], T],
           **options: Any) -> T:
    """Start the server in this thread's event loop, run `client(port)` in a thread."""

    async def main() -> T:
        server = StopPageServer(engine, settings, **options)
        await server.start()
        assert server.address is not None and server.address[0] == "127.0.0.1"
        try:
            return await asyncio.wait_for(asyncio.to_thread(client, server.port), 60)
        finally:
            await server.stop()

    return asyncio.run(main())


def _get(port: int, host: str | None, path: str = "/", method: str = "GET",
         headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        conn.close()


def _raw(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def served(tmp_path: Path) -> tuple[Engine, StoppageSettings, MemorySink]:
    sink = MemorySink()
    settings = _settings(tmp_path, OPERATOR)
    return Engine(settings, sink), _stoppage(settings), sink


def test_server_blocked_host(served: tuple[Engine, StoppageSettings, MemorySink]) -> None:
    engine, settings, sink = served

    def client(port: int) -> None:
        status, headers, body = _get(port, "blocked.example",
                                     headers={"Accept": "text/html",
                                              "Accept-Language": "de-DE,de;q=0.9"})
        assert status == 451
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert headers["content-language"] == "de" and headers["cache-control"] == "no-store"
        assert headers["link"] == '<https://net.example/blocking>; rel="blocked-by"'
        assert headers["connection"] == "close" and "date" in headers
        assert int(headers["content-length"]) == len(body)
        text = body.decode()
        assert "DEMO-0001" in text and "Demo-Sperrbehörde" in text and "blocked.example" in text
        # with a port, a trailing dot, upper case, a subdomain, a path: the same entry
        for host, path in (("blocked.example:8081", "/any/path?q=1"), ("BLOCKED.example.", "/"),
                           ("www.blocked.example", "/x")):
            status, _, body = _get(port, host, path)
            assert status == 451 and b"DEMO-0001" in body, host
            assert b"any/path" not in body
        # an image on the blocked host: the short text answer
        status, headers, body = _get(port, "blocked.example", "/x.png",
                                     headers={"Accept": "image/*", "Sec-Fetch-Dest": "image"})
        assert status == 451 and headers["content-type"].startswith("text/plain")
        assert b"DEMO-0001" in body

    _serve(engine, settings, client)
    blocks = [e for e in sink.events if e.type == "block"]
    assert blocks and all(e.frontend == "stoppage" and e.ref == "DEMO-0001" for e in blocks)
    assert blocks[0].detail == "GET"


def test_server_clean_missing_and_odd_hosts(
        served: tuple[Engine, StoppageSettings, MemorySink]) -> None:
    engine, settings, _ = served

    def client(port: int) -> None:
        for host in ("clean.example", "clean.example:80", "[::1]:8081", "[::1]", "127.0.0.1",
                     "<script>alert(1)</script>", "", "x" * 1000):
            status, headers, body = _get(port, host)
            assert status == 451, host
            assert headers["content-type"] == "text/html; charset=utf-8"
            text = body.decode()
            assert "DEMO-" not in text and "restricted on this network" in text
            assert "<script>" not in text
        status, _, body = _get(port, "<script>alert(1)</script>")
        assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in body
        # HTTP/1.1 requires a Host field: 400; so does a repeated one
        status, headers, body = _get(port, None)
        assert status == 400 and headers["connection"] == "close"
        answer = _raw(port, b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        # HTTP/1.0 without Host: the generic page
        answer = _raw(port, b"GET / HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 451 Unavailable For Legal Reasons\r\n")
        assert b"restricted on this network" in answer
        # absolute-form target: its authority names the host
        answer = _raw(port, b"GET http://blocked.example/dir/ HTTP/1.1\r\nHost: x.example\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 451 ") and b"DEMO-0001" in answer
        # raw UTF-8 and Latin-1 in Host
        answer = _raw(port, "GET / HTTP/1.1\r\nHost: bl\u00f6cked.example\r\n\r\n"
                      .encode())
        assert answer.startswith(b"HTTP/1.1 451 ") and "blöcked.example".encode() in answer
        answer = _raw(port, b"GET / HTTP/1.1\r\nHost: bl\xf6cked.example\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 451 ")
        # bare LF line ends, HEAD, POST with a body
        answer = _raw(port, b"GET / HTTP/1.1\nHost: blocked.example\n\n")
        assert answer.startswith(b"HTTP/1.1 451 ") and b"DEMO-0001" in answer
        status, headers, body = _get(port, "blocked.example", method="HEAD")
        assert status == 451 and body == b"" and int(headers["content-length"]) > 1000
        status, _, body = _get(port, "blocked.example", method="POST", body=b"x" * 100_000)
        assert status == 451 and b"DEMO-0001" in body

    _serve(engine, settings, client)


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"\x00\xff\xfe garbage \x01\x02\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)), 400),  # TLS hello
    (b"GET\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n", 400),
    (b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/10.1\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\n", 400),  # ends before the empty line
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 10_000 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 431),
])
def test_server_refuses_garbage(served: tuple[Engine, StoppageSettings, MemorySink],
                                request_bytes: bytes, status: int) -> None:
    engine, settings, _ = served

    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request_bytes)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:80]
        assert b"Connection: close\r\n" in answer and b"Cache-Control: no-store" in answer
        # and the server still answers
        assert _get(port, "blocked.example")[0] == 451

    _serve(engine, settings, client)


def test_server_oversized_headers_with_http_client(
        served: tuple[Engine, StoppageSettings, MemorySink]) -> None:
    engine, settings, _ = served

    def client(port: int) -> None:
        status, headers, _ = _get(port, "blocked.example", headers={"X-Big": "y" * MAX_HEAD})
        assert status == 431 and headers["connection"] == "close"
        near = MAX_HEAD - 200  # just under the limit is fine
        status, _, _ = _get(port, "blocked.example", headers={"X-Big": "y" * near})
        assert status == 451

    _serve(engine, settings, client)


def test_server_bounds_slow_clients_and_keeps_answering(
        served: tuple[Engine, StoppageSettings, MemorySink]) -> None:
    engine, settings, _ = served

    def client(port: int) -> None:
        results: dict[str, Any] = {}

        def slow(name: str, data: bytes) -> None:
            start = time.monotonic()
            results[name] = (_raw(port, data, timeout=10), time.monotonic() - start)

        threads = [threading.Thread(target=slow, args=("partial", b"GET / HTTP/1.1\r\nHost: b")),
                   threading.Thread(target=slow, args=("silent", b""))]
        for thread in threads:
            thread.start()
        time.sleep(0.1)
        # while two clients dawdle, others are served at once
        start = time.monotonic()
        for _ in range(5):
            assert _get(port, "blocked.example")[0] == 451
        assert time.monotonic() - start < 1.0
        for thread in threads:
            thread.join(10)
        answer, took = results["partial"]
        assert answer.startswith(b"HTTP/1.1 408 ") and 0.4 < took < 3.0
        answer, took = results["silent"]
        assert answer.startswith(b"HTTP/1.1 408 ") and took < 3.0
        # a client that connects and leaves at once costs nothing
        for _ in range(3):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        status, _, body = _get(port, "blocked.example")
        assert status == 451 and b"DEMO-0001" in body

    _serve(engine, settings, client, read_timeout=0.5)


def test_server_limits_concurrent_clients(
        served: tuple[Engine, StoppageSettings, MemorySink]) -> None:
    engine, settings, _ = served

    def client(port: int) -> None:
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            time.sleep(0.2)
            # over the limit: the idle connection makes room, the request is answered
            answer = _raw(port, b"GET / HTTP/1.1\r\nHost: blocked.example\r\n\r\n",
                          timeout=5)
            assert answer.startswith(b"HTTP/1.1 451 ")
            idle.settimeout(5)
            with contextlib.suppress(ConnectionResetError):  # the idle one made room
                assert idle.recv(1) == b""
        finally:
            idle.close()
        time.sleep(0.2)
        assert _get(port, "blocked.example")[0] == 451

    _serve(engine, settings, client, max_clients=1)


def test_server_stops_with_clients_connected(
        served: tuple[Engine, StoppageSettings, MemorySink]) -> None:
    engine, settings, _ = served

    async def main() -> None:
        server = StopPageServer(engine, settings)
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\n")
        await asyncio.sleep(0.1)
        start = time.monotonic()
        await server.stop()
        assert time.monotonic() - start < 3.0
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", server.port)

    asyncio.run(main())


def test_split_host() -> None:
    assert split_host("a.example:8081") == "a.example"
    assert split_host("a.example:") == "a.example"
    assert split_host("a.example") == "a.example"
    assert split_host("[::1]:80") == "[::1]"
    assert split_host("[::1]") == "[::1]"
    assert split_host("::1") == "::1"
    assert split_host("a.example:port") == "a.example:port"
    assert split_host(" a.example ") == "a.example"
