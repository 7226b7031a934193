"""The public surface is deliberate: every name in __all__ exists, and nothing else leaks."""

from __future__ import annotations

import importlib

import pytest

import netfilter

MODULES = ["netfilter", "netfilter.canonical", "netfilter.keys", "netfilter.listfile",
           "netfilter.listsource", "netfilter.matcher", "netfilter.lists", "netfilter.bloom",
           "netfilter.config", "netfilter.engine", "netfilter.events", "netfilter.errors",
           "netfilter.digest", "netfilter.privacy", "netfilter.dns.answers",
           "netfilter.dns.canaries", "netfilter.dns.codes", "netfilter.dns.listener",
           "netfilter.dns.tcp", "netfilter.dns.wire"]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__, name
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.{attr}"


def test_top_level_api() -> None:
    expected = {"load_lists", "ListSource", "Lists", "Match", "Engine", "Verdict", "Action",
                "Answer", "load_config", "Settings", "InvalidURL", "canonicalize",
                "expressions", "host_expressions", "NetfilterError", "BundleError",
                "BundleExpired", "ConfigError", "KeyFileError", "SourceError", "__version__"}
    assert set(netfilter.__all__) == expected
    assert issubclass(netfilter.InvalidURL, ValueError)
    for error in (netfilter.BundleError, netfilter.ConfigError, netfilter.KeyFileError,
                  netfilter.SourceError):
        assert issubclass(error, netfilter.NetfilterError)
