"""The exception hierarchy: one base, so the CLI can catch user mistakes in one place.

    NetfilterError
    ├── ConfigError         a configuration key or file is wrong
    ├── KeyFileError        a key file is missing, unreadable or not an Ed25519 key
    ├── SourceError         a list source (YAML/CSV, local list) is malformed
    ├── BundleError         a list bundle does not verify or cannot be read
    │   └── BundleExpired   a bundle verified but its `expires` time has passed
    └── ListenError         a part of `netfilter serve` cannot open its listening socket

Each carries the offending path or key and the reason, so one line tells the user
what, where and why.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "BundleError",
    "BundleExpired",
    "ConfigError",
    "KeyFileError",
    "ListenError",
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


class KeyExistsError(KeyFileError):
    """A new key's file is there already (never overwritten)."""


class SourceError(NetfilterError):
    """A list source is malformed."""


class BundleError(NetfilterError):
    """A list bundle does not verify or cannot be read."""


class BundleExpired(BundleError):
    """A list bundle verified, but its expiry time has passed."""


class ListenError(NetfilterError):
    """A part cannot listen where it is configured to (a port in use, an address not
    on this host, a privileged port); `netfilter serve` exits 2."""

    @classmethod
    def from_os_error(cls, part: str, host: str, port: int, error: OSError) -> ListenError:
        """One line for a socket a part could not open: which part, where and why."""
        if error.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            return cls(part, f"cannot listen on {host} port {port} ({_reason(error)})")
        return cls.cannot_start(part, error)

    @classmethod
    def cannot_start(cls, part: str, error: OSError) -> ListenError:
        """One line for a part whose sockets were bound but which failed to start."""
        return cls(part, f"cannot start ({_reason(error)})")


def _reason(error: OSError) -> str:
    return os.strerror(error.errno).lower() if error.errno else str(error)
