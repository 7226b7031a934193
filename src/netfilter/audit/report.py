"""Aggregate reports for auditors and the authority: never per person.

Every figure is a count over events grouped by day, list, entry reference, category,
front-end and action; client identifiers are never read. The authority's export is
a signed note, so the authority can check it came from this node unaltered.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from netfilter.audit.note import Signer, sign
from netfilter.audit.store import AuditStore

__all__ = ["Report", "authority_export", "build_report", "render"]

GROUP = ("day", "list", "ref", "category", "frontend", "action")


@dataclass
class Report:
    start: str
    end: str
    blocks: Counter[tuple[str, ...]] = field(default_factory=Counter)  # keyed by GROUP
    overrides: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # day, list, ref
    lists: dict[str, int] = field(default_factory=dict)  # "list vN" -> entries in force
    retention: list[str] = field(default_factory=list)
    removed: int = 0  # events in the period whose bodies retention removed
    shed: int = 0  # blocks whose events were lost to a full queue (the log says so itself)

    def per(self, key: str) -> Counter[str]:
        index = GROUP.index(key)
        out: Counter[str] = Counter()
        for group, count in self.blocks.items():
            out[group[index]] += count
        return out


def build_report(store: AuditStore, start: str, end: str) -> Report:
    """Counts for the UTC days start..end (inclusive, YYYY-MM-DD)."""
    report = Report(start, end)
    for leaf in store.leaves():
        if not start <= leaf.day <= end:
            continue
        if leaf.event is None:
            report.removed += 1
            continue
        event: dict[str, Any] = json.loads(leaf.event)
        kind = event.get("type")
        if kind == "block":  # aggregated blocks carry their count (aggregate.py)
            report.blocks[tuple(str(event.get(k, "") if k != "day" else leaf.day)
                                for k in GROUP)] += int(event.get("count", 1))
        elif kind == "override":
            report.overrides[(leaf.day, str(event.get("list")), str(event.get("ref")))] += 1
        elif kind == "list-loaded":
            entries = str(event.get("detail", "")).split("entries=")[-1].split()[0]
            report.lists[f"{event.get('list')} v{event.get('version')}"] = int(entries or 0)
        elif kind == "shed":
            report.shed += int(event.get("count", 0))
        elif kind == "retention":
            report.retention.append(f"{event.get('time', '')[:19]} {event.get('detail', '')}")
    return report


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(_as_dict(report), indent=2, sort_keys=True) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow([*GROUP, "blocks"])
        for group, count in sorted(report.blocks.items()):
            writer.writerow([*group, count])
        return out.getvalue()
    if fmt == "html":
        return _html(report)
    return _text(report)


def _as_dict(report: Report) -> dict[str, Any]:
    return {
        "period": {"from": report.start, "to": report.end},
        "blocks": [dict(zip(GROUP, g, strict=True)) | {"count": c}
                   for g, c in sorted(report.blocks.items())],
        "blocks_total": sum(report.blocks.values()),
        "overrides": [{"day": d, "list": lst, "ref": r, "count": c}
                      for (d, lst, r), c in sorted(report.overrides.items())],
        "lists_in_force": report.lists,
        "retention": report.retention,
        "removed_by_retention": report.removed,
        "shed": report.shed,
    }


def _text(report: Report) -> str:
    lines = [f"netfilter audit report {report.start} .. {report.end}",
             f"blocks: {sum(report.blocks.values())}"]
    for key in ("day", "list", "category", "frontend", "action", "ref"):
        lines.append(f"  per {key}:")
        lines += [f"    {name or '-'}: {count}" for name, count in sorted(report.per(key).items())]
    lines.append(f"overrides (local exceptions used): {sum(report.overrides.values())}")
    lines += [f"  {d} {lst} {r}: {c}" for (d, lst, r), c in sorted(report.overrides.items())]
    lines.append("lists in force (entries):")
    lines += [f"  {name}: {entries}" for name, entries in sorted(report.lists.items())]
    lines.append(f"event bodies removed by retention in the period: {report.removed}")
    if report.shed:
        lines.append(f"blocks not logged while the log took no writes (shed): {report.shed}")
    lines += [f"  retention run {r}" for r in report.retention]
    return "\n".join(lines) + "\n"


def _bars(title: str, counts: Counter[str]) -> str:
    """A horizontal bar chart as inline SVG: no script, no external resource."""
    items = sorted(counts.items())
    top = max(counts.values(), default=1)
    height = 24 * len(items) + 30
    rows = []
    for i, (label, count) in enumerate(items):
        y = 24 * i + 24
        width = int(360 * count / top)
        rows.append(f'<text x="0" y="{y + 12}" font-size="12">{html.escape(label)}</text>'
                    f'<rect x="170" y="{y}" width="{width}" height="16" fill="#1f5f8b"/>'
                    f'<text x="{176 + width}" y="{y + 12}" font-size="12">{count}</text>')
    return (f'<figure><figcaption>{html.escape(title)}</figcaption>'
            f'<svg role="img" aria-label="{html.escape(title)}" width="600" '
            f'height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(rows)}</svg>'
            "</figure>")


def _html(report: Report) -> str:
    data = _as_dict(report)
    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(row[k]))}</td>" for k in (*GROUP, "count"))
        + "</tr>" for row in data["blocks"])
    head = "".join(f"<th>{k}</th>" for k in (*GROUP, "blocks"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>netfilter audit report {html.escape(report.start)} to {html.escape(report.end)}</title>
<style>body{{font-family:sans-serif;max-width:60rem;margin:auto;padding:1rem;color:#111}}
table{{border-collapse:collapse}}td,th{{border:1px solid #999;padding:.2rem .4rem}}</style>
</head><body>
<h1>Blocking report {html.escape(report.start)} to {html.escape(report.end)}</h1>
<p>Blocks: {data["blocks_total"]}. Local exceptions used: {sum(report.overrides.values())}.
Event bodies removed by retention: {report.removed}.
Blocks not logged while the log took no writes: {report.shed}.
Aggregates only; no per-person data.</p>
{_bars("Blocks per day", report.per("day"))}
{_bars("Blocks per category", report.per("category"))}
<h2>Blocks by day, list, entry, category, front-end and action</h2>
<table><thead><tr>{head}</tr></thead><tbody>{table}</tbody></table>
<h2>Lists in force</h2><ul>{"".join(f"<li>{html.escape(k)}: {v} entries</li>"
                                       for k, v in sorted(report.lists.items()))}</ul>
</body></html>
"""


