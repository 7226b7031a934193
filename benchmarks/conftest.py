"""Shared fixtures for the benchmarks, and the figures table printed at the end of a run.

Every timing is recorded with `figures.time(...)` in a table that names one baseline;
the summary shows each figure next to that baseline (measured in the same run) and
evaluates the targets. Nothing here asserts on timings: the machine is shared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import netfilter
from support import Authority, BigBundles, Figures, LoadedList, load_authority
from synth import Spec, write_plaintext_bundle

CHECK_ENTRIES = 200_000  # the list size of the probe and check benchmarks


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: 1M/10M-entry memory and load benchmarks")
    config.stash[_FIGURES] = Figures()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("netfilter benchmarks")
    group.addoption("--bench-cache", default=None, metavar="DIR",
                    help="keep the synthetic 1M/10M bundles (and their key) in DIR between runs")
    group.addoption("--figures-json", default=None, metavar="FILE",
                    help="also write the figures table as JSON")


_FIGURES = pytest.StashKey[Figures]()


@pytest.fixture(scope="session")
def figures(pytestconfig: pytest.Config) -> Figures:
    return pytestconfig.stash[_FIGURES]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    figs = config.stash.get(_FIGURES, None)
    if figs is None or not (figs.times or figs.rows):
        return
    terminalreporter.section("netfilter benchmark figures")
    for line in figs.render():
        terminalreporter.write_line(line)
    out = config.getoption("--figures-json")
    if out:
        Path(out).write_text(json.dumps(figs.as_json(), indent=2))


# ---------------------------------------------------------------- lists


@pytest.fixture(scope="session")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return load_authority(tmp_path_factory.mktemp("authority"))


@pytest.fixture(scope="session")
def list200k(tmp_path_factory: pytest.TempPathFactory, authority: Authority) -> LoadedList:
    """A 200k-entry list built the authority's way (plaintext -> pack_entries), loaded."""
    spec = Spec(CHECK_ENTRIES)
    path = tmp_path_factory.mktemp("lists") / "synthetic-200k.nfl"
    write_plaintext_bundle(spec, path, authority.key)
    lists = netfilter.load_lists([netfilter.ListSource(path, [authority.public_path])])
    return LoadedList(spec, path, authority, lists)


@pytest.fixture(scope="session")
def big_bundles(tmp_path_factory: pytest.TempPathFactory,
                pytestconfig: pytest.Config) -> BigBundles:
    cache = pytestconfig.getoption("--bench-cache")
    if cache:
        directory = Path(cache)
        directory.mkdir(parents=True, exist_ok=True)
    else:
        directory = tmp_path_factory.mktemp("big")
    return BigBundles(directory, load_authority(directory))
