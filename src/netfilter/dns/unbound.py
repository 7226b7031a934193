"""The filter inside Unbound, as a Python module: same engine, same answers.

Unbound calls `operate` for every query that is not answered from its cache or
local data. The module sits before the iterator (`module-config: "python iterator"`,
or "validator python iterator"): a blocked name is answered here and never reaches
the iterator or the cache. Clean names pass to the iterator; its answer comes back
(MODDONE) and is checked again, the name and its CNAME targets, against the lists in
force then; a block there also expires the answer the iterator has just cached.

List updates: a thread looks at the config and list files every CHECK_INTERVAL
seconds and reloads the lists when one changed (a refused bundle leaves the lists in
force). Unbound answers cached names without asking any module (its worker serves
message-cache hits before the modules run, and in 1.17 an `inplace_cb_reply_cache`
callback cannot refuse the cached answer), and the lists are hashed, so the module
cannot name what to expire. So when the new lists hold a digest the old ones did not
(or a local list changed), it has Unbound flush its caches: `<control> flush_zone .`,
with <control> from NETFILTER_UNBOUND_CONTROL (default `unbound-control`). Removals
need no flush. The flush refetches every cached name once (measured in
benchmarks/README.md), which is why it is kept to swaps that add entries.

The engine is built on the first query, not at load: `unbound-checkconf` runs the
script and `init`, and must not create keys or write events.

Threads (`num-threads: N`): Unbound loads the module once per process and every
worker calls `operate` under the one GIL, so there is one Plugin and one engine per
process. What two workers share is either swapped whole (the engine's state, the
(settings, canaries) pair here) or counted under a lock taken only when something is
counted (a block, a canary answer), never per clean name.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import struct
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import unboundmodule as ub

from netfilter.childmetrics import Snapshot, engine_counters
from netfilter.config import DnsSettings, Settings, load_config
from netfilter.dns.answers import Reply, block_reply, soa_text
from netfilter.dns.canaries import Canaries
from netfilter.dns.codes import EDE_OPTION, RCODE_MASK, RRType
from netfilter.engine import Engine, Verdict
from netfilter.errors import NetfilterError
from netfilter.lists import Lists
from netfilter.node import make_engine

__all__ = ["CHECK_INTERVAL", "CONTROL_ENV", "Plugin", "adds_entries"]

log = logging.getLogger(__name__)
RETRY = 30.0  # seconds between attempts to load a broken config
CHECK_INTERVAL = 1.0  # seconds between two looks at the config and list files
CONTROL_ENV = "NETFILTER_UNBOUND_CONTROL"  # how to run unbound-control (a command line)
FLUSH_TIMEOUT = 60.0  # seconds unbound-control may take to flush


class Plugin:
    """One per Unbound module instance; thread-safe (Unbound may run several threads)."""

    def __init__(self, config_path: str | Path, *, check_interval: float = CHECK_INTERVAL,
                 control: str | None = None) -> None:
        """`control`: the unbound-control command line for flushes (default: the
        environment's NETFILTER_UNBOUND_CONTROL, else `unbound-control`)."""
        self.config_path = Path(config_path)
        self._engine: Engine | None = None
        settings = DnsSettings()
        # One reference, swapped whole on reload: a worker never answers with the new
        # canaries and the old answer settings.
        self._dns: tuple[DnsSettings, Canaries] = (settings, Canaries(settings))
        self.canary_counts: Counter[str] = Counter()  # canary answers per label; no names
        self._counts_lock = threading.Lock()  # canary_counts: workers count concurrently
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self.check_interval = check_interval
        self.control = shlex.split(control or os.environ.get(CONTROL_ENV) or "unbound-control")
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._stamps: tuple[tuple[str, int, int, int], ...] = ()
        self.flushes = 0  # cache flushes asked of Unbound (list swaps that added entries)

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
                        stamps = _stamps(self.config_path, settings)
                        dns = settings.dns or DnsSettings()
                        self._dns = (dns, Canaries(dns))
                        self._engine = make_engine(settings)
                    except NetfilterError as e:
                        self._retry_at = time.monotonic() + RETRY
                        log.error("netfilter: cannot load, answering SERVFAIL; retry in "
                                  "%d s: %s", RETRY, e)
                        raise
                    log.info("netfilter: lists loaded for unbound from %s", self.config_path)
                    self._stamps = stamps
                    self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                     name="netfilter-lists")
                    self._watcher.start()
        return self._engine

    def counters(self) -> Snapshot:
        """The plugin's counters: the engine's as a proxy child exports them
        (childmetrics.engine_counters), plus canary answers per label, cache flushes
        and list reloads. Counts only, never a name or a client."""
        with self._counts_lock:
            canaries = dict(self.canary_counts)
        out: Snapshot = {"canaries": canaries, "flushes": self.flushes}
        if self._engine is not None:
            out.update(engine_counters(self._engine))
            out["reloads"] = dict(self._engine.reloads)
        return out

    def close(self) -> None:
        """Stop watching the lists, commit queued events and sign a last checkpoint
        (Unbound's deinit). Unbound has no /metrics of ours: the counters go to its
        log, one line."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=FLUSH_TIMEOUT + 5)
        if self._engine is not None:
            log.warning("netfilter: counters at exit: %s",
                        json.dumps(self.counters(), separators=(",", ":"), sort_keys=True))
            self._engine.close()

    # ------------------------------------------------------------ list updates

    def _watch(self) -> None:
        while not self._stop.wait(self.check_interval):
            try:
                self.check_lists()
            except Exception:  # the watch must outlive one bad moment
                log.exception("netfilter: checking the list files failed")

    def check_lists(self) -> bool:
        """Reload the lists if the config or a list file changed; flush Unbound's
        caches if the new lists block more. True when new lists came into force."""
        engine = self._engine
        if engine is None:
            return False
        try:
            settings = load_config(self.config_path)
        except NetfilterError as e:
            if _stamps(self.config_path, None) != self._stamps[:1]:
                log.error("netfilter: config changed but cannot be read; the lists in "
                          "force stay: %s", e)
                self._stamps = _stamps(self.config_path, None) + self._stamps[1:]
            return False
        stamps = _stamps(self.config_path, settings)
        if stamps == self._stamps:
            return False
        local_changed = _local_stamps(stamps, settings) != _local_stamps(self._stamps, settings)
        self._stamps = stamps
        old = engine.lists
        if not engine.reload(settings, changed=str(self.config_path)):
            return False  # refused: the engine said why and recorded it
        canaries_before = set(self._dns[1].names)
        dns = settings.dns or DnsSettings()
        self._dns = (dns, Canaries(dns))
        # canaries switched on: Unbound may hold their real answers in its cache
        new_canaries = bool(set(self._dns[1].names) - canaries_before)
        new = engine.lists
        log.info("netfilter: lists reloaded for unbound (%d entries)", len(new))
        if local_changed or new_canaries or adds_entries(old, new):
            self.flush_cache()
        return True

    def flush_cache(self) -> None:
        """Have Unbound drop every cached answer: names cached as clean may be blocked
        now. Never raises: a failed flush is logged (cache-max-ttl still bounds it)."""
        command = [*self.control, "flush_zone", "."]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=FLUSH_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("netfilter: new list entries, but %s failed (%s): names cached "
                      "before stay until their TTL (cache-max-ttl)", shlex.join(command), e)
            return
        if done.returncode != 0:
            log.error("netfilter: new list entries, but %s exited %d: %s; names cached "
                      "before stay until their TTL (cache-max-ttl)", shlex.join(command),
                      done.returncode, (done.stdout + done.stderr).strip()[:300])
            return
        self.flushes += 1
        log.info("netfilter: new list entries: Unbound's cache flushed (%s)",
                 done.stdout.strip()[:200])

    # ------------------------------------------------------------ the module API

    def operate(self, module_id: int, event: int, qstate: Any, qdata: Any) -> bool:
        try:
            return self._operate(module_id, event, qstate)
        except NetfilterError:
            qstate.ext_state[module_id] = ub.MODULE_ERROR
            return True

    def _operate(self, module_id: int, event: int, qstate: Any) -> bool:
        if event in (ub.MODULE_EVENT_NEW, ub.MODULE_EVENT_PASS):
            if self._engine is None:
                self.engine  # noqa: B018 (load the config: are canaries on?)
            canaries = self._dns[1]
            if canaries.names:
                name = _plain(qstate.qinfo.qname_str)
                label = canaries.label(name)
                if label is not None:  # NXDOMAIN here, never to the iterator; counted only
                    with self._counts_lock:
                        self.canary_counts[label] += 1
                    return self._reply(module_id, qstate,
                                       canaries.reply(name, qstate.qinfo.qtype))
            verdict = self._check(qstate.qinfo.qname_str, qstate)
            if verdict is not None and verdict.blocked:
                return self._answer(module_id, qstate, verdict)
            qstate.ext_state[module_id] = ub.MODULE_WAIT_MODULE
            return True
        if event == ub.MODULE_EVENT_MODDONE:
            # The name again (the lists may have changed since NEW), then CNAME targets.
            # The iterator has cached its answer already: a block expires it there.
            for name, via_cname in ((qstate.qinfo.qname_str, False),
                                    *((t, True) for t in _cname_targets(qstate))):
                verdict = self._check(name, qstate, via_cname=via_cname)
                if verdict is not None and verdict.blocked:
                    ub.invalidateQueryInCache(qstate, qstate.qinfo)
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
        qinfo = qstate.qinfo
        structured = any(opt.code == EDE_OPTION for opt in qstate.edns_opts_front_in_iter)
        reply = block_reply(_plain(qinfo.qname_str), qinfo.qtype, verdict, self._dns[0],
                            structured=structured)
        return self._reply(module_id, qstate, reply)

    def _reply(self, module_id: int, qstate: Any, reply: Reply) -> bool:
        """Hand Unbound the answer answers.py planned (the resolver writes the same one):
        the records as text, in RFC 3597's generic form where only rdata is known."""
        qinfo = qstate.qinfo
        name = qinfo.qname_str
        msg = ub.DNSMessage(name, qinfo.qtype, qinfo.qclass,
                            ub.PKT_QR | ub.PKT_RA | (qstate.query_flags & ub.PKT_RD))
        for record in reply.answers:
            generic = f"\\# {len(record.rdata)} {record.rdata.hex()}".rstrip()
            msg.answer.append(f"{name} {record.ttl} IN TYPE{record.rtype} {generic}")
        if reply.soa_zone is not None:
            zone = name.rstrip(".") if reply.soa_zone == _plain(name) else reply.soa_zone
            msg.authority.append(soa_text(zone, reply.ttl))
        if not msg.set_return_msg(qstate):
            qstate.ext_state[module_id] = ub.MODULE_ERROR
            return True
        # The rcode goes into the reply's flags: with a non-zero qstate.return_rcode
        # Unbound would send only the header and question (no SOA for caching).
        rep = qstate.return_msg.rep
        rep.flags = (rep.flags & ~RCODE_MASK & 0xFFFF) | reply.rcode
        qstate.return_rcode = ub.RCODE_NOERROR
        qstate.return_msg.rep.security = ub.sec_status_insecure
        qstate.no_cache_store = 1  # decided per query, never served from cache
        if reply.ede is not None:
            data = struct.pack("!H", reply.ede) + reply.text.encode("utf-8", "replace")
            ub.edns_opt_list_append(qstate.edns_opts_front_out, EDE_OPTION, bytearray(data),
                                    qstate.region)
        qstate.ext_state[module_id] = ub.MODULE_FINISHED
        return True


