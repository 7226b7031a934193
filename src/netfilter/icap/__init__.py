"""The ICAP front-end (RFC 3507): a REQMOD service over the one HTTP decision.

`netfilter serve icap` runs `server.IcapServer` on `icap.listen`; protocol.py parses
and formats ICAP heads and the HTTP request they carry.
"""

from netfilter.icap.protocol import IcapError
from netfilter.icap.server import SERVICE, IcapServer

__all__ = ["SERVICE", "IcapError", "IcapServer"]
