"""How the encrypted listeners hand a query to the DNS server (`listener.Handler`).

The answer comes through `respond`, at once (a block, an error) or once the upstream
answered; b"" means no answer (the packet was dropped: not a query). Over a stream
transport every query gets exactly one call, so a connection can count what is in
flight. A query our code fails on is the server's to count and answer (SERVFAIL).
"""

from __future__ import annotations

from netfilter.dns.listener import Handler, Respond

__all__ = ["Handler", "Respond", "ask"]


def ask(handler: Handler, data: bytes, client: str, respond: Respond, where: str) -> None:
    """One query over a stream transport (no truncation to a UDP size); a bug costs
    this query (SERVFAIL), never the connection."""
    try:
        handler.handle(data, client, respond, over_tcp=True)
    except Exception as error:
        handler.failed(where, error, data, respond, over_tcp=True)
