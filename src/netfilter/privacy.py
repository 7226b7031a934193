"""How a client address is written down: as little as the operator's purpose needs.

`none` drops it; `truncated` keeps the network (/24, /48); `pseudonym` is an HMAC of
the address under a key drawn at random for each UTC day: the audit log keeps the
day's key in its store (so every process of a node gives one client one pseudonym that
day) and destroys it with the day's events at the end of retention; without an audit
log the key lives in memory only. `full` keeps the address and must be chosen
explicitly.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

__all__ = ["ClientForm", "ClientRecorder"]

ClientForm = Literal["none", "truncated", "pseudonym", "full"]


class ClientRecorder:
    """Turns a client address into its configured, recordable form."""

    def __init__(self, form: ClientForm = "pseudonym",
                 key_for_day: Callable[[str], bytes] | None = None) -> None:
        self.form: ClientForm = form
        self._key_for_day = key_for_day
        self._lock = threading.Lock()
        self._day = ""
        self._key = b""

    def _day_key(self) -> bytes:
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        with self._lock:
            if day != self._day:
                key = self._key_for_day(day) if self._key_for_day else secrets.token_bytes(32)
                self._day, self._key = day, key
            return self._key

    def record(self, address: str | None) -> str | None:
        if address is None or self.form == "none":
            return None
        if self.form == "full":
            return address
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            ip = None
        if self.form == "truncated":
            if ip is None:
                return None
            prefix = 24 if ip.version == 4 else 48
            return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
        digest = hmac.digest(self._day_key(), (str(ip) if ip else address).encode(), "sha256")
        return "p:" + digest[:12].hex()
