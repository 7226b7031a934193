"""The exception hierarchy: one base, so the CLI can catch user mistakes in one place.

    NetfilterError
    ├── ConfigError         a configuration key or file is wrong
    ├── KeyFileError        a key file is missing, unreadable or not an Ed25519 key
    ├── SourceError         a list source (YAML/CSV, local list) is malformed
    └── BundleError         a list bundle does not verify or cannot be read
        └── BundleExpired   a bundle verified but its `expires` time has passed

Each carries the offending path or key and the reason, so one line tells the user
what, where and why.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "BundleExpired",
    "ConfigError",
    "KeyFileError",
    "NetfilterError",
    "SourceError",
]


class NetfilterError(Exception):
    """netfilter could not do what was asked."""

    def __init__(self, where: object, reason: str) -> None:
        self.where = str(where)
        self.reason = reason
        super().__init__(f"{self.where}: {reason}")


class ConfigError(NetfilterError):
    """A configuration key or file is wrong."""


class KeyFileError(NetfilterError):
    """A key file is missing, unreadable or not the expected kind of key."""


class SourceError(NetfilterError):
    """A list source is malformed."""


class BundleError(NetfilterError):
    """A list bundle does not verify or cannot be read."""


class BundleExpired(BundleError):
    """A list bundle verified, but its expiry time has passed."""