def _plain(qname_str: str) -> str:
    """Unbound's name text as wire.Query.name has it: lowercase, no final dot."""
    return qname_str.rstrip(".").lower()


def adds_entries(old: Lists, new: Lists) -> bool:
    """Could `new` block a name that `old` did not? True when a bundle of `new` holds
    a digest its namesake in `old` did not (or is new with entries), or the local
    lists differ in name, version or size (the caller also counts any change of their
    files). Digests are sorted in a bundle. URL-level entries count too: the digests
    do not say which entries DNS enforces."""
    if _local(old) != _local(new):
        return True
    before = {b.manifest.list_id: b for b in old.bundles}
    for bundle in new.bundles:
        previous = before.get(bundle.manifest.list_id)
        if previous is None:
            if bundle.manifest.entries:
                return True
            continue
        if _new_digests(previous.array("digests.bin"), bundle.array("digests.bin")):
            return True
    return False


def _new_digests(old: np.ndarray[Any, Any], new: np.ndarray[Any, Any]) -> bool:
    """Any row of `new` not in `old` (both (n, 32) uint8, rows sorted)."""
    if len(new) == 0:
        return False
    if len(old) == 0:
        return True
    old_keys = np.ascontiguousarray(old).view("S32").ravel()
    new_keys = np.ascontiguousarray(new).view("S32").ravel()
    at = np.searchsorted(old_keys, new_keys).clip(max=len(old_keys) - 1)
    return bool((old_keys[at] != new_keys).any())


