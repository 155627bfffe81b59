"""Rebuild the engine's index from the log at start-up.

Per name, the record with the highest sequence number wins: a manifest makes a session (unless
its TTL has passed), a tombstone makes the name absent. A session whose chunks are not all in
the log (a damaged record) is reported and left out. Then the most recently committed
sessions (pinned ones first) are loaded into memory up to the high watermark; the rest stay
demoted, on disk only, until a restore promotes them. A log written by rdmakv 0.1 (format 1)
is rewritten once in the current format.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from slab import class_size

from ...errors import ManifestError, StoreFullError
from ...hashing import key_hex, verified
from ...wire import manifest as mf
from . import records as rec
from .index import Chunk, Namespace, Session, Tombstone
from .live_bytes import LiveBytes
from .promotion import Promotion
from .segment_log import Location, SegmentLog
from .tiering import Tiers


class ReplayHost(Protocol):
    """What replay rebuilds (the engine): its namespaces and their sessions, through the same
    ``install`` a commit uses, the live-byte accounting and the memory tier."""

    log: SegmentLog
    live: LiveBytes
    namespaces: dict[str, Namespace]
    tiers: Tiers
    promotion: Promotion
    say: Callable[[str], None]

    def namespace(self, name: str, *, replaying: bool = False) -> Namespace: ...

    def install(self, ns: Namespace, s: Session, data: bytes | None) -> None: ...


@dataclass
class Replayed:
    """What a replay found: the highest sequence number in the log (the next commit's is one more)
    and its figures (for the server's start-up line and STATS)."""

    seq: int = 0
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class _Latest:
    seq: int
    kind: int  # REC_MANIFEST or REC_DELETE
    loc: Location
    record: rec.Record | None = None
    manifest: mf.Manifest | None = None


def replay(engine: ReplayHost) -> Replayed:
    t0 = time.perf_counter()
    latest: dict[tuple[str, str], _Latest] = {}
    chunk_at: dict[tuple[str, int | bytes], tuple[Location, int | bytes | None]] = {}
    pins: dict[tuple[str, str], tuple[int, int, bool, Location]] = {}
    disk_records: dict[tuple[str, str], int] = {}
    v1_seq = 0
    v1 = False
    for r, loc in engine.log.replay():
        if r.rtype == rec.REC_CHUNK:
            chunk_at.setdefault((r.ns, r.key), (loc, r.check))
            continue
        ident = (r.ns, r.name)
        seq = r.seq
        if not seq:  # format 1: numbered in log order
            v1 = True
            v1_seq += 1
            seq = v1_seq
        if r.rtype == rec.REC_PIN:
            if seq > pins.get(ident, (0,))[0]:
                pins[ident] = (seq, r.manifest_seq, r.pinned, loc)
            continue
        if r.rtype == rec.REC_MANIFEST:
            disk_records[ident] = disk_records.get(ident, 0) + 1
        cur = latest.get(ident)
        if cur is not None and cur.seq >= seq:
            continue
        entry = _Latest(seq, r.rtype, loc)
        if r.rtype == rec.REC_MANIFEST:
            assert r.body is not None  # (a manifest record has one)
            try:
                entry.manifest = mf.decode(bytes(r.body))
            except ManifestError as err:
                engine.say(f"rdmakv: log holds an unreadable manifest {ident}: {err}; skipped")
                continue
            entry.record = rec.Record(r.rtype, r.ns, name=r.name, seq=seq, pinned=r.pinned,
                                      expires_ms=r.expires_ms, committed_ms=r.committed_ms)  # fmt: skip
        latest[ident] = entry
    seq = max([v1_seq, *(e.seq for e in latest.values()), *(p[0] for p in pins.values())], default=0)
    now = time.time()
    sessions: list[Session] = []
    for (ns_name, name), e in sorted(latest.items(), key=lambda kv: kv[1].seq):
        ns = engine.namespace(ns_name, replaying=True)
        ns.disk_records[name] = disk_records.get((ns_name, name), 0)
        if e.kind == rec.REC_DELETE:
            ns.last_seq[name] = e.seq
            if ns.disk_records[name]:
                ns.tombstones[name] = Tombstone(e.seq, e.loc)
                engine.live.live(ns, e.loc)
            continue
        assert e.record is not None and e.manifest is not None
        r, m = e.record, e.manifest
        expires = r.expires_ms / 1000
        if expires and expires <= now:
            continue
        unique_arr = mf.unique_in_order(m.keys)
        unique = unique_arr.tolist()
        absent = [k for k in unique if (ns_name, k) not in chunk_at]
        if absent:
            engine.say(
                f"rdmakv: session {name!r} of namespace {ns_name!r} left out: {len(absent)} of its chunks "
                f"are not in the log (damaged records; first {key_hex(absent[0])})"
            )
            continue
        lengths = dict(zip(m.keys.tolist(), m.lengths.tolist()))
        for k in unique:
            c = ns.chunks.get(k)
            if c is None:
                loc, check = chunk_at[(ns_name, k)]
                c = ns.chunks[k] = Chunk(k, lengths[k], loc, check=check)
                engine.live.live(ns, loc)
        s = Session(ns_name, name, e.seq, e.loc, m.n_chunks, unique_arr, m.total_bytes, e.loc.size - e.loc.body_offset,
                    r.committed_ms / 1000, expires, r.pinned)  # fmt: skip
        pin = pins.get((ns_name, name))
        if pin is not None and pin[1] == e.seq:
            s.pinned, s.pin_loc = pin[2], pin[3]
            engine.live.live(ns, pin[3])
        engine.install(ns, s, None)
        sessions.append(s)
    loaded = _load_resident(engine, sessions)
    stats = dict(
        manifests=float(len(sessions)), chunks=float(sum(len(n.chunks) for n in engine.namespaces.values())),
        resident=float(loaded), scan_s=time.perf_counter() - t0,
    )  # fmt: skip
    if v1:
        migrate_v1(engine)
    return Replayed(seq, stats)


def _load_resident(engine: ReplayHost, sessions: list[Session]) -> int:
    """Fill memory with the pinned, then the most recent, sessions up to the high watermark."""
    tiers = engine.tiers
    limit = tiers.watermark_bytes
    order = sorted(sessions, key=lambda s: (not s.pinned, -s.seq))
    loaded = 0
    for s in order:
        ns = engine.namespaces[s.ns]
        todo = [ns.chunks[k] for k in s.unique_keys() if ns.chunks[k].slot is None]
        need = sum(class_size(c.length) for c in todo) + s.manifest_len
        if tiers.mem_used() + need > limit or (ns.quota is not None and ns.used + need > ns.quota):
            if s.pinned:
                engine.say(f"rdmakv: pinned session {s.name!r} ({s.ns}) does not fit in memory; kept on disk")
            continue
        try:
            slots = ns.slab.alloc_run([c.length for c in todo])
        except (MemoryError, StoreFullError):
            continue
        ok = True
        for c, slot in zip(todo, slots):
            c.slot = slot
            view = ns.slab.view(slot)
            engine.log.read_into(c.loc, view)
            if not verified(c.key, view, c.check):
                ok = False
        if not ok:
            engine.say(f"rdmakv: session {s.name!r} ({s.ns}): a chunk in the log does not match its key")
        tiers.charge_manifest(ns, s, engine.promotion.read_manifest(s))
        tiers.claim(ns, s)
        s.complete = ok
        loaded += 1
    for s in sorted(sessions, key=lambda s: s.seq):
        tiers.lru_add(s)
    return loaded


def migrate_v1(engine: ReplayHost) -> None:
    """Rewrite a format-1 log in the current format: every live record once, then the old
    segments go. Only at start-up, before anything else touches the log."""
    old = sorted(engine.log.segments)
    active = engine.log.active_id
    for ns in engine.namespaces.values():
        for c in ns.chunks.values():
            data = bytearray(c.length)
            engine.log.read_into(c.loc, memoryview(data))
            engine.live.dead(ns, c.loc)
            c.loc, _ = engine.log.append(rec.REC_CHUNK, rec.chunk_parts(ns.name, c.key, memoryview(data), c.check))
            engine.live.live(ns, c.loc)
        for s in ns.sessions.values():
            manifest = engine.promotion.read_manifest(s)
            engine.live.dead(ns, s.loc)
            s.loc, _ = engine.log.append(rec.REC_MANIFEST, rec.manifest_parts(
                ns.name, s.name, s.seq, manifest, pinned=s.pinned, expires_ms=int(s.expires_at * 1000),
                committed_ms=int(s.committed_at * 1000)))  # fmt: skip
            engine.live.live(ns, s.loc)
            ns.disk_records[s.name] = 1
            if s.pin_loc is not None:
                engine.live.dead(ns, s.pin_loc)
                s.pin_loc = None
        for name, t in list(ns.tombstones.items()):
            engine.live.dead(ns, t.loc)
            del ns.tombstones[name]
    engine.log.rotate()
    for sid in old:
        if sid != active:
            engine.log.remove(sid)
            engine.live.forget(sid)
    engine.say(f"rdmakv: rewrote a format-1 log ({len(old)} segments) in the current format")
