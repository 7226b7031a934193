"""The stop page: one Renderer, used by the proxy and by the stop page server.

A Verdict in, a complete answer out: status 451 (RFC 7725), headers and body. The page
says that access was restricted, by whom, on what legal basis, the list, its version
and the entry reference, the date and time, how to appeal and where to report abuse
material; never anything of the blocked address's content and never other entries.

Templates are Jinja2, autoescaped, rendered in a sandbox. One pair per language:
`stop.<lang>.html` and `stop.<lang>.txt` (for requests that do not accept HTML), both
usually extending `base.html`/`base.txt`. An operator's directory
(`stoppage.templates`) is searched before the shipped one, so it can override any
single file or add a language. Every template is compiled and trial-rendered once, at
start: a broken template is a ConfigError then, not a failure on a user's request.

What the request brings (host name, Accept, Accept-Language, Sec-Fetch-Dest) never
reaches the page unescaped: the language is one of the available ones, the host name
is shown only escaped, stripped of control characters and cut to a host name's length,
and nothing else from the request is shown at all.
"""

from __future__ import annotations

import logging
import re
import secrets
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from jinja2 import ChoiceLoader, FileSystemLoader, Template, TemplateError, nodes, select_autoescape
from jinja2.sandbox import SandboxedEnvironment
from markupsafe import Markup, escape

from netfilter.config import Settings, StoppageSettings, parse_hostport
from netfilter.engine import Action, Verdict
from netfilter.errors import ConfigError
from netfilter.listfile import TransparencyText
from netfilter.matcher import Match
from netfilter.memo import remember

__all__ = [
    "CSAM_CATEGORIES",
    "REASON",
    "SHIPPED_TEMPLATES",
    "STATUS",
    "Renderer",
    "StopPage",
    "blocked_by_url",
    "choose_language",
    "wants_html",
]

log = logging.getLogger(__name__)

STATUS = 451
REASON = "Unavailable For Legal Reasons"
SHIPPED_TEMPLATES = Path(__file__).parent / "templates"
# Categories the page words as child sexual abuse material (and offers the help service).
CSAM_CATEGORIES = frozenset({"csam"})
MAX_HOST_SHOWN = 253  # a DNS name's longest text form
LINK_SCHEMES = ("http:", "https:", "mailto:", "tel:")
CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

_LANG_TAG = re.compile(r"[a-z]{2,3}(?:-[a-z0-9]{1,8})*")
_TEMPLATE_NAME = re.compile(r"stop\.([a-z]{2,3}(?:-[a-z0-9]{1,8})*)\.html")
_RANGE_TAG = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*|\*")
_QVALUE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
_MEDIA_RANGE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+")
MAX_RANGES = 64  # list items looked at in Accept / Accept-Language; the rest is ignored
MAX_FIELD = 4096  # characters of Accept / Accept-Language looked at
PAGE_CACHE_SIZE = 1024  # rendered pages kept; cleared wholesale when full
TIME_ISO = "%Y-%m-%dT%H:%M:%SZ"
TIME_TEXT = "%Y-%m-%d %H:%M:%S UTC"

HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
ANY_TYPES = frozenset({"*/*", "text/*"})
# Sec-Fetch-Dest (Fetch standard): documents get the page, subresources plain text.
HTML_DESTS = frozenset({"document", "iframe", "frame", "nested-document"})
OTHER_DESTS = frozenset({
    "audio", "audioworklet", "empty", "font", "image", "json", "manifest", "paintworklet",
    "report", "script", "serviceworker", "sharedworker", "style", "track", "video",
    "webidentity", "worker", "xslt",
})


