"""The composition below the front-ends: settings -> event sink, engine.

What `netfilter serve`, the mitmdump addon and the Unbound module share, so that no
front-end has to stand on `serve` (which knows every part) to get a working engine.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from netfilter.config import Settings
from netfilter.engine import Engine
from netfilter.events import EventSink, NullSink

if TYPE_CHECKING:
    from netfilter.audit.log import AuditLog

__all__ = ["event_sink", "make_engine"]

log = logging.getLogger(__name__)


def event_sink(settings: Settings, log_class: type[AuditLog] | None = None) -> EventSink:
    """The audit log of the config; without an audit section, events are not kept.
    `log_class`: an AuditLog of another kind (a DNS worker's appends only)."""
    audit = settings.audit
    if audit is None:
        log.warning("no audit section: blocks and list events are not recorded")
        return NullSink()
    from netfilter.audit.log import AuditLog, load_node_key
    from netfilter.audit.store import AuditStore

    store = AuditStore(settings.resolve(audit.path), group=audit.group)
    return (log_class or AuditLog)(store, origin=settings.node.id,
                    key=load_node_key(settings.resolve(settings.node.key)),
                    retention_days=audit.retention_days,
                    checkpoint_interval=audit.checkpoint_interval,
                    queue_size=audit.queue_size,
                    tiles=settings.resolve(audit.tiles) if audit.tiles else None)


def make_engine(settings: Settings, *, sink_class: type[AuditLog] | None = None) -> Engine:
    """The engine with the config's audit log as its sink (close it with `close()`), and
    the node's durable record of installed list versions as the floor of its lists.
    `sink_class`: as `event_sink`'s `log_class`."""
    from netfilter.updates.state import VersionState, state_path

    sink = event_sink(settings, sink_class)
    floor = VersionState(state_path(settings))
    try:
        return Engine(settings, sink, pseudonym_key=getattr(sink, "pseudonym_key", None),
                      floor=floor)
    except BaseException:
        sink.close()
        raise
