"""The DNS front-end's cut: listeners meet the server through dns/listener.py only.

No module of netfilter.dns imports netfilter.dns.server (not even for type checking),
and the front-end imports neither serve nor another front-end (DESIGN.md, the house).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import netfilter.dns

DNS = Path(netfilter.dns.__file__).parent
MODULES = sorted(p for p in DNS.glob("*.py") if p.name != "server.py")
FORBIDDEN = ("netfilter.dns.server", "netfilter.serve", "netfilter.proxy", "netfilter.http",
             "netfilter.icap", "netfilter.web")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_import_back_to_the_server_or_up(path: Path) -> None:
    bad = sorted(n for n in _imports(path)
                 if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"{path.name} imports {bad}"


def test_the_server_imports_its_listeners_not_the_reverse() -> None:
    assert "netfilter.dns.listener" in _imports(DNS / "server.py")
    assert "netfilter.dns.listener" in _imports(DNS / "udp.py")
    assert "netfilter.dns.listener" in _imports(DNS / "tcp.py")
