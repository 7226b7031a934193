"""netfilter: enforce an authority's signed, hashed URL blocklist in DNS and a web proxy.

The public API is what front-ends and operators' scripts use::

    lists = netfilter.load_lists([netfilter.ListSource(path=..., trusted_keys=[...])])
    lists.check_url(url) -> Match | None; lists.check_host(name); lists.host_has_url_entries(name)
    engine = netfilter.Engine(netfilter.load_config(path)); engine.check_url(url) -> Verdict
"""

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
