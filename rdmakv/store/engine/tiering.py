"""Two tiers, one policy (docs/data-model.md §4): what leaves memory, what leaves the store, and when.

Memory (the slab, ``--capacity``) is a cache of the disk tier (the log, ``--disk-capacity``).
Past the memory high watermark the least recently used sessions are *demoted*: their chunks
leave the slab once no resident session names them, and stay on disk. Restoring a demoted
session *promotes* it: its chunks are read back from the log into fresh slots first. Past the
disk budget the least recently used sessions are *evicted*: gone, like a delete. Pinned
sessions are never demoted or evicted; sessions held by a restore in progress wait.

Quotas: a namespace over its quota demotes its own sessions; global pressure never demotes a
namespace that is within its quota (when quotas are set).

Everything here runs with the engine lock held, except the log reads of a promotion.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from slab import CapacityBudget, SlabFullError, Slot, total_class_size

from ...errors import DiskFullError, RdmakvError, StoreFullError
from ...hashing import Key
from ...units import fmt_bytes
from .admission import Admission
from .datadir import Reserve, fs_free_bytes
from .index import Chunk, Holder, Namespace, Session
from .live_bytes import LiveBytes
from .namespaces import NamespaceTable
from .orphans import Orphans
from .publishing import Publisher
from .segment_log import SegmentLog


class Compaction(Protocol):
    """What the tiers ask of the compactor: take garbage off the disk, now or soon."""

    def wake(self) -> None: ...

    def make_room(self, nbytes: int) -> None: ...


class Tiers:
    """The lifecycle of sessions and chunks across the two tiers: the LRU lists, the memory budget
    and its admission of saves in flight, demotion, promotion, eviction and the orphan cache. Owns
    ``mem_lru``, ``disk_lru`` and ``admission``; the engine's lock guards it."""

    def __init__(
        self, *, lock: threading.RLock, spaces: NamespaceTable, budget: CapacityBudget, capacity: int,
        disk_capacity: int, high_watermark: float, quotas: dict[str, int], log: SegmentLog, reserve: Reserve,
        live: LiveBytes, orphans: Orphans, publisher: Publisher, holders: set[Holder], directory: Path,
        compaction: Compaction, tombstone: Callable[[Namespace, str], int],
    ) -> None:  # fmt: skip
        self.lock = lock
        self.namespaces = spaces.by_name
        self.budget = budget
        self.capacity = capacity
        self.disk_capacity = disk_capacity
        self.high_watermark = high_watermark
        self.quotas = quotas
        self.log = log
        self.reserve = reserve
        self.live = live
        self.orphans = orphans
        self.publisher = publisher
        self.holders = holders  # (the engine's: every connection's holds, for what uncommitted saves hold)
        self.dir = directory
        self.compaction = compaction
        self.tombstone = tombstone  # an eviction is a delete the store decides on: the engine logs it
        self.mem_lru: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self.disk_lru: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self.fs_free = 1 << 62
        self.admission = Admission(self)  # reservations of saves in flight

    @property
    def watermark_bytes(self) -> int:
        """Memory the store may use before it demotes: the high watermark of ``capacity``."""
        return int(self.high_watermark * self.capacity)

    def relieve_pressure(self) -> None:
        """Upkeep: demote until memory is under the high watermark, and evict until the disk tier
        is within its limit (what is pinned or busy stays; saves then say so)."""
        any_ns = next(iter(self.namespaces.values()), None)
        if any_ns is None:
            return
        used = self.mem_used()
        if used > self.watermark_bytes:
            self.demote_until(used - self.watermark_bytes, any_ns, None)
        if self.live.total > self.disk_limit():
            try:
                self.disk_room(any_ns, 0)
            except RdmakvError:
                pass  # everything left is pinned or busy; saves will say so

    def refresh_fs_free(self) -> int:
        try:
            self.fs_free = fs_free_bytes(self.dir)
        except OSError:
            pass
        return self.fs_free

    def drop_pending(self, h: Holder, ns_name: str, key: Key) -> None:
        """Let go of an uncommitted save's hold on a chunk (committed, or given up)."""
        h.pending.pop((ns_name, key), None)
        ns = self.namespaces[ns_name]
        c = ns.chunks.get(key)
        if c is not None:
            if c.refs == 0 and c.holds == 1:
                ns.counters["orphans_dropped"] += 1
            self.unhold(ns, c)

    # -- chunks ---------------------------------------------------------------------------
    def drop_slot(self, ns: Namespace, c: Chunk) -> None:
        if c.slot is not None:
            ns.slab.free(c.slot)  # zeroed: deleted or demoted KV is not readable from memory
            c.slot = None

    def unhold(self, ns: Namespace, c: Chunk) -> None:
        c.holds -= 1
        self._settle(ns, c)

    def _settle(self, ns: Namespace, c: Chunk) -> None:
        """Free what nothing needs any more: the slot, or the whole chunk (an orphan stays, as cache)."""
        if c.holds or c.orphan:
            return
        if c.refs == 0:
            self.drop_slot(ns, c)
            if ns.chunks.get(c.key) is c:
                del ns.chunks[c.key]
                self.live.dead(ns, c.loc)
        elif c.rrefs == 0:
            self.drop_slot(ns, c)

    # -- sessions -------------------------------------------------------------------------
    def claim(self, ns: Namespace, s: Session) -> None:
        """Make ``s`` resident: its chunks are wanted in memory (slots come with promotion)."""
        if s.resident:
            return
        s.resident = True
        for k in s.unique_keys():
            ns.chunks[k].rrefs += 1
        if not s.pinned and not s.dead:
            self.mem_lru[(s.ns, s.name)] = s
            self.mem_lru.move_to_end((s.ns, s.name))

    def demote(self, ns: Namespace, s: Session) -> int:
        """Let ``s`` go from memory; returns the bytes freed."""
        before = ns.used
        s.resident = s.complete = False
        self.cache_locations(ns, s, None)
        self.publisher.unpublish(ns, s)
        if self.mem_lru.get((s.ns, s.name)) is s:
            del self.mem_lru[(s.ns, s.name)]
        for k in s.unique_keys():
            c = ns.chunks[k]
            c.rrefs -= 1
            self._settle(ns, c)
        self._uncharge_manifest(ns, s)
        ns.counters["demotions"] += 1
        return before - ns.used

    def retire(self, ns: Namespace, s: Session) -> None:
        """``s`` was deleted, replaced, evicted or expired: its record is garbage now, and its
        chunks go when the last restore holding it lets go."""
        self.publisher.unpublish(ns, s)
        self.lru_remove(s)
        self.live.dead(ns, s.loc)
        if s.pin_loc is not None:
            self.live.dead(ns, s.pin_loc)
            s.pin_loc = None
        s.dead = True
        if s.holds:
            ns.zombies.add(s)
            return
        self._release(ns, s)

    def _release(self, ns: Namespace, s: Session) -> None:
        ns.zombies.discard(s)
        was_resident = s.resident
        s.resident = s.complete = False
        for k in s.unique_keys():
            c = ns.chunks[k]
            c.refs -= 1
            if was_resident:
                c.rrefs -= 1
            if c.refs == 0 and s.replaced:  # replaced, not deleted: the chunk stays, as cache
                self._orphan(ns, c, s.name)
            self._settle(ns, c)
        self._uncharge_manifest(ns, s)

    # -- the orphan cache ----------------------------------------------------------------
    def _orphan(self, ns: Namespace, c: Chunk, name: str) -> None:
        if c.orphan:
            return
        c.orphan = True
        c.orphan_of = name
        ns.orphans_by_name.setdefault(name, set()).add(c.key)
        self.orphans.add(ns.name, c)
        ns.orphan_chunks += 1
        ns.orphan_bytes += c.length
        ns.counters["orphans_kept"] += 1

    def unorphan(self, ns: Namespace, c: Chunk) -> None:
        """A session names ``c`` again (or it goes): it leaves the orphan cache."""
        if not c.orphan:
            return
        c.orphan = False
        keys = ns.orphans_by_name.get(c.orphan_of)
        if keys is not None:
            keys.discard(c.key)
            if not keys:
                del ns.orphans_by_name[c.orphan_of]
        c.orphan_of = ""
        self.orphans.discard(ns.name, c)
        ns.orphan_chunks -= 1
        ns.orphan_bytes -= c.length

    def _shed_orphans(self, amount: int, requester: Namespace, only: Namespace | None = None) -> int:
        """Memory pressure: free the slots of the least recently used orphans (they stay on disk)
        until ``amount`` bytes are freed; returns the bytes freed."""
        freed = 0
        for ns_name, c in self.orphans.resident():
            if freed >= amount:
                break
            ns = self.namespaces[ns_name]
            if (only is not None and ns is not only) or c.holds or c.slot is None:
                continue
            if only is None and self._within_quota(ns, requester):
                continue
            freed += c.slot.size
            self.drop_slot(ns, c)
            self.orphans.left_memory(ns_name, c)
            ns.counters["orphans_shed"] += 1
        return freed

    def _evict_orphans(self, nbytes: int, limit: int, requester: Namespace) -> None:
        """Disk pressure: drop the least recently used orphans (disk-only ones first) until
        ``nbytes`` more live log bytes fit under ``limit``."""
        for ns_name, c in self.orphans.all():
            if self.live.total + nbytes <= limit:
                return
            ns = self.namespaces[ns_name]
            if c.holds or self._within_disk_quota(ns, requester):
                continue
            self._drop_orphan(ns, c)

    def _within_quota(self, owner: Namespace, requester: Namespace) -> bool:
        """Another tenant's memory pressure does not push ``owner`` below its quota."""
        return bool(self.quotas) and owner is not requester and owner.quota is not None and owner.used <= owner.quota

    def _within_disk_quota(self, owner: Namespace, requester: Namespace) -> bool:
        """The same for the disk tier: a quota's share of it is the quota's share of memory."""
        return bool(self.quotas) and owner is not requester and owner.quota is not None \
            and owner.disk_live * self.capacity <= owner.quota * self.disk_capacity

    def _drop_orphan(self, ns: Namespace, c: Chunk) -> None:
        self.unorphan(ns, c)
        self.drop_slot(ns, c)
        if ns.chunks.get(c.key) is c:
            del ns.chunks[c.key]
            self.live.dead(ns, c.loc)
        ns.counters["orphans_evicted"] += 1

    def free_orphans_of(self, ns: Namespace, name: str) -> None:
        """``name`` was deleted: the chunks its earlier versions left as cache go too (zeroed; a
        read in progress lets go of its chunk first)."""
        for key in list(ns.orphans_by_name.get(name, ())):
            c = ns.chunks.get(key)
            if c is None:
                continue
            self.unorphan(ns, c)
            self._settle(ns, c)  # refs 0 and no longer an orphan: gone now, or when its holds end

    def lru_remove(self, s: Session) -> None:
        ident = (s.ns, s.name)
        for lru in (self.mem_lru, self.disk_lru):
            if lru.get(ident) is s:  # a newer version of the name may hold the entry already
                del lru[ident]

    def lru_add(self, s: Session) -> None:
        if s.pinned or s.dead:
            return
        ident = (s.ns, s.name)
        self.disk_lru[ident] = s
        self.disk_lru.move_to_end(ident)
        if s.resident:
            self.mem_lru[ident] = s
            self.mem_lru.move_to_end(ident)

    def unhold_session(self, ns: Namespace, s: Session) -> None:
        s.holds -= 1
        if s.holds == 0 and s.dead:
            self._release(ns, s)

    # -- memory ---------------------------------------------------------------------------
    def charge_manifest(self, ns: Namespace, s: Session, data: bytes) -> None:
        s.data = data
        ns.manifest_bytes += len(data)
        self.budget.reserved += len(data)

    def cache_locations(self, ns: Namespace, s: Session, value: tuple[int, bytes] | None) -> None:
        """Keep (or drop) a session's encoded location table, charged to the memory budget as its
        manifest is: it is as large as the manifest's chunk table. Not kept when there is no room."""
        old = s.encoded_locations
        if old is not None:
            ns.manifest_bytes -= len(old[1])
            self.budget.release(len(old[1]))
            s.encoded_locations = None
        if value is not None and self.budget.room >= len(value[1]):
            s.encoded_locations = value
            ns.manifest_bytes += len(value[1])
            self.budget.reserved += len(value[1])

    def _uncharge_manifest(self, ns: Namespace, s: Session) -> None:
        self.cache_locations(ns, s, None)
        if s.data is not None:
            ns.manifest_bytes -= len(s.data)
            self.budget.release(len(s.data))
            s.data = None

    def mem_used(self) -> int:
        return sum(ns.used for ns in self.namespaces.values())

    def make_room(
        self, ns: Namespace, need: int, protect: Session | None = None, *, hard: bool = False,
        holder: Holder | None = None,
    ) -> None:  # fmt: skip
        """Demote until ``need`` more bytes fit under ns's quota and the high watermark, counting
        what other saves in flight have reserved as used (``holder``'s own reservation is what it
        is spending); with ``hard``, also until the budget itself has room (bytes charged outside
        the slab). SaveMustWait when other saves in flight hold the rest, StoreFullError when what
        is left is pinned or held by restores."""
        if ns.quota is not None and ns.used + need > ns.quota:
            self.demote_until(ns.used + need - ns.quota, ns, protect, only=ns)
            if ns.used + need > ns.quota:
                raise self.admission.no_room(ns, need, holder, f"namespace {ns.name!r} quota of {fmt_bytes(ns.quota)}")
        limit = self.watermark_bytes
        others = self.admission.others_reserved(holder)
        if self.budget.reserved + others + need > limit:
            self.release_regions(None)
            used = self.mem_used() + others
            if used + need > limit:
                self.demote_until(used + need - limit, ns, protect)
        # what is charged outside the slab (a manifest) needs room in what is *used*: slab regions
        # mapped but not full are room the slab can still use, and mapping holds up to capacity
        while hard and self.capacity - self.mem_used() - others < need:
            if not self.demote_until(need, ns, protect):
                raise self.admission.no_room(ns, need, holder, f"memory capacity of {fmt_bytes(self.capacity)}")

    def demote_until(
        self, amount: int, requester: Namespace, protect: Session | None, only: Namespace | None = None
    ) -> int:
        """Free ``amount`` bytes of memory: orphans' slots first, then demote sessions, least
        recently used first, and only when that is not enough sessions a restore looked up.

        A restore's hold keeps its version from being freed, not in memory: a held session that
        is demoted stays on disk, and a restore still reading it gets every chunk right (a READ
        that finds its slot gone fails its check and goes over TCP, a TCP fetch reads the log).
        Holds last until the connection's next lookup, so without this, clients that each hold
        their last restore would hold the memory the next save needs."""
        freed = self._shed_orphans(amount, requester, only)
        for held in (False, True):
            for s in list(self.mem_lru.values()):
                if freed >= amount:
                    break
                if s is protect or bool(s.holds) != held or not s.resident:
                    continue
                owner = self.namespaces[s.ns]
                if only is not None and owner is not only:
                    continue
                if only is None and self._within_quota(owner, requester):
                    continue  # within its quota: another tenant's pressure does not push it out
                freed += self.demote(owner, s)
        if freed:
            self.release_regions(None)
        return freed

    def alloc_run(
        self, ns: Namespace, lengths: list[int], protect: Session | None = None, holder: Holder | None = None
    ) -> list[Slot]:
        """Slots for a run of chunks, demoting what it takes (``holder``: the save they are for,
        whose reservation they may use); SaveMustWait or StoreFullError when nothing can go."""
        need = total_class_size(lengths)
        self.make_room(ns, need, protect, holder=holder)
        released = False
        while True:
            try:
                return ns.slab.alloc_run(lengths)
            except SlabFullError:
                pass
            if not released:  # empty regions of other namespaces first (a failed run retires its own)
                self.release_regions(None)
                released = True
                continue
            # every round from here demotes a session or gives up, so this ends
            if not self.demote_until(need, ns, protect):
                raise self.admission.no_room(ns, need, holder, f"memory capacity of {fmt_bytes(self.capacity)}")

    def release_regions(self, older_than: float | None) -> int:
        return sum(n.slab.release_empty(older_than) for n in self.namespaces.values())

    def full(self, ns: Namespace, need: int, limit: str) -> StoreFullError:
        pinned = sum(s.total_bytes for s in ns.sessions.values() if s.pinned)
        busy = sum(1 for s in ns.sessions.values() if s.holds)
        return StoreFullError(
            f"store full: no room for {fmt_bytes(need)} in namespace {ns.name!r} under the {limit}; "
            f"what is left is pinned ({fmt_bytes(pinned)} pinned in this namespace) or in use "
            f"({busy} sessions being restored, {self.pending_chunks()} chunks of uncommitted saves)"
        )

    def pending_chunks(self) -> int:
        return sum(len(h.pending) for h in self.holders)

    # -- disk -----------------------------------------------------------------------------
    def fs_room(self) -> int:
        """Bytes our segments may take on this filesystem: what they take now plus what is free,
        less the reserve and one segment of headroom for compaction."""
        self.refresh_fs_free()
        return self.log.disk_bytes() + self.fs_free - self.reserve.size - self.log.segment_bytes

    def disk_limit(self) -> int:
        """Live bytes the disk tier may hold: the budget, or half the filesystem's room when that
        is less (the log may carry as much garbage as live data before compaction takes it)."""
        return max(0, min(self.disk_capacity, self.fs_room() // 2))

    def disk_room(self, ns: Namespace, nbytes: int) -> None:
        """Evict least recently used sessions until ``nbytes`` more live log bytes fit."""
        limit = self.disk_limit()
        if self.live.total + nbytes <= limit:
            return
        self._evict_orphans(nbytes, limit, ns)
        for s in list(self.disk_lru.values()):
            if self.live.total + nbytes <= limit:
                break
            if s.holds:
                continue
            owner = self.namespaces[s.ns]
            if self._within_disk_quota(owner, ns):
                continue  # within its quota's share of the disk tier
            self._evict(owner, s)
        self.compaction.wake()
        if self.live.total + nbytes > limit:
            pinned = sum(x.total_bytes for n in self.namespaces.values() for x in n.sessions.values() if x.pinned)
            raise DiskFullError(
                f"disk full: {fmt_bytes(nbytes)} more does not fit in the disk tier's {fmt_bytes(limit)} "
                f"(--disk-capacity {fmt_bytes(self.disk_capacity)}, filesystem free {fmt_bytes(self.fs_free)}); "
                f"what is left is pinned ({fmt_bytes(pinned)}) or being restored"
            )

    def make_disk_room(self, nbytes: int) -> None:
        """Before an append, with no lock held: when the filesystem would not take ``nbytes``
        more, compact now (evictions made the garbage, this takes it off the disk)."""
        if self.log.disk_bytes() + nbytes > self.fs_room():
            self.compaction.make_room(nbytes)

    def _evict(self, ns: Namespace, s: Session) -> None:
        """Drop a session for disk room: a delete the store decides on (a tombstone, no fsync wait)."""
        self.tombstone(ns, s.name)
        del ns.sessions[s.name]
        self.retire(ns, s)
        ns.counters["evictions"] += 1

    def expire_due(self) -> int:
        now = time.time()
        n = 0
        for ns in self.namespaces.values():
            for s in [s for s in ns.sessions.values() if s.expired(now)]:
                del ns.sessions[s.name]
                self.retire(ns, s)  # no tombstone: replay drops an expired record by itself
                ns.counters["expirations"] += 1
                n += 1
        return n

