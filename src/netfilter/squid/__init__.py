"""Squid's front-end: an external ACL helper over the one HTTP decision (netfilter.http).

`addons/netfilter_squid.py --config FILE` runs `helper.main`; protocol.py is the line
protocol (with concurrency channel ids), helper.py the decisions.
"""

from netfilter.squid.helper import SquidHelper, main
from netfilter.squid.protocol import Lookup, answer, parse_lookup

__all__ = ["Lookup", "SquidHelper", "answer", "main", "parse_lookup"]
