"""One HTTP decision for every HTTP front-end: mitmproxy's addon, the Squid helper and
the ICAP server give the same verdict (and entry) for the same request, over the real
engine and demo bundle; and none of them canonicalizes by itself."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from netfilter.config import IcapSettings, load_config
from netfilter.engine import Engine
from netfilter.icap import IcapServer
from netfilter.icap.protocol import parse_http_request
from netfilter.node import make_engine
from netfilter.proxy import NetfilterAddon
from netfilter.squid import SquidHelper
from netfilter.stoppage import Renderer
from tests.proxy_support import write_config

# (URL, the entry that blocks it or None)
CASES = [
    ("http://partly.example/dir/secret.html", "DEMO-0003"),
    ("http://partly.example:8080/dir/secret.html?x=1", "DEMO-0003"),
    ("http://PARTLY.example./dir/./secret.html", "DEMO-0003"),
    ("http://partly.example/%64ir/secret.html", "DEMO-0003"),
    ("http://partly.example/public/page.html?x=1", None),
    ("http://blocked.example/pic.png", "DEMO-0001"),
    ("http://sub.blocked.example/", "DEMO-0001"),
    ("http://www.mixed.example/a/b/page.html", "DEMO-0005"),
    ("http://www.mixed.example/a/b/other.html", None),
    ("http://clean.test/", None),
    ("http://clean.example/x?y=z", None),
]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(load_config(write_config(tmp_path, audit=False)))
    yield engine
    engine.close()


def _authority(url: str) -> str:
    return url.split("/", 3)[2]


def _via_squid(engine: Engine, url: str) -> str | None:
    reply = SquidHelper(engine).lookup(f"0 127.0.0.1 GET {url}".encode())
    if reply.split()[1] == b"ERR":
        return None
    return reply.split(b"ref=")[1].split(b'"')[0].decode()


def _via_icap(engine: Engine, url: str) -> str | None:
    server = IcapServer(engine, IcapSettings(), Renderer(engine.settings.stoppage))  # type: ignore[arg-type]
    head = parse_http_request(f"GET {url} HTTP/1.1\r\nHost: {_authority(url)}".encode())
    verdict = server._decide(head, "127.0.0.1")
    return verdict.match.ref if verdict is not None and verdict.blocked and verdict.match \
        else None


def _via_mitmproxy(config: Path, url: str) -> str | None:
    addon = NetfilterAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, netfilter_config=str(config))
        try:
            flow = tflow.tflow(req=http.Request.make("GET", url, b"",
                                                     {"Host": _authority(url)}))
            addon.requestheaders(flow)
            if flow.response is None or flow.response.status_code != 451:
                return None
            meta = flow.metadata["netfilter"]
            return str(meta["ref"])
        finally:
            addon.done()


def test_every_front_end_decides_the_same(engine: Engine, tmp_path: Path) -> None:
    config = tmp_path / "netfilter.yaml"
    for url, ref in CASES:
        seen = {"squid": _via_squid(engine, url), "icap": _via_icap(engine, url),
                "mitmproxy": _via_mitmproxy(config, url)}
        assert seen == {"squid": ref, "icap": ref, "mitmproxy": ref}, url


@pytest.mark.parametrize("module", ["netfilter.http", "netfilter.http.target",
                                    "netfilter.http.decide", "netfilter.http.hosts",
                                    "netfilter.http.reply", "netfilter.squid",
                                    "netfilter.squid.protocol", "netfilter.squid.helper",
                                    "netfilter.icap", "netfilter.icap.protocol",
                                    "netfilter.icap.server"])
def test_all_names_exist(module: str) -> None:
    loaded = importlib.import_module(module)
    assert loaded.__all__
    for name in loaded.__all__:
        assert hasattr(loaded, name), f"{module}.{name}"


@pytest.mark.parametrize("module", ["netfilter.proxy.addon", "netfilter.http.target",
                                    "netfilter.http.decide", "netfilter.http.hosts",
                                    "netfilter.http.reply", "netfilter.squid.helper",
                                    "netfilter.squid.protocol", "netfilter.icap.server",
                                    "netfilter.icap.protocol"])
def test_front_ends_do_not_canonicalize(module: str) -> None:
    """The engine alone knows how a URL is hashed: no front-end imports canonical."""
    source = inspect.getsource(importlib.import_module(module))
    assert "netfilter.canonical" not in source and "canonical_parts" not in source, module