class StopPage(NamedTuple):
    """A complete answer. `headers` has no Date, Content-Length or Connection: the
    server (or the proxy) that sends it adds those."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


# ---------------------------------------------------------------- negotiation


def _weighted(field: str | None, pattern: re.Pattern[str]) -> list[tuple[str, float]]:
    """`item;q=0.5, item2` -> [(item, q), ...] in header order; malformed items dropped."""
    if not field:
        return []
    out: list[tuple[str, float]] = []
    for part in field[:MAX_FIELD].split(",")[:MAX_RANGES]:
        item, *params = (p.strip() for p in part.split(";"))
        if not pattern.fullmatch(item):
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                q = float(value) if _QVALUE.fullmatch(value) else -1.0
        if q >= 0:
            out.append((item.lower(), q))
    return out


def choose_language(accept_language: str | None, available: Sequence[str], default: str) -> str:
    """The best of `available` for an Accept-Language field (RFC 9110 12.5.4), by RFC 4647
    lookup: ranges in order of q (ties keep header order), each tried whole and then
    with subtags cut off from the end (`de-DE` finds `de`). `*` stands for the default.
    Nothing usable, or a garbage field: `default`."""
    by_lower = {lang.lower(): lang for lang in available}
    ranges = _weighted(accept_language, _RANGE_TAG)
    excluded = {tag for tag, q in ranges if q == 0}
    for tag, _q in sorted((r for r in ranges if r[1] > 0), key=lambda r: -r[1]):
        if tag == "*":
            choices = [default, *available]
            return next((lang for lang in choices
                         if lang.lower() in by_lower and lang.lower() not in excluded), default)
        while tag:
            if tag in by_lower and tag not in excluded:
                return by_lower[tag]
            tag = tag.rpartition("-")[0]
            while "-" in tag and len(tag.rpartition("-")[2]) == 1:
                tag = tag.rpartition("-")[0]  # a singleton (like `x`) never ends a tag
    return default


def wants_html(accept: str | None, sec_fetch_dest: str | None) -> bool:
    """Should this request get the HTML page (else a short text/plain answer)?

    Sec-Fetch-Dest decides where a browser sent it: documents and frames get HTML,
    images, scripts, styles, fonts, fetch/XHR (`empty`) and the like do not. Otherwise
    the Accept field: HTML when it names text/html or XHTML (q > 0), or when it accepts
    anything (`*/*`, `text/*`) without naming a more specific type; not when it names
    only other types (an image or an XHR asking for JSON). No Accept field: HTML.
    """
    dest = (sec_fetch_dest or "").strip().lower()
    if dest in HTML_DESTS:
        return True
    if dest in OTHER_DESTS:
        return False
    if accept is None or not accept.strip():
        return True
    ranges = _weighted(accept, _MEDIA_RANGE)
    if not ranges:
        return True  # nothing readable: as if there were no Accept field
    if any(t in HTML_TYPES and q > 0 for t, q in ranges):
        return True
    if any(t in HTML_TYPES for t, _ in ranges):
        return False  # text/html;q=0: refused explicitly
    return all(t in ANY_TYPES for t, q in ranges if q > 0) and any(q > 0 for _, q in ranges)


# ---------------------------------------------------------------- helpers


def _href(url: object) -> str:
    """`url` when it is safe as a link target (http, https, mailto, tel), else ''."""
    if not isinstance(url, str):
        return ""
    text = url.strip()
    if not text.lower().startswith(LINK_SCHEMES):
        return ""
    if any(c.isspace() or unicodedata.category(c)[0] == "C" for c in text):
        return ""
    return text


def _link_text(url: str) -> str:
    text = url.strip()
    for prefix in ("mailto:", "tel:"):
        if text.lower().startswith(prefix):
            return text[len(prefix):]
    return text


def link(url: object) -> Markup:
    """An <a> for a safe link target, plain (escaped) text for anything else."""
    if url is None or url == "":
        return Markup("")
    target = _href(url)
    if not target:
        return escape(str(url))
    return Markup('<a href="{}" rel="noreferrer noopener">{}</a>').format(
        target, _link_text(target))


def shown_host(host: str | None) -> str | None:
    """The host name as the page may show it: no control or format characters, no
    whitespace inside, at most a DNS name's length (longer: cut, with an ellipsis)."""
    if not host:
        return None
    text = "".join(c for c in host if unicodedata.category(c)[0] != "C").strip()
    if not text or any(c.isspace() or unicodedata.category(c)[0] == "Z" for c in text):
        return None  # a host name has no spaces: this is no host name, and not shown
    if len(text) > MAX_HOST_SHOWN:
        text = text[:MAX_HOST_SHOWN] + "\u2026"
    return text


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        return now.replace(tzinfo=UTC)
    return now.astimezone(UTC)


