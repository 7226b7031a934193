"""Helpers of the benchmarks: the figures table, timing, synthetic bundles on disk."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netfilter
from netfilter.keys import PrivateKey, generate_keypair, load_private_key
from synth import SYNTH_VERSION, Spec, write_fast_bundle

# ---------------------------------------------------------------- figures


@dataclass
class _Target:
    label: str
    table: str
    name: str
    kind: str  # "rate": ops/s >= threshold; "ratio": speed-up over baseline >= threshold;
    #            "seconds": time <= threshold; "max"/"min": recorded row value <= / >= it
    threshold: float


@dataclass
class Figures:
    """Figures of one run: timings per table (one baseline each), free rows, targets."""

    times: dict[str, dict[str, tuple[float, str]]] = field(default_factory=dict)
    baselines: dict[str, str] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    values: dict[tuple[str, str], float] = field(default_factory=dict)
    rows: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    targets: list[_Target] = field(default_factory=list)

    def time(self, table: str, name: str, seconds_per_op: float, *, baseline: bool = False,
             unit: str = "op", note: str = "") -> None:
        """Record a time per operation; the table's baseline is the one marked so."""
        self.times.setdefault(table, {})[name] = (seconds_per_op, note)
        self.units[table] = unit
        if baseline:
            self.baselines[table] = name

    def row(self, table: str, name: str, text: str, value: float | None = None) -> None:
        """A free-form figure (memory, rates, counts); `value` feeds "max" and "min"
        targets."""
        self.rows.setdefault(table, []).append((name, text))
        if value is not None:
            self.values[table, name] = value

    def target(self, label: str, table: str, name: str, kind: str, threshold: float) -> None:
        self.targets.append(_Target(label, table, name, kind, threshold))

    def speedup(self, table: str, name: str) -> float | None:
        base = self.baselines.get(table)
        entries = self.times.get(table, {})
        if base is None or base not in entries or name not in entries:
            return None
        return entries[base][0] / entries[name][0]

    def _evaluate(self, t: _Target) -> tuple[str, str]:
        if t.kind == "rate":
            entry = self.times.get(t.table, {}).get(t.name)
            if entry is None:
                return "n/a", "not measured in this run"
            rate = 1 / entry[0]
            return ("PASS" if rate >= t.threshold else "FAIL"), f"{rate:,.0f}/s"
        if t.kind == "seconds":
            entry = self.times.get(t.table, {}).get(t.name)
            if entry is None:
                return "n/a", "not measured in this run"
            return ("PASS" if entry[0] <= t.threshold else "FAIL"), f"{entry[0]:.2f} s"
        if t.kind == "ratio":
            ratio = self.speedup(t.table, t.name)
            if ratio is None:
                return "n/a", "baseline or figure not measured in this run"
            return ("PASS" if ratio >= t.threshold else "FAIL"), f"{ratio:.1f}x"
        value = self.values.get((t.table, t.name))
        if value is None:
            return "n/a", "not measured in this run"
        if t.kind == "min":
            return ("PASS" if value >= t.threshold else "FAIL"), f"{value:,.3f}"
        return ("PASS" if value <= t.threshold else "FAIL"), f"{value:,.2f}"

    def render(self) -> list[str]:
        lines: list[str] = []
        for table, entries in self.times.items():
            unit = self.units[table]
            base = self.baselines.get(table)
            lines.append(f"{table}  (baseline: {base or 'none'})")
            width = max(34, *(len(name) for name in entries))
            lines.append(f"  {'':{width}} {'per ' + unit:>12} {unit + '/s':>14} "
                         f"{'vs baseline':>12}")
            for name, (seconds, note) in entries.items():
                ratio = self.speedup(table, name)
                shown = "baseline" if name == base else (
                    "" if ratio is None else f"{ratio:.2f}x")
                per = _fmt_seconds(seconds)
                rate = f"{1 / seconds:,.0f}" if seconds < 0.01 else "-"
                lines.append(f"  {name:{width}} {per:>12} {rate:>14} {shown:>12}"
                             + (f"  {note}" if note else ""))
            lines.append("")
        for table, rows in self.rows.items():
            lines.append(table)
            lines.extend(f"  {name:34} {text}" for name, text in rows)
            lines.append("")
        if self.targets:
            lines.append("targets")
            for t in self.targets:
                verdict, measured = self._evaluate(t)
                lines.append(f"  {verdict:5} {t.label:58} measured {measured}")
        return lines

    def as_json(self) -> dict[str, Any]:
        return {
            "times": {t: {n: {"seconds_per_op": s, "vs_baseline": self.speedup(t, n),
                              "note": note} for n, (s, note) in e.items()}
                      for t, e in self.times.items()},
            "baselines": self.baselines,
            "rows": self.rows,
            "targets": [{"label": t.label, "verdict": self._evaluate(t)[0],
                         "measured": self._evaluate(t)[1]} for t in self.targets],
        }


def _fmt_seconds(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def best_of(benchmark: Any, ops: int) -> float | None:
    """Seconds per operation from the fastest pytest-benchmark round (None if disabled).

    The minimum is the least noisy estimate on a shared machine: noise only adds time.
    """
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(stats, "stats", None) is None:
        return None
    return float(stats.stats.min) / ops


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of `repeat` wall-clock runs of `fn`, in seconds."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# ---------------------------------------------------------------- lists


@dataclass
class Authority:
    key: PrivateKey
    public_path: Path


@dataclass
class LoadedList:
    spec: Spec
    path: Path
    authority: Authority
    lists: netfilter.Lists


def load_authority(directory: Path) -> Authority:
    key_path = directory / "authority.key"
    if not key_path.exists():
        generate_keypair(directory / "authority")
    return Authority(load_private_key(key_path), directory / "authority.pub")


@dataclass
class BigBundles:
    """Fast-form bundles by size, built at most once per session (or per cache dir)."""

    directory: Path
    authority: Authority
    built: dict[int, Path] = field(default_factory=dict)

    def get(self, entries: int) -> tuple[Spec, Path]:
        spec = Spec(entries)
        path = self.directory / f"synthetic-{entries}-v{SYNTH_VERSION}.nfl"
        if entries not in self.built:
            if not path.exists():
                write_fast_bundle(spec, path, self.authority.key)
            self.built[entries] = path
        return spec, path


