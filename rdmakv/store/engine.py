"""The store itself, without sockets: namespaces, chunk index, two tiers, durable log.

Semantics (DESIGN §2, §8): chunks are immutable and content-addressed; sessions (manifests)
are name-addressed and replaced atomically; a manifest is visible only when every chunk it
names is present. The memory tier (slab) caches the disk tier (log); ``tiering`` decides what
leaves which. ``index`` says which counts keep bytes alive.

Locking: one engine lock around the index. It is never held across an fsync (commits share
one through the log's group commit), a bulk copy of chunk bytes, or a log read: the work that
needs bytes to stay put takes holds under the lock, does the copy without it, and lets go.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from slab import CapacityBudget, Region, Slab

from ..errors import DiskFullError, IntegrityError, ManifestError
from ..hashing import Check, Key, check_of, is_opaque, key_alg, key_hex, keys_array, matches
from ..wire import manifest as mf
from . import logs
from . import records as rec
from .admission import Admission
from .compactor import Compactor
from .datadir import DataDirLock, Reserve, fs_free_bytes
from .index import Chunk, Holder, Namespace, Session, Tombstone
from .maintenance import Maintenance
from .namespaces import Namespaces
from .orphans import Orphans
from .publishing import Publishing
from .reads import Reads
from .replay import replay
from .segment_log import Damage, Location, SegmentLog, segment_bytes_for
from .stats import namespace_list, namespace_stats, store_stats
from .tiering import Tiering
from .writes import Writes

RegionHook = Callable[[str, Region], int]  # (namespace, region) -> rkey


ReleaseHook = Callable[[str, Region], None]

DEFAULT_HIGH_WATERMARK = 0.9
SAVE_HOLD_S = 60.0  # chunks of an uncommitted save stay this long after its last put
RESTORE_HOLD_S = 30.0  # a restore's lookup keeps its version this long at most
REGION_GRACE_S = 2.0  # an empty region is unregistered this long after it emptied
MAX_NAMESPACES = 65_536  # namespaces that hold something at once (one that is only read is never made)


SAVES_BY_TRANSPORT = {"tcp": "saves_tcp", "rdma": "saves_rdma"}  # commit_manifest's counter per transport


class Engine(Namespaces, Tiering, Admission, Reads, Writes, Publishing):
    def __init__(
        self,
        data_dir: str | Path,
        capacity: int,
        *,
        fsync: str = "manifest",
        disk_capacity: int | None = None,
        high_watermark: float = DEFAULT_HIGH_WATERMARK,
        quotas: dict[str, int] | None = None,
        region_bytes: int = 64 << 20,
        span_bytes: int = 1 << 20,
        segment_bytes: int | None = None,
        compact_threshold: float = 0.5,
        region_hook: RegionHook | None = None,
        release_hook: ReleaseHook | None = None,
        log: Callable[[str], None] | None = None,
        max_namespaces: int = MAX_NAMESPACES,
    ) -> None:
        if not 0.1 <= high_watermark <= 1.0:
            raise ValueError("high watermark must be between 0.1 and 1.0")
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.promote_lock = threading.Lock()
        self.capacity = capacity
        self.budget = CapacityBudget(capacity)
        self.disk_capacity = disk_capacity or 4 * capacity
        self.high_watermark = high_watermark
        self.quotas = dict(quotas or {})
        self.region_bytes = region_bytes
        self.span_bytes = span_bytes
        self.region_hook = region_hook
        self.release_hook = release_hook
        self.say = log or logs.say
        self.damage: list[Damage] = []
        # segments follow the disk budget, or the filesystem when it is the smaller of the two
        room = min(self.disk_capacity, fs_free_bytes(self.dir) + sum(p.stat().st_size for p in self.dir.glob("seg-*")))
        self.log = SegmentLog(
            self.dir, fsync=fsync, segment_bytes=segment_bytes or segment_bytes_for(room), on_damage=self._on_damage
        )
        self.reserve = Reserve(self.dir, self.log.segment_bytes)
        self.dir_lock = DataDirLock(self.dir)
        self.namespaces: dict[str, Namespace] = {}
        self.max_namespaces = max_namespaces
        self._no_slab = Slab(CapacityBudget(1), region_bytes=region_bytes, span_bytes=span_bytes)  # never allocates
        self.mem_lru: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self.disk_lru: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self.orphans = Orphans()  # chunks no session names, kept as cache: least recently used first
        self.seg_live: Counter[int] = Counter()
        self.disk_live = 0
        self.fs_free = 1 << 62
        self.seq = 0
        self.holders: set[Holder] = set()
        self.local = self.new_holder()  # for in-process callers that pass none
        self.reserved_slots = 0  # slots of saves whose bytes are being written by RDMA
        self.inflight = 0  # slab bytes reserved by saves in flight (admission), not yet allocated
        self.on_room: Callable[[], None] | None = None  # memory may have come free: parked saves retry
        self.published: dict = {}  # namespace -> PublishedIndex, once a client connects by RDMA
        self.replay_stats: dict[str, float] = {}
        self.max_missing = 1 << 20  # keys a commit reports missing at once (the server fits it to a frame)
        self.compactor = Compactor(self, compact_threshold)
        self.maintenance = Maintenance(self)
        self._open = False

    # -- lifecycle -------------------------------------------------------------------------
    def open(self, *, background: bool = True) -> None:
        t0 = time.perf_counter()
        self.dir_lock.acquire()
        try:
            self.fs_free = fs_free_bytes(self.dir)
            with self.lock:
                replay(self)
                self.log.open_for_append()
            if not self.reserve.refill():
                self.say(f"rdmakv: warning: no room for the {self.reserve.size}-byte reserve in {self.dir}")
            self.fs_free = fs_free_bytes(self.dir)
            if self.fs_free + self.log.disk_bytes() < self.disk_capacity:
                self.say(
                    f"rdmakv: warning: the filesystem under {self.dir} has room for "
                    f"{(self.fs_free + self.log.disk_bytes()) >> 20} MiB, less than --disk-capacity "
                    f"{self.disk_capacity >> 20} MiB; the store evicts before it fills"
                )
        except BaseException:
            self.dir_lock.release()
            raise
        self.replay_stats["replay_s"] = time.perf_counter() - t0
        self._open = True
        if background:
            self.compactor.start()
            self.maintenance.start()

    def close(self) -> None:
        self.maintenance.stop()
        self.compactor.stop()
        with self.lock:
            self.log.close()
            self._open = False
        self.dir_lock.release()

    def _on_damage(self, d: Damage) -> None:
        self.damage.append(d)
        self.say(f"rdmakv: log damage: {d}")

    def new_holder(self) -> Holder:
        h = Holder()
        with self.lock:
            self.holders.add(h)
        return h

    def release_holder(self, h: Holder) -> None:
        """A connection is gone: let go of everything it held."""
        with self.lock:
            self._drop_restore_hold(h)
            for (ns_name, key) in list(h.pending):
                self._drop_pending(h, ns_name, key)
            self._end_reservation(h)
            self.holders.discard(h)
            self._room_freed()

    def _drop_restore_hold(self, h: Holder) -> None:
        if h.restore is not None:
            ns, s = h.restore
            h.restore = None
            self._unhold_session(ns, s)
        batch, h.batch = h.batch, []
        for ns, s in batch:
            self._unhold_session(ns, s)

    def _drop_pending(self, h: Holder, ns_name: str, key: int) -> None:
        h.pending.pop((ns_name, key), None)
        ns = self.namespaces[ns_name]
        c = ns.chunks.get(key)
        if c is not None:
            if c.refs == 0 and c.holds == 1:
                ns.counters["orphans_dropped"] += 1
            self._unhold(ns, c)

    # -- accounting of live log records --------------------------------------------------
    def _live(self, ns: Namespace, loc: Location) -> None:
        self.seg_live[loc.segment] += loc.size
        self.disk_live += loc.size
        ns.disk_live += loc.size

    def _dead(self, ns: Namespace, loc: Location) -> None:
        self.seg_live[loc.segment] -= loc.size
        self.disk_live -= loc.size
        ns.disk_live -= loc.size

    def _append_small(self, rtype: int, parts: list) -> tuple[Location, int]:
        """Append a small record that must get through on a full disk (tombstones, pins):
        on ENOSPC the reserve is given up and the append tried once more."""
        try:
            return self.log.append(rtype, parts)
        except DiskFullError:
            if not self.reserve.give_up():
                raise
            self.say("rdmakv: disk full: gave up the reserve so that a delete or pin goes through")
            return self.log.append(rtype, parts)

    def _tombstone(self, ns: Namespace, name: str) -> int:
        self.seq += 1
        loc, lsn = self._append_small(rec.REC_DELETE, rec.delete_parts(ns.name, name, self.seq))
        old = ns.tombstones.pop(name, None)
        if old is not None:
            self._dead(ns, old.loc)
        ns.tombstones[name] = Tombstone(self.seq, loc)
        ns.last_seq[name] = self.seq
        self._live(ns, loc)
        return lsn

    # -- chunks ----------------------------------------------------------------------------
    def exists(self, ns_name: str, keys: np.ndarray) -> np.ndarray:
        with self.lock:
            chunks = self.existing(ns_name).chunks
            return np.fromiter((k in chunks for k in keys.tolist()), dtype=bool, count=len(keys))

    def put_chunks(
        self, ns_name: str, items: Sequence[tuple[int, memoryview]], holder: Holder | None = None
    ) -> tuple[int, int]:
        """Store chunks (each checked against its key) and hold them for this caller's next
        commit; returns (stored, already present)."""
        holder = holder or self.local
        checks: dict[Key, Check] = {}  # opaque keys: the store's own check of the bytes, kept beside the key
        for key, data in items:
            if is_opaque(key_alg(key)):
                checks[key] = check_of(key, data)  # type: ignore[assignment]
            elif not matches(key, data):
                raise IntegrityError(f"chunk {key_hex(key)}: bytes do not hash to the key")
        now = time.monotonic()
        with self.lock:
            ns = self.namespace(ns_name)
            ns.counters["chunks_received"] += len(items)
            new: dict[int, memoryview] = {}
            existed = 0
            for key, data in items:
                c = ns.chunks.get(key)
                if c is not None:
                    existed += 1
                    self._hold_pending(holder, ns, c, now)
                elif key not in new:
                    new[key] = data
            if not new:
                ns.counters["chunks_deduped"] += existed
                return 0, existed
            lengths = [memoryview(d).nbytes for d in new.values()]
            self._disk_room(ns, sum(lengths) + 64 * len(lengths))
            slots = self._alloc_run(ns, lengths, holder=holder)
            self._consume_reservation(holder, sum(s.size for s in slots))
            views = [ns.slab.view(s) for s in slots]
        placed: list[tuple[int, Location]] = []
        try:
            self._make_disk_room(sum(lengths) + 64 * len(lengths))
            for data, view in zip(new.values(), views):
                view[:] = data
            # one writev per run of records, from the slab copies (the frame's buffer can go)
            records = [rec.chunk_parts(ns_name, key, view, checks.get(key)) for key, view in zip(new, views)]
            placed = list(zip(new, self.log.append_many(rec.REC_CHUNK, records)))
            records.clear()
        except BaseException:
            with self.lock:  # records already appended were never live: garbage for the compactor
                for s in slots:
                    ns.slab.free(s)
            raise
        finally:
            views.clear()
        return self._adopt_placed(ns, placed, slots, holder, existed, now, checks)

    def _adopt_placed(
        self, ns: Namespace, placed: list[tuple[Key, Location]], slots: list, holder: Holder, existed: int,
        now: float, checks: dict[Key, Check] | None = None,
    ) -> tuple[int, int]:  # fmt: skip
        """Make chunks whose bytes sit in ``slots`` and whose records are in the log live, held
        for this caller's commit; returns (stored, already present)."""
        stored = 0
        with self.lock:
            for (key, loc), slot in zip(placed, slots):
                if key in ns.chunks:  # a concurrent put of the same chunk won
                    ns.slab.free(slot)
                    existed += 1
                    self._hold_pending(holder, ns, ns.chunks[key], now)
                    continue
                c = ns.chunks[key] = Chunk(key, slot.length, loc, slot, check=checks.get(key) if checks else None)
                self._live(ns, loc)
                self._hold_pending(holder, ns, c, now)
                stored += 1
            ns.counters["chunks_stored"] += stored
            ns.counters["chunks_deduped"] += existed
        return stored, existed

    def _hold_pending(self, holder: Holder, ns: Namespace, c: Chunk, now: float) -> None:
        ident = (ns.name, c.key)
        if ident not in holder.pending:
            c.holds += 1
        holder.pending[ident] = now

    # -- manifests -------------------------------------------------------------------------
    def commit_manifest(
        self,
        ns_name: str,
        name: str,
        data: bytes,
        holder: Holder | None = None,
        *,
        pin: bool = False,
        ttl: float = 0.0,
        transport: str = "tcp",
    ) -> np.ndarray:
        """Commit if every chunk is present; else return the missing keys (nothing changes).
        ``transport``: how the save's missing chunks came ("rdma": WRITTEN), for the counters."""
        saved_by = SAVES_BY_TRANSPORT[transport]
        holder = holder or self.local
        m = mf.decode(data)  # raises ManifestError
        unique_arr, unique_lengths = mf.distinct_keys(m)
        unique = unique_arr.tolist()
        data = bytes(data)
        now = time.time()
        with self.lock:
            ns = self.namespace(ns_name)
            chunks = ns.chunks
            missing = [(k, n) for k, n in zip(unique, unique_lengths) if k not in chunks]
            if missing:
                self._admit(ns, holder, [n for _, n in missing])  # room for all of them, or wait
                return keys_array([k for k, _ in missing[: self.max_missing]], m.hash_alg)
            for k, length in zip(unique, unique_lengths):
                if chunks[k].length != length:
                    raise ManifestError(
                        f"manifest says chunk {key_hex(k)} has {length} bytes; the stored chunk has "
                        f"{chunks[k].length}"
                    )
            self._disk_room(ns, len(data) + 128)
            self._make_room(ns, len(data), hard=True, holder=holder)
            for k in unique:
                chunks[k].holds += 1  # nothing may free them before the install below
            self.seq += 1
            seq = self.seq
        expires = now + ttl if ttl > 0 else 0.0
        try:
            self._make_disk_room(len(data) + 128)
            parts = rec.manifest_parts(
                ns_name, name, seq, data, pinned=pin, expires_ms=int(expires * 1000), committed_ms=int(now * 1000)
            )
            loc, lsn = self.log.append(rec.REC_MANIFEST, parts)
            if self.log.fsync_policy == "manifest":
                self.log.sync_to(lsn)
        except BaseException:
            with self.lock:
                for k in unique:
                    self._unhold(ns, chunks[k])
            raise
        with self.lock:
            ns.disk_records[name] += 1
            s = Session(ns_name, name, seq, loc, m.n_chunks, unique_arr, m.total_bytes, len(data), now, expires, pin)
            self._install(ns, s, data)
            for k in unique:
                self._unhold(ns, chunks[k])
                if (ns_name, k) in holder.pending:
                    self._drop_pending(holder, ns_name, k)
            ns.counters["manifests_committed"] += 1
            ns.counters[saved_by] += 1
            ns.counters["chunks_referenced"] += len(unique)  # with chunks_stored: the dedup ratio
            self._end_reservation(holder)
            self._room_freed()  # its chunks are a committed session now: demotable
        return np.zeros(0, dtype=np.uint64)

    def _install(self, ns: Namespace, s: Session, data: bytes | None) -> None:
        """Make ``s`` the visible version of its name, unless a newer one got there first."""
        if s.seq <= ns.last_seq.get(s.name, 0):
            return  # superseded before it was installed: its record is garbage already
        ns.last_seq[s.name] = s.seq
        old = ns.sessions.get(s.name)
        ns.sessions[s.name] = s
        self._live(ns, s.loc)
        tomb = ns.tombstones.pop(s.name, None)
        if tomb is not None:
            self._dead(ns, tomb.loc)  # a newer manifest outranks it on replay
        for k in s.unique_keys():
            c = ns.chunks[k]
            c.refs += 1
            if c.orphan:
                self._unorphan(ns, c)
                ns.counters["orphans_reused"] += 1
        if data is not None:
            self._charge_manifest(ns, s, data)
            self._claim(ns, s)
            s.complete = all(ns.chunks[k].slot is not None for k in s.unique_keys())
        self._list(s)
        if old is not None:
            old.replaced = True  # its chunks that no other session names stay, as cache
            self._retire(ns, old)

    def delete_manifest(self, ns_name: str, name: str) -> None:
        with self.lock:
            ns = self.existing(ns_name)
            s = self._lookup(ns, name)
            lsn = self._tombstone(ns, name)
            del ns.sessions[name]
            self._retire(ns, s)
            self._free_orphans_of(ns, name)
            ns.counters["deletes"] += 1
            self._room_freed()
        self.log.sync_to(lsn)
        self.compactor.wake()

    def set_pin(self, ns_name: str, name: str, pinned: bool) -> None:
        with self.lock:
            ns = self.existing(ns_name)
            s = self._lookup(ns, name)
            self.seq += 1
            loc, lsn = self._append_small(rec.REC_PIN, rec.pin_parts(ns_name, name, self.seq, s.seq, pinned))
            if s.pin_loc is not None:
                self._dead(ns, s.pin_loc)
            s.pin_loc = loc
            self._live(ns, loc)
            self._unlist(s)
            s.pinned = pinned
            self._list(s)
        self.log.sync_to(lsn)

    def list(self, ns_name: str, prefix: str = "", after: str = "", limit: int | None = None) -> list[dict]:
        with self.lock:
            return namespace_list(self.existing(ns_name), prefix, after, limit)

    def store_stats(self) -> dict:
        with self.lock:
            return store_stats(self)

    def stats(self, ns_name: str) -> dict:
        with self.lock:
            return namespace_stats(self, self.existing(ns_name))

    def all_stats(self, limit: int) -> list[dict]:
        """Every namespace's figures, the ``limit`` largest by memory used (admin STATS, `rdmakv top`)."""
        with self.lock:
            spaces = sorted(self.namespaces.values(), key=lambda ns: -ns.used)[:limit]
            return [namespace_stats(self, ns) for ns in spaces]


    def compact(self) -> dict:
        """A full compaction pass, the open segment included (``rdmakv compact``)."""
        return self.compactor.full_pass()

    def maintain(self) -> None:
        """One round of background work (tests call it directly instead of waiting)."""
        self.maintenance.run_once()