TRANSPARENCY_PATH = "/transparency"
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def blocked_by_url(settings: Settings) -> str:
    """The transparency page's URL, which every 451 names (RFC 7725 `Link: <...>;
    rel="blocked-by"`): below `web.public_url`, else at the address of `web.listen` or
    the stop page's listener (a wildcard address: the one DNS answers send browsers
    to, `dns.stoppage_ipv4`, else loopback)."""
    web = settings.web
    if web is not None and web.public_url:
        return web.public_url.rstrip("/") + TRANSPARENCY_PATH
    listen = (web.listen if web is not None and web.listen else None) or (
        settings.stoppage or StoppageSettings()).listen
    host, port = parse_hostport(listen, any_port=True)
    if host in _WILDCARDS:
        host = str(settings.dns.stoppage_ipv4) if settings.dns is not None else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}{'' if port == 80 else f':{port}'}{TRANSPARENCY_PATH}"


def _link_header(url: str) -> str:
    """`<url>; rel="blocked-by"` with anything unsafe in a header percent-encoded."""
    target = quote(url.strip(), safe="/:?#[]@!$&'()*+,;=%~")
    return f'<{target}>; rel="blocked-by"'


# A page can be kept when its template shows the time only as these, untouched.
_TIME_SHOWN = frozenset({"time_iso", "time_text"})
_NOT_KEPT = frozenset({"time", "time_iso", "time_text", "self", "super", "lipsum"})
_CAPTURING = (nodes.FilterBlock, nodes.AssignBlock, nodes.Macro, nodes.CallBlock)
_LOADING = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)


def _as_is(node: nodes.Node) -> bool:
    """`time_iso`, `time_text`, `super()` or `self.<block>()`: output as they are."""
    if isinstance(node, nodes.Name):
        return node.name in _TIME_SHOWN and node.ctx == "load"
    if (not isinstance(node, nodes.Call) or node.args or node.kwargs or node.dyn_args
            or node.dyn_kwargs):
        return False
    target = node.node
    if isinstance(target, nodes.Getattr):
        return isinstance(target.node, nodes.Name) and target.node.name == "self"
    return isinstance(target, nodes.Name) and target.name == "super"


def _time_only_shown(env: SandboxedEnvironment, name: str, captured: bool = False,
                     seen: set[tuple[str, bool]] | None = None) -> bool:
    """Does template `name`, with all it extends, includes and imports, show the time
    only as `{{ time_iso }}`/`{{ time_text }}` straight into the page (never `time`, a
    filter on them, or output caught by a macro, `set` or `filter` block) and nothing
    random? Then a page rendered with stand-ins for the two strings stays right for any
    time. A static check, as a trial render cannot see branches it does not take."""
    seen = set() if seen is None else seen
    if (name, captured) in seen:
        return True
    seen.add((name, captured))
    assert env.loader is not None
    try:
        source, filename, _ = env.loader.get_source(env, name)
        tree = env.parse(source, name, filename)
    except TemplateError:
        return False
    loaded: list[tuple[str, bool]] = []

    def ok(node: nodes.Node, captured: bool) -> bool:
        if isinstance(node, nodes.Output) and not captured:
            return all(_as_is(n) or ok(n, captured) for n in node.nodes)
        if isinstance(node, nodes.Name) and node.name in _NOT_KEPT:
            return False
        if isinstance(node, nodes.Filter) and node.name == "random":
            return False
        if isinstance(node, nodes.Block) and captured:
            return False  # a child's block would be caught
        if isinstance(node, _LOADING):
            target = node.template
            if not (isinstance(target, nodes.Const) and isinstance(target.value, str)):
                return False
            imported = isinstance(node, (nodes.Import, nodes.FromImport))
            loaded.append((target.value, captured or imported))
            return True
        inner = (captured or isinstance(node, _CAPTURING)
                 or (isinstance(node, nodes.For) and node.recursive))  # loop() returns text
        return all(ok(child, inner) for child in node.iter_child_nodes())

    return ok(tree, captured) and all(_time_only_shown(env, other, inside, seen)
                                      for other, inside in loaded)


def _languages(directories: Sequence[Path]) -> list[str]:
    found: set[str] = set()
    for directory in directories:
        for path in directory.glob("stop.*.html"):
            match = _TEMPLATE_NAME.fullmatch(path.name)
            if match:
                found.add(match.group(1))
    return sorted(found)


# ---------------------------------------------------------------- renderer