def authority_export(store: AuditStore, start: str, end: str, signer: Signer) -> bytes:
    """Per entry reference: hits, first and last seen, front-ends; as a signed note."""
    hits: Counter[tuple[str, str]] = Counter()
    seen: dict[tuple[str, str], list[str]] = {}
    frontends: dict[tuple[str, str], set[str]] = defaultdict(set)
    for leaf in store.leaves():
        if leaf.event is None or not start <= leaf.day <= end:
            continue
        event = json.loads(leaf.event)
        if event.get("type") != "block":
            continue
        key = (str(event.get("list")), str(event.get("ref")))
        hits[key] += int(event.get("count", 1))  # an aggregated block counts them all
        when = str(event.get("time", leaf.day))
        first, last = str(event.get("first", when)), str(event.get("last", when))
        first_last = seen.setdefault(key, [first, last])
        first_last[0], first_last[1] = min(first_last[0], first), max(first_last[1], last)
        frontends[key].add(str(event.get("frontend")))
    lines = [f"netfilter authority export v1 {signer.name}",
             f"period {start} {end} generated {datetime.now(UTC).isoformat(timespec='seconds')}"]
    for key in sorted(hits):
        record = {"list": key[0], "ref": key[1], "hits": hits[key], "first": seen[key][0],
                  "last": seen[key][1], "frontends": sorted(frontends[key])}
        lines.append(json.dumps(record, sort_keys=True, separators=(",", ":")))
    return sign("\n".join(lines) + "\n", signer)
