"""Plaintext list sources: the authority's YAML/CSV input and operators' local lists.

Each target becomes one lookup expression (see canonical.py): a domain `d` is the
expression `d/` (kind "domain": blocks the host and every subdomain, every path);
a URL is its canonical `host/path?query` (kind "url"), except that a URL whose
expression is just `host/` blocks the whole host and is therefore a domain entry.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from netfilter.canonical import InvalidURL, canonical_host, canonical_parts
from netfilter.errors import SourceError

__all__ = ["Kind", "SourceEntry", "local_ref", "parse_target", "read_source", "read_yaml_file"]

Kind = Literal["domain", "url"]
MAX_REF = 128
MAX_CATEGORY = 64
_CATEGORY = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class SourceEntry:
    """One list entry in plaintext form, before hashing."""

    expression: str  # what is hashed, e.g. "example.org/" or "example.org/dir/p.html"
    host: str  # canonical host the entry lives on (its `host/` goes to the host index)
    kind: Kind
    ref: str
    category: str


def parse_target(target: str, *, as_domain: bool | None = None) -> tuple[str, str, Kind]:
    """(expression, host, kind) of a domain or URL; raises ValueError naming the reason."""
    text = target.strip()
    if not text:
        raise ValueError("empty target")
    if as_domain is None:
        as_domain = "/" not in text and ":" not in text
    try:
        if as_domain:
            host = canonical_host(text)
            return host + "/", host, "domain"
        host, path = canonical_parts(text)
    except InvalidURL as e:
        raise ValueError(str(e)) from e
    expression = host + path
    return expression, host, ("domain" if path == "/" else "url")


def local_ref(expression: str) -> str:
    """The reference of a local entry given without one: names the entry for the
    operator (who can recompute it) without putting the domain into every event."""
    return "local:" + hashlib.sha256(expression.encode()).hexdigest()[:12]


def _check_text(value: object, field: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} must be a non-empty string")
    value = value.strip()
    if len(value) > limit:
        raise ValueError(f"{field} longer than {limit} characters")
    if _CONTROL.search(value):
        raise ValueError(f"{field} contains control characters")
    return value


def _entry(item: object, default_category: str | None, default_ref: bool) -> SourceEntry:
    if isinstance(item, str):
        if not default_ref:
            raise ValueError("an entry needs `ref` and `category`")
        item = {"target": item}
    if not isinstance(item, Mapping):
        raise ValueError("an entry must be a mapping (or, in local lists, a string)")
    keys = {"url", "domain", "target"} & set(item)
    if len(keys) != 1:
        raise ValueError("an entry needs exactly one of `url`, `domain`")
    unknown = set(item) - {"url", "domain", "target", "ref", "category"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
    key = keys.pop()
    target = item[key]
    if not isinstance(target, str):
        raise ValueError(f"`{key}` must be a string")
    as_domain = {"domain": True, "url": False, "target": None}[key]
    expression, host, kind = parse_target(target, as_domain=as_domain)
    default = local_ref(expression) if default_ref else None
    ref = _check_text(item.get("ref", default), "ref", MAX_REF)
    category = item.get("category", default_category)
    category = _check_text(category, "category", MAX_CATEGORY).lower()
    if not _CATEGORY.match(category):
        raise ValueError("category must be lowercase letters, digits, '.', '_' or '-'")
    return SourceEntry(expression, host, kind, ref, category)


def read_yaml_file(path: str | Path) -> Any:
    """Load YAML safely, turning every failure into one SourceError line."""
    try:
        with open(path, "rb") as f:
            return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError as e:
        raise SourceError(path, "file not found") from e
    except OSError as e:
        raise SourceError(path, f"cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise SourceError(where, f"not valid YAML ({getattr(e, 'problem', e)})") from e


def read_source(
    path: str | Path, *, local: bool = False, default_category: str | None = None
) -> tuple[dict[str, Any], Iterator[SourceEntry]]:
    """Header fields and entries of a YAML or CSV source.

    Local lists (`local=True`) also accept bare strings as entries; their reference
    defaults to `local_ref` of the expression and their category to `default_category`.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return {}, _csv_entries(path, default_category)
    data = read_yaml_file(path)
    if isinstance(data, list) and local:
        data = {"entries": data}
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise SourceError(path, "expected a mapping with an `entries:` list")
    header = {k: v for k, v in data.items() if k != "entries"}
    return header, _yaml_entries(path, data["entries"], default_category, local)


def _yaml_entries(
    path: Path, items: list[object], default_category: str | None, local: bool
) -> Iterator[SourceEntry]:
    for number, item in enumerate(items, start=1):
        try:
            yield _entry(item, default_category, local)
        except ValueError as e:
            raise SourceError(f"{path}: entry {number}", str(e)) from e


def _csv_entries(path: Path, default_category: str | None) -> Iterator[SourceEntry]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                if not row or row[0].startswith("#") or (line == 1 and row[0] == "target"):
                    continue
                if len(row) != 3 and not (len(row) == 2 and default_category):
                    raise SourceError(f"{path}:{line}", "expected target,ref,category")
                item = {"target": row[0], "ref": row[1],
                        "category": row[2] if len(row) == 3 else default_category}
                try:
                    yield _entry(item, default_category, False)
                except ValueError as e:
                    raise SourceError(f"{path}:{line}", str(e)) from e
    except FileNotFoundError as e:
        raise SourceError(path, "file not found") from e
    except UnicodeDecodeError as e:
        raise SourceError(path, "not UTF-8 text") from e
