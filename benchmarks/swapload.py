"""The load of the list-swap benchmarks (`test_reload_under_load`, `test_soak`): one
query file and one URL cycle in which clean names, names every version blocks and names
only version N blocks are spread evenly, and the unbound upstream that knows them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.support import free_port

import dnsbench

CLEAN_NAMES = 400  # c<i>.clean.example, A and AAAA each
SHARED_LINES = 40  # of the query file, per pass
VERSION_LINES = 4  # per version (A, AAAA of v<N>-only.example and www.v<N>-only.example)
CLEAN_URLS = 160


def only(n: int) -> str:
    """The domain only version `n` blocks."""
    return f"v{n}-only.example"


@dataclass
class Queries:
    path: Path
    lines: list[str]
    local_data: list[str]

    def sent(self, count: int) -> tuple[int, int]:
        """(shared lines, version lines) among the first `count` lines dnsperf sends
        (it reads the file in order, over and over)."""
        def shared(lines: list[str]) -> int:
            return sum(1 for x in lines if x.split()[0].endswith("shared.example"))

        def version(lines: list[str]) -> int:
            return sum(1 for x in lines if "-only.example" in x)

        passes, rest = divmod(count, len(self.lines))
        head = self.lines[:rest]
        return (passes * shared(self.lines) + shared(head),
                passes * version(self.lines) + version(head))


def write_queries(directory: Path, versions: int) -> Queries:
    """dnsperf's file: clean, shared and per-version names, interleaved evenly."""
    clean: list[str] = []
    local: list[str] = []
    for i in range(CLEAN_NAMES):
        name = f"c{i}.clean.example"
        clean += [f"{name} A", f"{name} AAAA"]
        local += [f"{name}. 3600 IN A 198.18.{i >> 8 & 255}.{i & 255}",
                  f"{name}. 3600 IN AAAA 2001:db8::{i:x}"]
    names = ["shared.example", "www.shared.example"]
    blocked = [f"{names[k % 2]} {'A' if k % 4 < 2 else 'AAAA'}" for k in range(SHARED_LINES)]
    for n in range(1, versions + 1):
        names += [only(n), f"www.{only(n)}"]
        blocked += [f"{only(n)} A", f"{only(n)} AAAA", f"www.{only(n)} A",
                    f"www.{only(n)} AAAA"][:VERSION_LINES]
    for name in names:  # the upstream knows them all: it does not filter
        local += [f"{name}. 3600 IN A 192.0.2.66", f"{name}. 3600 IN AAAA 2001:db8::66"]
    stride = len(clean) // len(blocked)
    lines: list[str] = []
    rest = iter(blocked)
    for i, line in enumerate(clean):
        lines.append(line)
        if i % stride == stride - 1:
            lines.extend(x for x in [next(rest, "")] if x)
    lines.extend(rest)
    path = directory / "queries.txt"
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return Queries(path, lines, local)


def upstream(directory: Path, queries: Queries) -> dnsbench.Server:
    """unbound answering every name of the query file from local data."""
    port = free_port()
    conf = [*dnsbench._server_lines(directory, port), '  module-config: "iterator"',
            '  local-zone: "example." static',
            *(f'  local-data: "{d}"' for d in queries.local_data),
            *dnsbench._tail(free_port())]
    return dnsbench._unbound("upstream", directory, port, "\n".join(conf) + "\n")


def clean_url(port: int, i: int) -> str:
    return f"http://www.site{i % 20}.example:{port}/articles/{i}/index.html?x={i}"


def version_urls(port: int, n: int) -> list[str]:
    """A domain URL and a URL entry's URL that only version `n` blocks."""
    return [f"http://www.{only(n)}:{port}/page.html", f"http://urls.example:{port}/v{n}/p.html"]


def shared_urls(port: int) -> list[str]:
    return [f"http://www.shared.example:{port}/page.html",
            f"http://urls.example:{port}/shared/p.html"]


def url_cycle(port: int, versions: int) -> list[str]:
    """wrk's cycle: clean URLs, with the shared and every version's URLs spread in
    (6 blocked per cycle while one version is in force: 4 shared, 2 of that version)."""
    special = shared_urls(port) * 2
    for n in range(1, versions + 1):
        special += version_urls(port, n)
    urls: list[str] = []
    stride = max(1, CLEAN_URLS // len(special))
    pending = iter(special)
    for i in range(CLEAN_URLS):
        urls.append(clean_url(port, i))
        if i % stride == stride - 1:
            urls.extend(x for x in [next(pending, "")] if x)
    urls.extend(pending)
    return urls
