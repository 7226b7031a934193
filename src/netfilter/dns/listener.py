"""How listeners and the DNS server meet, without importing each other.

A listener (the C relay, the Python UDP one, TCP, DoT, DoH) owns its sockets and
framing; the server owns the decision. A listener gets a `Handler` (the server, as
far as listeners need to know it) and hands it every query it does not finish
itself; the server keeps its listeners as `Listener`s. Neither side imports the
other's module: both import this one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from netfilter.config import DnsSettings
    from netfilter.dns.upstream import UpstreamPool
    from netfilter.engine import Engine, Verdict

__all__ = ["BlockKeeper", "Handler", "Listener", "Respond"]

# Sends one answer to the client the query came from. b"" sends nothing; over a
# stream it still settles the query (the connection stops waiting for it).
Respond = Callable[[bytes], None]


class Handler(Protocol):
    """The server's side: the full path for whatever a listener's fast path (if any)
    did not finish. Each entry point answers through `respond` exactly once (or not
    at all for a packet that is dropped over UDP) and never raises for a bad packet."""

    engine: Engine
    settings: DnsSettings
    upstream: UpstreamPool
    stats: Counter[str]

    def handle(self, data: bytes, client: str, respond: Respond, *, over_tcp: bool) -> None:
        """A query (a whole DNS message, framing removed) from `client`; raises only
        on our own bugs (the caller then calls `failed`)."""

    def query_udp(self, data: bytes, client: str, respond: Respond) -> None:
        """A UDP query for the full path; never raises."""

    def answer_udp(self, answer: bytes | None, data: bytes, client: str,
                   respond: Respond) -> None:
        """The upstream's answer to a UDP query a listener forwarded itself (None: none
        came, or shutting down); never raises."""

    def retry(self, data: bytes, client: str, respond: Respond) -> None:
        """A UDP query the first upstream did not answer: the next ones; never raises."""

    def failed(self, where: str, error: Exception, data: bytes, respond: Respond, *,
               over_tcp: bool) -> None:
        """A query our code failed on: counted, reported, answered SERVFAIL."""

    def fault(self, where: str, error: BaseException) -> None:
        """An internal error not tied to one query: counted and reported."""


class Listener(Protocol):
    """The listener's side, as the server sees it once it serves."""

    def sweep(self) -> None:
        """Called every SWEEP_INTERVAL: give back what is past its deadline."""

    def counts(self) -> dict[str, int]:
        """Packet counters of its own (the server's stats are counted apart)."""

    def close(self) -> None:
        """Stop serving; answer or give back what is in flight."""


class BlockKeeper(Protocol):
    """A `respond` that can also keep block answers (the C relay's block cache,
    udp.py): the server hands it each block answer it builds for that client's query
    (`keep_block`), so the listener can answer the same question itself from then on."""

    def __call__(self, answer: bytes) -> None: ...

    def keep_block(self, query: bytes, answer: bytes, verdict: Verdict, detail: str,
                   name: str) -> None:
        """`detail`: the query type's name, as the block's audit event carries it;
        `name`: the question's name as the server parsed it (never scanned again)."""
