"""The filter inside Unbound, as a Python module: same engine, same answers.

Unbound calls `operate` for every query that is not answered from its cache or
local data. The module sits before the iterator (`module-config: "python iterator"`,
or "validator python iterator"): a blocked name is answered here and never reaches
the iterator or the cache, so a block applies on the next query after a list update.
Clean names pass to the iterator; its answer comes back (MODDONE) and is checked for
CNAME targets that are blocked.

The engine is built on the first query, not at load: `unbound-checkconf` runs the
script and `init`, and must not create keys or write events.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from pathlib import Path
from typing import Any

import unboundmodule as ub

from netfilter.config import DnsSettings, load_config
from netfilter.dns.answers import extra_text
from netfilter.dns.wire import EDE_OPTION
from netfilter.engine import Answer, Engine, Verdict
from netfilter.errors import NetfilterError
from netfilter.node import make_engine

__all__ = ["Plugin"]

log = logging.getLogger(__name__)
TYPE_A, TYPE_AAAA, TYPE_CNAME = 1, 28, 5
RETRY = 30.0  # seconds between attempts to load a broken config
_RCODES = {Answer.NXDOMAIN: "RCODE_NXDOMAIN", Answer.REFUSED: "RCODE_REFUSED",
           Answer.STOPPAGE: "RCODE_NOERROR"}


class Plugin:
    """One per Unbound module instance; thread-safe (Unbound may run several threads)."""

    def __init__(self, config_path: str | Path) -> None:
        self.config_path = Path(config_path)
        self._engine: Engine | None = None
        self._settings = DnsSettings()
        self._lock = threading.Lock()
        self._retry_at = 0.0

    @property
    def engine(self) -> Engine:
        """The engine, built on first use. If the config or lists cannot be loaded the
        module fails closed (SERVFAIL: never resolve unfiltered), says why once, and
        tries again every RETRY seconds rather than on every query."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    if time.monotonic() < self._retry_at:
                        raise NetfilterError(self.config_path, "not loaded (see above)")
                    try:
                        settings = load_config(self.config_path)
                        self._settings = settings.dns or DnsSettings()
                        self._engine = make_engine(settings)
                    except NetfilterError as e:
                        self._retry_at = time.monotonic() + RETRY
                        log.error("netfilter: cannot load, answering SERVFAIL; retry in "
                                  "%d s: %s", RETRY, e)
                        raise
                    log.info("netfilter: lists loaded for unbound from %s", self.config_path)
        return self._engine

    def close(self) -> None:
        """Commit queued events and sign a last checkpoint (Unbound's deinit)."""
        if self._engine is not None:
            self._engine.close()

    # ------------------------------------------------------------ the module API

    def operate(self, module_id: int, event: int, qstate: Any, qdata: Any) -> bool:
        try:
            return self._operate(module_id, event, qstate)
        except NetfilterError:
            qstate.ext_state[module_id] = ub.MODULE_ERROR
            return True

    def _operate(self, module_id: int, event: int, qstate: Any) -> bool:
        if event in (ub.MODULE_EVENT_NEW, ub.MODULE_EVENT_PASS):
            verdict = self._check(qstate.qinfo.qname_str, qstate)
            if verdict is not None and verdict.blocked:
                return self._answer(module_id, qstate, verdict)
            qstate.ext_state[module_id] = ub.MODULE_WAIT_MODULE
            return True
        if event == ub.MODULE_EVENT_MODDONE:
            for target in _cname_targets(qstate):
                verdict = self._check(target, qstate, via_cname=True)
                if verdict is not None and verdict.blocked:
                    return self._answer(module_id, qstate, verdict)
            qstate.ext_state[module_id] = ub.MODULE_FINISHED
            return True
        qstate.ext_state[module_id] = ub.MODULE_ERROR
        return True

    def _check(self, name: str, qstate: Any, via_cname: bool = False) -> Verdict | None:
        qtype = ub.sldns_wire2str_type(qstate.qinfo.qtype)
        try:
            return self.engine.check_host(
                name, frontend="dns", client=_client(qstate),
                detail=f"{qtype} via CNAME" if via_cname else qtype)
        except ValueError:  # InvalidURL: the root or an empty name
            return None

    def _answer(self, module_id: int, qstate: Any, verdict: Verdict) -> bool:
        settings = self._settings
        qinfo = qstate.qinfo
        name, qtype, ttl = qinfo.qname_str, qinfo.qtype, settings.block_ttl
        answer = verdict.answer or Answer.STOPPAGE
        msg = ub.DNSMessage(name, qtype, qinfo.qclass,
                            ub.PKT_QR | ub.PKT_RA | (qstate.query_flags & ub.PKT_RD))
        if answer is Answer.STOPPAGE and qtype == TYPE_A:
            msg.answer.append(f"{name} {ttl} IN A {settings.stoppage_ipv4}")
        elif answer is Answer.STOPPAGE and qtype == TYPE_AAAA:
            msg.answer.append(f"{name} {ttl} IN AAAA {settings.stoppage_ipv6}")
        elif answer is not Answer.REFUSED:
            assert verdict.match is not None
            zone = verdict.match.expression.rstrip("/") + "."
            msg.authority.append(
                f"{zone} {ttl} IN SOA localhost. nobody.invalid. 1 3600 600 86400 {ttl}")
        if not msg.set_return_msg(qstate):
            qstate.ext_state[module_id] = ub.MODULE_ERROR
            return True
        # The rcode goes into the reply's flags: with a non-zero qstate.return_rcode
        # Unbound would send only the header and question (no SOA for caching).
        rep = qstate.return_msg.rep
        rep.flags = (rep.flags & 0xFFF0) | getattr(ub, _RCODES[answer])
        qstate.return_rcode = ub.RCODE_NOERROR
        qstate.return_msg.rep.security = ub.sec_status_insecure
        qstate.no_cache_store = 1  # a block is decided per query, never served from cache
        structured = any(opt.code == EDE_OPTION for opt in qstate.edns_opts_front_in_iter)
        data = struct.pack("!H", settings.ede) + extra_text(verdict, structured).encode()
        ub.edns_opt_list_append(qstate.edns_opts_front_out, EDE_OPTION, bytearray(data),
                                qstate.region)
        qstate.ext_state[module_id] = ub.MODULE_FINISHED
        return True


def _client(qstate: Any) -> str | None:
    try:
        return str(qstate.mesh_info.reply_list.query_reply.addr)
    except AttributeError:  # internal queries (prefetch, subqueries) have no client
        return None


def _cname_targets(qstate: Any) -> list[str]:
    msg = qstate.return_msg
    if msg is None or msg.rep is None:
        return []
    targets = []
    for i in range(msg.rep.an_numrrsets):
        rrset = msg.rep.rrsets[i]
        if ub.ntohs(rrset.rk.type) != TYPE_CNAME:
            continue
        data = rrset.entry.data
        for j in range(data.count):
            targets.append(_wire_name(data.rr_data[j][2:]))  # skip rdlength
    return targets


def _wire_name(wire: bytes) -> str:
    labels, i = [], 0
    while i < len(wire) and wire[i]:
        labels.append(bytes(wire[i + 1 : i + 1 + wire[i]]).decode("ascii", "replace"))
        i += 1 + wire[i]
    return ".".join(labels)