class Renderer:
    """Renders stop pages; thread-safe once built (templates are loaded once).

    Blocks repeat, and a render costs far more than the rest of a blocked request: the
    page is kept per language, HTML or text, entry, list text and host, rendered with
    stand-ins for `time_iso`/`time_text` that each answer replaces with its own time.
    Only for templates that show the time in no other way (`_time_only_shown`, checked
    at start); one that uses `time` itself is rendered per request (not per second:
    `time` has microseconds, so even that could differ).
    """

    def __init__(self, settings: StoppageSettings, *, base: Path | None = None,
                 cache_size: int = PAGE_CACHE_SIZE, blocked_by: str | None = None) -> None:
        """`base`: the directory a relative `settings.templates` is taken against
        (the config file's, `Settings.base`); without it, the working directory.
        `cache_size`: pages kept (0: none, every answer rendered). `blocked_by`: the
        URL of the Link rel="blocked-by" field (`blocked_by_url`); `operator_url`,
        when configured, is named instead; with neither, no Link field."""
        self.settings = settings
        self.cache_size = cache_size
        # Letters and digits only: autoescaping leaves them as they are, as it does the
        # time strings put in their place; random, so no host name can hold one.
        token = secrets.token_hex(12)
        self._marks = {"time_iso": f"nftimeiso{token}", "time_text": f"nftimetext{token}"}
        self._iso_mark = self._marks["time_iso"].encode("ascii")
        self._text_mark = self._marks["time_text"].encode("ascii")
        self._kept: set[tuple[str, bool]] = set()  # (language, html) whose pages are kept
        self._pages: dict[tuple[object, ...], tuple[object, bytes]] = {}
        directories = [SHIPPED_TEMPLATES]
        if settings.templates is not None:
            own = settings.templates
            if base is not None and not own.is_absolute():
                own = base / own
            if not own.is_dir():
                raise ConfigError("stoppage.templates", f"{own} is not a directory")
            directories.insert(0, own)
        self.directories = directories
        self.env = SandboxedEnvironment(
            loader=ChoiceLoader([FileSystemLoader(str(d)) for d in directories]),
            autoescape=select_autoescape(enabled_extensions=("html", "htm", "xml"),
                                         disabled_extensions=("txt",),
                                         default_for_string=True, default=True),
            auto_reload=False, trim_blocks=True, lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self.env.globals["link"] = link
        self.env.filters["href"] = _href
        self.languages = _languages(directories)
        self.default_language = settings.default_language
        if self.default_language not in self.languages:
            raise ConfigError("stoppage.default_language",
                              f"no stop page template for {self.default_language!r} "
                              f"(available: {', '.join(self.languages) or 'none'})")
        self._html: dict[str, Template] = {}
        self._text: dict[str, Template] = {}
        for lang in self.languages:
            self._html[lang] = self._load(f"stop.{lang}.html")
            self._text[lang] = self._load(f"stop.{lang}.txt")
        target = settings.operator_url or blocked_by
        self._link = _link_header(target) if target else None
        self._trial()

    def _load(self, name: str) -> Template:
        try:
            return self.env.get_template(name)
        except TemplateError as e:
            where = next((str(d / name) for d in self.directories if (d / name).exists()), name)
            raise ConfigError(where, f"stop page template: {e}") from e

    def _trial(self) -> None:
        """Render every template once, blocked and generic, so errors show at start.
        Then choose the templates whose pages are kept: the static check, and (for
        anything random) the same page with stand-ins at two different times."""
        from netfilter.listfile import Transparency

        sample = Verdict(Action.BLOCK, Match("sample", 1, "SAMPLE-1", "csam", "domain",
                                             "authority", "sample.invalid/"),
                         transparency=Transparency(issuer="Sample", legal_basis="Sample"))
        when = _utc(None)
        later = when + timedelta(days=400, hours=13, minutes=31, seconds=17, microseconds=1)
        for lang in self.languages:
            for html, name in ((True, f"stop.{lang}.html"), (False, f"stop.{lang}.txt")):
                template = self._html[lang] if html else self._text[lang]
                same = self.cache_size > 0 and _time_only_shown(self.env, name)
                for verdict in (sample, Verdict(Action.ALLOW)):
                    try:
                        template.render(self._context(verdict, lang, "sample.invalid", when))
                    except Exception as e:
                        raise ConfigError(name, f"stop page template does not render: "
                                                f"{type(e).__name__}: {e}") from e
                    try:
                        same = same and len({
                            template.render(self._context(verdict, lang, "sample.invalid", t)
                                            | self._marks) for t in (when, later)}) == 1
                    except Exception:
                        same = False
                if same:
                    self._kept.add((lang, html))

    def _context(self, verdict: Verdict, lang: str, host: str | None,
                 when: datetime) -> dict[str, Any]:
        s = self.settings
        match = verdict.match if verdict.blocked else None
        text = TransparencyText()
        if match is not None and verdict.transparency is not None:
            text = verdict.transparency.for_language(lang)
        return {
            "lang": lang,
            "status": STATUS,
            "blocked": match is not None,
            "host": shown_host(host),
            "list_id": match.list_id if match else None,
            "list_version": match.list_version if match else None,
            "ref": match.ref if match else None,
            "category": match.category if match else None,
            "kind": match.kind if match else None,
            "local": bool(match and match.source != "authority"),
            "csam": bool(match and match.category in CSAM_CATEGORIES),
            "issuer": text.issuer,
            "legal_basis": text.legal_basis,
            "contact": text.contact,
            "appeal_url": text.appeal_url,
            "hotline_url": text.hotline_url,
            "by": text.issuer or s.operator,
            "operator": s.operator,
            "operator_url": s.operator_url,
            "help_service": s.help_service,
            "help_url": s.help_url,
            "time": when,
            "time_iso": when.strftime(TIME_ISO),
            "time_text": when.strftime(TIME_TEXT),
        }

    def render(self, verdict: Verdict, *, host: str | None, accept: str | None,
               accept_language: str | None, sec_fetch_dest: str | None = None,
               now: datetime | None = None) -> StopPage:
        """The 451 answer for `verdict`: its list's page when it blocks, else a generic
        page that names no list. `host` is the name the client asked for (Host header
        without the port); the other arguments are the request's header fields."""
        lang = choose_language(accept_language, self.languages, self.default_language)
        html = wants_html(accept, sec_fetch_dest)
        when = _utc(now)
        try:
            body = self._body(verdict, lang, html, host, when)
        except Exception:  # an operator's template must never cost the answer
            log.exception("stop page template failed; answering with the built-in page")
            lang = "en"
            body = _fallback(verdict, html, when)
        headers = [
            ("Content-Type", f"text/{'html' if html else 'plain'}; charset=utf-8"),
            ("Content-Language", lang),
            ("Cache-Control", "no-store"),
            ("Vary", "Accept, Accept-Language, Sec-Fetch-Dest"),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
        ]
        if html:
            headers.append(("Content-Security-Policy", CSP))
        if self._link:
            headers.append(("Link", self._link))
        return StopPage(STATUS, headers, body)

    def _body(self, verdict: Verdict, lang: str, html: bool, host: str | None,
              when: datetime) -> bytes:
        """The rendered page: kept (see the class) unless its template uses the time
        otherwise or the host is longer than any shown (kept pages stay small)."""
        template = self._html[lang] if html else self._text[lang]
        if (lang, html) not in self._kept or (host is not None and len(host) > MAX_HOST_SHOWN):
            return template.render(self._context(verdict, lang, host, when)).encode(
                "utf-8", "replace")
        match = verdict.match if verdict.blocked else None
        transparency = verdict.transparency if match is not None else None

        def render(_key: object) -> tuple[object, bytes]:
            context = self._context(verdict, lang, host, when) | self._marks
            return transparency, template.render(context).encode("utf-8", "replace")

        # The list's text by identity (it holds a dict, so it has no hash): the entry
        # keeps the object alive, so no other object can have that id meanwhile.
        key = (lang, html, match, id(transparency), host)
        page = remember(self._pages, key, render, self.cache_size)[1]
        return page.replace(self._iso_mark, when.strftime(TIME_ISO).encode("ascii")).replace(
            self._text_mark, when.strftime(TIME_TEXT).encode("ascii"))


def _fallback(verdict: Verdict, html: bool, when: datetime) -> bytes:
    """A minimal English page when a template fails at run time."""
    match = verdict.match if verdict.blocked else None
    lines = ["Access to this address has been restricted."]
    if match is not None:
        lines.append(f"List {match.list_id}, version {match.list_version}, "
                     f"entry {match.ref}.")
    lines.append(f"Date and time: {when.strftime(TIME_TEXT)}")
    if not html:
        return ("\n".join([f"{STATUS} {REASON}", *lines]) + "\n").encode("utf-8", "replace")
    paragraphs = Markup("").join(Markup("<p>{}</p>\n").format(line) for line in lines[1:])
    page = Markup(
        '<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>Access restricted</title></head>\n"
        "<body><main><h1>{}</h1>\n{}</main></body>\n</html>\n").format(lines[0], paragraphs)
    return str(page).encode("utf-8", "replace")
