"""netfilter: enforce an authority's signed, hashed URL blocklist in DNS and a web proxy.

The public API is what front-ends and operators' scripts use::

    lists = netfilter.load_lists([netfilter.ListSource(path=..., trusted_keys=[...])])
    lists.check_url(url) -> Match | None; lists.check_host(name); lists.host_has_url_entries(name)
    engine = netfilter.Engine(netfilter.load_config(path)); engine.check_url(url) -> Verdict
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netfilter.canonical import InvalidURL, canonicalize, expressions, host_expressions
    from netfilter.config import Settings, load_config
    from netfilter.engine import Action, Answer, Engine, Verdict
    from netfilter.errors import (
        BundleError,
        BundleExpired,
        ConfigError,
        KeyFileError,
        NetfilterError,
        SourceError,
    )
    from netfilter.lists import Lists, ListSource, load_lists
    from netfilter.matcher import Match

# Where each public name lives: imported on first use (PEP 562), so that a command
# that needs none of them (`netfilter --version`, `keys generate`, `audit ...`) does
# not load numpy, pydantic and the matching core first.
_LAZY = {
    "InvalidURL": "canonical", "canonicalize": "canonical", "expressions": "canonical",
    "host_expressions": "canonical", "Settings": "config", "load_config": "config",
    "Action": "engine", "Answer": "engine", "Engine": "engine", "Verdict": "engine",
    "BundleError": "errors", "BundleExpired": "errors", "ConfigError": "errors",
    "KeyFileError": "errors", "NetfilterError": "errors", "SourceError": "errors",
    "Lists": "lists", "ListSource": "lists", "load_lists": "lists", "Match": "matcher",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'netfilter' has no attribute {name!r}")
    value = getattr(import_module(f"netfilter.{module}"), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "Action",
    "Answer",
    "BundleError",
    "BundleExpired",
    "ConfigError",
    "Engine",
    "InvalidURL",
    "KeyFileError",
    "ListSource",
    "Lists",
    "Match",
    "NetfilterError",
    "Settings",
    "SourceError",
    "Verdict",
    "__version__",
    "canonicalize",
    "expressions",
    "host_expressions",
    "load_config",
    "load_lists",
]
