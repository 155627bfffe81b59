"""The restore path: looking a session up (promoting it when it was demoted), its chunk
locations for one-sided READs, and copying chunks out for TCP restores."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np

from slab import Slot

from ...errors import NotFoundError
from ...hashing import KEY_OPAQUE_XXH3, Check, Key, is_opaque, key_alg
from ...wire import manifest as mf
from ...wire.batches import FOUND, NOT_FOUND, NOT_SERVED, REGION_BYTES, Found, found_size
from ...wire.messages import LOCATION_DTYPE, NO_REGION, Locations, make_regions
from ...wire.runs import contiguous_runs
from .index import Chunk, Holder, Namespace, Session
from .namespaces import NamespaceTable
from .orphans import Orphans
from .promotion import Promotion
from .segment_log import Segment, SegmentLog
from .tiering import Tiers


class ChunkViews:
    """What ``chunk_views`` found; ``release()`` once the bytes are sent."""

    def __init__(self, lock: threading.RLock, unhold: Callable[[Namespace, Chunk], None]) -> None:
        self.lock = lock
        self.unhold = unhold
        self.ns: Namespace | None = None
        self.served: list[tuple[Key, memoryview | None]] = []
        self.absent: list[Key] = []
        self.checks: list[Check | None] = []  # per served chunk: the store's check (opaque keys)
        self.held: list[Chunk] = []
        self.segments: list[Segment] = []
        self.slots: list[Slot | None] = []
        self.payload: list[memoryview] = []  # the chunk bytes in order: slab neighbours as one view

    def release(self) -> None:
        self.served = []
        self.checks = []
        self.payload = []
        with self.lock:
            for c in self.held:
                assert self.ns is not None  # (set with the first held chunk)
                self.unhold(self.ns, c)
        self.held = []
        for seg in self.segments:
            seg.release()
        self.segments = []


def _runs(ns: Namespace, slots: list[Slot | None]) -> list[memoryview]:
    """Chunks that lie back to back in one region (a save's run) as one view: one MAC update and
    one iovec for the lot instead of one per chunk (all served from memory: each has a slot)."""
    placed = [s for s in slots if s is not None]
    runs = contiguous_runs([s.region for s in placed], [s.offset for s in placed], [s.length for s in placed],
                           [s.size == s.length for s in placed])  # fmt: skip
    return [ns.slab.regions[r].view[start : start + n] for r, start, n in runs]


class Reads:
    """Everything a restore asks of the store, and the holds a restore's lookup keeps on the
    versions it found (``drop_restore_hold``). Keeps no state of its own beyond the holders'."""

    def __init__(self, lock: threading.RLock, spaces: NamespaceTable, tiers: Tiers, promotion: Promotion,
                 orphans: Orphans, log: SegmentLog) -> None:  # fmt: skip
        self.lock = lock
        self.spaces = spaces
        self.tiers = tiers
        self.promotion = promotion
        self.orphans = orphans
        self.log = log

    def drop_restore_hold(self, h: Holder) -> None:
        """``h``'s last lookup (one session, or a GET_MANIFESTS batch) no longer needs its versions."""
        if h.restore is not None:
            ns, s = h.restore
            h.restore = None
            self.tiers.unhold_session(ns, s)
        batch, h.batch = h.batch, []
        for ns, s in batch:
            self.tiers.unhold_session(ns, s)

    def lookup(self, ns: Namespace, name: str) -> Session:
        s = ns.sessions.get(name)
        if s is not None and s.expired(time.time()):
            del ns.sessions[name]
            self.tiers.retire(ns, s)
            ns.counters["expirations"] += 1
            s = None
        if s is None:
            raise NotFoundError(f"no manifest named {name!r} in namespace {ns.name!r}")
        return s

    def get_manifest(
        self, ns_name: str, name: str, want_locations: bool, holder: Holder
    ) -> tuple[bytes, bytes | None, str]:
        """(manifest, encoded chunk locations when asked, tier: "memory" or "disk").

        The lookup holds this version for the caller until its next lookup, so its chunks stay
        while it fetches them. A demoted session is promoted first (one extra log read)."""
        with self.lock:
            ns = self.spaces.existing(ns_name)
            s = self.lookup(ns, name)
            self.drop_restore_hold(holder)
            s.holds += 1
            holder.restore, holder.restore_at = (ns, s), time.monotonic()
            hit = self._count_lookup(ns, s, want_locations)
        data = self._manifest_of(ns, s, hit)
        if not want_locations:
            return data, None, "memory" if hit else "disk"
        with self.lock:
            version = ns.region_version
            if s.encoded_locations is None or s.encoded_locations[0] != version or not s.complete:
                enc = self.located(ns, mf.keys_view(data).tolist()).encode()
                self.tiers.cache_locations(ns, s, (version, enc) if s.complete else None)
            else:
                enc = s.encoded_locations[1]
        return data, enc, "memory" if hit else "disk"

    def _manifest_of(self, ns: Namespace, s: Session, resident: bool) -> bytes:
        """A looked-up (held) session's manifest: promoted first when it is not ``resident``, read
        from its log record when memory had no room for it."""
        if not resident:
            self.promotion.promote(ns, s)
        with self.lock:
            data = s.data
        return data if data is not None else self.promotion.read_manifest(s)

    def _count_lookup(self, ns: Namespace, s: Session, want_locations: bool) -> bool:
        """A restore looked ``s`` up: recency and counters; whether it is wholly in memory."""
        self.tiers.lru_add(s)
        hit = s.complete
        ns.counters["restores"] += 1
        ns.counters["memory_hits" if hit else "disk_hits"] += 1
        # by the transport the client then reads with (locations: it READs them)
        ns.counters[f"lookups_{'rdma' if want_locations else 'tcp'}_{'memory' if hit else 'disk'}"] += 1
        return hit

    def get_manifests(
        self, ns_name: str, names: Sequence[str], want_locations: bool, holder: Holder, max_bytes: int
    ) -> tuple[list[Found], np.ndarray | None]:
        """Many restores' lookups in one (GET_MANIFESTS): (an entry per name, the region table
        when locations are asked). Every version found is held for the caller, together, until
        its next lookup, so its chunks stay while it fetches them; demoted ones are promoted.
        Names past ``max_bytes`` of reply are NOT_SERVED (the caller asks for them again)."""
        with self.lock:
            self.drop_restore_hold(holder)
            holder.restore_at = time.monotonic()
            max_bytes -= 2 * len(self.spaces.writable(ns_name).slab.regions) * REGION_BYTES  # the table goes beside
        out: list[Found] = []
        total = 0
        for name in names:
            if total and total >= max_bytes:  # at least one is served, whatever the budget
                out.append(Found(NOT_SERVED))
                continue
            with self.lock:
                ns = self.spaces.writable(ns_name)
                s = ns.sessions.get(name)
                if s is None or s.expired(time.time()):
                    s = None
                else:
                    s.holds += 1
                    holder.batch.append((ns, s))
                    hit = self._count_lookup(ns, s, want_locations)
            if s is None:
                out.append(Found(NOT_FOUND))
                continue
            data = self._manifest_of(ns, s, hit)
            out.append(Found(FOUND, data, "memory" if hit else "disk"))
            total += found_size(out[-1]) + (s.n_chunks * LOCATION_DTYPE.itemsize if want_locations else 0)
        if not want_locations:
            return out, None
        with self.lock:  # one region table for the whole reply, taken after every slot it must name
            ns = self.spaces.writable(ns_name)
            regions = self._region_table(ns)
            known = set(regions["id"].tolist())
            for f in (f for f in out if f.status == FOUND):
                loc = self.located(ns, mf.keys_view(f.manifest).tolist(), regions=regions)
                loc.slots["region"][~np.isin(loc.slots["region"], list(known))] = NO_REGION
                f.slots, f.checks, f.check_alg = loc.slots, loc.checks, loc.check_alg
        return out, regions

    def has_manifests(self, ns_name: str, names: Sequence[str]) -> np.ndarray:
        """Which names are committed, unexpired sessions: a probe, so nothing is touched (no
        promotion, no move in the LRU, no hit counters, no hold)."""
        now = time.time()
        with self.lock:
            sessions = self.spaces.existing(ns_name).sessions
            return np.fromiter(
                ((s := sessions.get(n)) is not None and not s.expired(now) for n in names), dtype=bool, count=len(names)
            )

    def peek_manifest(self, ns_name: str, name: str) -> bytes:
        """A session's manifest without touching the session as a restore does: no promotion,
        no move in the LRU, no hit counters, no hold kept. For scans of every session (cluster
        repair), which must not warm up, reorder or count what they only read."""
        with self.lock:
            ns = self.spaces.existing(ns_name)
            s = self.lookup(ns, name)
            if s.data is not None:
                return s.data
            s.holds += 1  # its log record must outlive the read
        try:
            return self.promotion.read_manifest(s)
        finally:
            with self.lock:
                self.tiers.unhold_session(ns, s)

    def read_chunks_into(
        self, ns_name: str, keys: Sequence[int], out: bytearray
    ) -> tuple[bytearray, list[memoryview | None]]:
        """Copy chunks into ``out`` (grown when too small) and return (buffer, views of it); a
        chunk not in memory is read from the log. Bytes are copied without the engine lock."""
        plan: list[tuple[Chunk, Segment | None, int] | None] = []
        with self.lock:
            ns = self.spaces.existing(ns_name)
            for k in keys:
                c = ns.chunks.get(k)
                if c is None:
                    plan.append(None)
                    continue
                c.holds += 1
                if c.slot is not None and c.ready:
                    plan.append((c, None, 0))
                else:
                    plan.append((c, self.log.segment(c.loc.segment).acquire(), c.loc.body))
        try:
            need = sum(p[0].length for p in plan if p is not None)
            if len(out) < need:
                out = bytearray(max(need, 2 * len(out)))
            view = memoryview(out)
            result: list[memoryview | None] = []
            pos = 0
            for p in plan:
                if p is None:
                    result.append(None)
                    continue
                c, seg, offset = p
                dst = view[pos : pos + c.length]
                if seg is None:
                    assert c.slot is not None  # (planned from memory)
                    dst[:] = ns.slab.view(c.slot)
                else:
                    seg.pread_into(offset, dst)
                result.append(dst)
                pos += c.length
            return out, result
        finally:
            with self.lock:
                for p in plan:
                    if p is not None:
                        self.tiers.unhold(ns, p[0])
            for p in plan:
                if p is not None and p[1] is not None:
                    p[1].release()

    def chunk_views(self, ns_name: str, keys: Sequence[Key], max_bytes: int) -> ChunkViews:
        """For a GET_CHUNKS reply: each distinct key once, in order, up to ``max_bytes`` (at least
        one chunk). Chunks in memory are served from the slab itself (no copy; they are held
        until ``release``), the rest read from the log. Keys past the budget are left out."""
        out = ChunkViews(self.lock, self.tiers.unhold)
        disk: list[tuple[Chunk, Segment, int]] = []
        with self.lock:
            ns = out.ns = self.spaces.existing(ns_name)
            total = 0
            for k in dict.fromkeys(keys):
                c = ns.chunks.get(k)
                if c is None:
                    out.absent.append(k)
                    continue
                if out.held and total + c.length > max_bytes:
                    break
                c.holds += 1
                out.held.append(c)
                out.checks.append(c.check)
                if c.orphan:
                    self.orphans.touch(ns.name, c)
                total += c.length
                if c.slot is not None and c.ready:
                    out.served.append((k, ns.slab.view(c.slot)))
                    out.slots.append(c.slot)
                else:
                    out.slots.append(None)
                    seg = self.log.segment(c.loc.segment).acquire()
                    out.segments.append(seg)
                    disk.append((c, seg, c.loc.body))
                    out.served.append((k, None))
        out.payload = _runs(ns, out.slots) if not disk else []  # (set below from the disk reads)
        if disk:
            buf = memoryview(bytearray(sum(c.length for c, _, _ in disk)))
            pos = 0
            views = {}
            for c, seg, offset in disk:
                seg.pread_into(offset, buf[pos : pos + c.length])
                views[c.key] = buf[pos : pos + c.length]
                pos += c.length
            out.served = [(k, v if v is not None else views[k]) for k, v in out.served]
            out.payload = [v for _, v in out.served if v is not None]  # (every one is, now)
        return out

    def locate(self, ns_name: str, keys: np.ndarray) -> Locations:
        with self.lock:
            ns = self.spaces.existing(ns_name)
            return self.located(ns, keys.tolist(), with_lengths=True)

    def located(
        self, ns: Namespace, keys: list[Key], with_lengths: bool = False, regions: np.ndarray | None = None
    ) -> Locations:
        """The region table and where each key's chunk lies in the slab (NO_REGION: not in memory),
        with the store's check of each chunk when the keys are opaque, and with ``with_lengths``
        each chunk's length (0: not stored) for a caller that knows no manifest naming them."""
        out = np.zeros(len(keys), dtype=LOCATION_DTYPE)
        out["region"] = NO_REGION
        lengths = np.zeros(len(keys), dtype=np.uint32) if with_lengths else None
        alg = key_alg(keys[0]) if keys else 0
        checks: list[Check] | None = [] if is_opaque(alg) else None
        blank: Check = 0 if alg == KEY_OPAQUE_XXH3 else bytes(32)
        for i, k in enumerate(keys):
            c = ns.chunks.get(k)
            if c is not None and c.slot is not None and c.ready:
                s = c.slot
                out[i] = (s.region, s.offset, s.gen, s.size)
                if lengths is not None:
                    lengths[i] = c.length
                if c.orphan:
                    self.orphans.touch(ns.name, c)  # located by key: the engine is about to read it
            if checks is not None:
                checks.append(c.check if c is not None and c.check is not None else blank)
        table = self._region_table(ns) if regions is None else regions
        if checks is None:
            return Locations(table, out, lengths=lengths)
        arr = (np.array(checks, dtype=np.uint64) if alg == KEY_OPAQUE_XXH3
               else np.frombuffer(b"".join(cast(list[bytes], checks)), "V32"))  # fmt: skip
        return Locations(table, out, arr, alg, lengths)

    def _region_table(self, ns: Namespace) -> np.ndarray:
        return make_regions(
            [(r.id, r.address, r.length, ns.rkeys.get(r.id, 0)) for r in ns.slab.regions.values()]
        )