def _local(lists: Lists) -> list[tuple[str, int, int]]:
    """The local lists' identity: (list id, version, entries) of each, exceptions too."""
    matchers = [m for m in lists.blocking if m.source != "authority"]
    if lists.exceptions is not None:
        matchers.append(lists.exceptions)
    return [(m.list_id, m.version, m.entry_count) for m in matchers]


def _stamps(config: Path, settings: Settings | None) -> tuple[tuple[str, int, int, int], ...]:
    """The config file, then every file the lists come from: path, inode, size, mtime
    (a bundle installed by rename gets a new inode)."""
    files = [config]
    if settings is not None:
        for item in settings.lists:
            files.append(settings.resolve(item.path))
            files.extend(settings.resolve(k) for k in item.trust)
            if item.hmac_key is not None:
                files.append(settings.resolve(item.hmac_key))
        files.extend(settings.resolve(f) for f in (settings.local.block, settings.local.allow)
                     if f is not None)
    return tuple(_stamp(Path(f)) for f in files)


def _local_stamps(stamps: tuple[tuple[str, int, int, int], ...],
                  settings: Settings) -> set[tuple[str, int, int, int]]:
    local = {str(settings.resolve(f)) for f in (settings.local.block, settings.local.allow)
             if f is not None}
    return {s for s in stamps if s[0] in local}


def _stamp(path: Path) -> tuple[str, int, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (str(path), 0, -1, 0)
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


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
        if ub.ntohs(rrset.rk.type) != RRType.CNAME:
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
