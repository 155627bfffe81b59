"""What STATS and LIST report for one namespace: its own figures only, never another tenant's
or the store's totals."""

from __future__ import annotations

import time
from typing import Any, Protocol

from slab import CapacityBudget

from .admission import Admission
from .compactor import Compactor
from .index import COUNTERS, Namespace
from .live_bytes import LiveBytes
from .segment_log import Damage, SegmentLog


class StoreFigures(Protocol):
    """What the store-wide STATS reads (the engine has it all)."""

    namespaces: dict[str, Namespace]
    capacity: int
    disk_capacity: int
    budget: CapacityBudget
    admission: Admission
    live: LiveBytes
    log: SegmentLog
    damage: list[Damage]
    compactor: Compactor

    def mem_used(self) -> int: ...

    def pending_chunks(self) -> int: ...


def namespace_stats(ns: Namespace) -> dict[str, Any]:
    sessions = ns.sessions.values()
    resident = [s for s in sessions if s.resident]
    pinned = [s for s in sessions if s.pinned]
    slab = ns.slab.stats()
    out = {
        "namespace": ns.name,
        "manifests": len(ns.sessions),
        "manifest_bytes": sum(s.manifest_len for s in sessions),
        "kv_bytes": sum(s.total_bytes for s in sessions),
        "chunks": len(ns.chunks),
        "chunk_bytes": sum(c.length for c in ns.chunks.values()),
        "used_bytes": ns.used,
        "resident_sessions": len(resident),
        "resident_bytes": slab["payload_bytes"],
        "demoted_sessions": len(ns.sessions) - len(resident),
        "pinned_sessions": len(pinned),
        "pinned_bytes": sum(s.total_bytes for s in pinned),
        "disk_bytes": ns.disk_live,
        "slab_used_bytes": slab["used_bytes"],
        "slab_mapped_bytes": slab["mapped_bytes"],
        "slab_regions": slab["regions"],
        "orphan_chunks": ns.orphan_chunks,  # no session names them: kept as cache, the first to go
        "orphan_bytes": ns.orphan_bytes,
        "uncommitted_chunks": sum(1 for c in ns.chunks.values() if c.refs == 0 and not c.orphan),
        "quota_bytes": ns.quota,
    }
    out.update({k: int(ns.counters[k]) for k in COUNTERS})
    return out


def namespace_list(ns: Namespace, prefix: str = "", after: str = "", limit: int | None = None) -> list[dict[str, Any]]:
    """Sessions by name: those starting with ``prefix``, after the name ``after``, ``limit`` of them."""
    now = time.time()
    names = sorted(n for n in ns.sessions if n.startswith(prefix) and n > after)
    if limit is not None:
        names = names[:limit]
    return [
        {
            "name": n,
            "manifest_bytes": s.manifest_len,
            "chunks": s.n_chunks,
            "kv_bytes": s.total_bytes,
            "committed_at": s.committed_at,
            "pinned": s.pinned,
            "expires_in": round(s.expires_at - now, 3) if s.expires_at else None,
            "resident": s.resident,
        }
        for n, s in ((n, ns.sessions[n]) for n in names)
    ]


def store_stats(engine: StoreFigures) -> dict[str, Any]:
    """The whole store's figures: for admin keys only."""
    return {
        "namespaces": len(engine.namespaces),
        "capacity_bytes": engine.capacity,
        "memory_used_bytes": engine.mem_used(),
        "memory_reserved_bytes": engine.budget.reserved,
        "saves_in_flight_reserved_bytes": engine.admission.inflight,
        "saves_in_flight_uncommitted_chunks": engine.pending_chunks(),
        "disk_capacity_bytes": engine.disk_capacity,
        "disk_live_bytes": engine.live.total,
        "disk_bytes": engine.log.disk_bytes(),
        "segments": len(engine.log.segments),
        "fsyncs": engine.log.fsyncs,
        "damaged_records": len(engine.damage),
        "compaction": dict(engine.compactor.totals),
    }
