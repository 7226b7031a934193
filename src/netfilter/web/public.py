"""The public transparency page, `/transparency` (HTML, `?lang=de|fr` or Accept-Language)
and its machine-readable twin `/transparency.json`: routes over a `TransparencySource`.

No login, no cookies, no scripts, no external resources (the stop page's CSP); the page
shows only the snapshot, which holds nothing about a client or a blocked name.
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from netfilter.stoppage.render import CSP, choose_language, link
from netfilter.web.messages import LANGUAGES, MESSAGES
from netfilter.web.transparency import TransparencySource

__all__ = ["transparency_routes"]

TEMPLATES = Path(__file__).parent / "templates"
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "public, max-age=60"}


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), auto_reload=False,
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.globals["link"] = link
    return env


def language(request: Request, default: str) -> str:
    """`?lang=` when it names a language of the page, else Accept-Language."""
    asked = request.query_params.get("lang", "").strip().lower()
    if asked in LANGUAGES:
        return asked
    return choose_language(request.headers.get("accept-language"), LANGUAGES,
                           default if default in LANGUAGES else "en")


def transparency_routes(source: TransparencySource, default_language: str = "en") -> list[Route]:
    template = _environment().get_template("transparency.html")

    async def page(request: Request) -> Response:
        data = await source.snapshot()
        lang = language(request, default_language)
        lists = []
        for item in data["lists"]:
            text = {k: item.get(k) for k in ("issuer", "legal_basis", "contact")}
            text |= {"appeal_url": item.get("appeal"), "hotline_url": item.get("hotline")}
            text |= item.get("translations", {}).get(lang, {})
            lists.append(item | {"text": text})
        body = template.render(lang=lang, languages=LANGUAGES, t=MESSAGES[lang], d=data,
                               lists=lists)
        return Response(body, media_type="text/html; charset=utf-8", headers={
            **HEADERS, "Content-Language": lang, "Content-Security-Policy": CSP,
            "Vary": "Accept-Language"})

    async def twin(_request: Request) -> Response:
        data = await source.snapshot()
        body = json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True)
        return Response(body + "\n", media_type="application/json", headers={
            **HEADERS, "Access-Control-Allow-Origin": "*"})

    return [Route("/transparency", page, methods=["GET", "HEAD"]),
            Route("/transparency.json", twin, methods=["GET", "HEAD"])]
