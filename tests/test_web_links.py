"""RFC 7725 by default: a 451 from the proxy (a real mitmdump with the addon, asked with
curl) carries `Link: <transparency page>; rel="blocked-by"` when no `operator_url` is
configured: below `web.public_url`, else at the stop page's address.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.proxy_support import MITMDUMP, Curl, Mitmdump, require_tools, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Mitmdump, Curl]]:
    require_tools("curl")
    if not MITMDUMP.exists():
        pytest.skip(f"{MITMDUMP} missing: install the proxy extra (pip install -e .[proxy])")
    config = write_config(tmp_path)
    data: dict[str, Any] = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["stoppage"] = {"listen": "127.0.0.1:8451"}  # no operator_url
    data.update(request.param)
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    mitmdump = Mitmdump(tmp_path, config, tmp_path / "confdir").start()
    try:
        yield mitmdump, Curl(mitmdump.url, tmp_path)
    finally:
        mitmdump.stop()


@pytest.mark.parametrize(("proxy", "link"), [
    ({}, '<http://127.0.0.1:8451/transparency>; rel="blocked-by"'),
    ({"web": {"public_url": "https://filter.example"}},
     '<https://filter.example/transparency>; rel="blocked-by"'),
], indirect=["proxy"])
def test_proxy_451_links_to_the_transparency_page(proxy: tuple[Mitmdump, Curl],
                                                  link: str) -> None:
    _, curl = proxy
    answer = curl("http://partly.example/dir/page.html")
    assert answer.status == 451 and "DEMO-0003" in answer.text
    assert answer.header("link") == link
