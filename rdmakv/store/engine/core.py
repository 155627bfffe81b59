"""The store itself, without sockets: namespaces, chunk index, two tiers, durable log.

Semantics (docs/data-model.md §2, §4): chunks are immutable and content-addressed; sessions (manifests)
are name-addressed and replaced atomically; a manifest is visible only when every chunk it
names is present. The memory tier (slab) caches the disk tier (log); ``tiering`` decides what
leaves which. ``index`` says which counts keep bytes alive.

Locking: one engine lock around the index. It is never held across an fsync (commits share
one through the log's group commit), a bulk copy of chunk bytes, or a log read: the work that
needs bytes to stay put takes holds under the lock, does the copy without it, and lets go.
"""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slab import CapacityBudget, Slot

from ...errors import DiskFullError, ManifestError
from ...hashing import Key, key_hex, keys_array
from ...wire import manifest as mf
from ...wire.batches import Found
from ...wire.lookup_index import INDEX_ENTRIES
from ...wire.messages import Locations
from .. import logs
from . import records as rec
from .compactor import Compactor
from .datadir import DataDirLock, Reserve, fs_free_bytes
from .index import Holder, Namespace, Session, Tombstone
from .live_bytes import LiveBytes
from .maintenance import Maintenance
from .namespaces import NamespaceTable, RegionHook, ReleaseHook
from .orphans import Orphans
from .promotion import Promotion
from .published import PublishedIndex
from .publishing import Publisher
from .reads import ChunkViews, Reads
from .replay import replay
from .segment_log import Damage, Location, SegmentLog, segment_bytes_for
from .stats import namespace_list, namespace_stats, store_stats
from .tiering import Tiers
from .writes import Writes

DEFAULT_HIGH_WATERMARK = 0.9
SAVE_HOLD_S = 60.0  # chunks of an uncommitted save stay this long after its last put
RESTORE_HOLD_S = 30.0  # a restore's lookup keeps its version this long at most
REGION_GRACE_S = 2.0  # an empty region is unregistered this long after it emptied
MAX_NAMESPACES = 65_536  # namespaces that hold something at once (one that is only read is never made)


SAVES_BY_TRANSPORT = {"tcp": "saves_tcp", "rdma": "saves_rdma"}  # commit_manifest's counter per transport


class Engine:
    """The store: composes its parts (below) and holds the one lock they share. Its own are the
    commit of a manifest and what changes a name (delete, pin), the holders, and the lifecycle."""

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
        self.capacity = capacity
        self.budget = CapacityBudget(capacity)
        self.disk_capacity = disk_capacity or 4 * capacity
        self.quotas = dict(quotas or {})
        self.say = log or logs.say
        self.damage: list[Damage] = []
        # segments follow the disk budget, or the filesystem when it is the smaller of the two
        room = min(self.disk_capacity, fs_free_bytes(self.dir) + sum(p.stat().st_size for p in self.dir.glob("seg-*")))
        self.log = SegmentLog(
            self.dir, fsync=fsync, segment_bytes=segment_bytes or segment_bytes_for(room), on_damage=self._on_damage
        )
        self.reserve = Reserve(self.dir, self.log.segment_bytes)
        self.dir_lock = DataDirLock(self.dir)
        self.publisher = Publisher(lambda ns, keys: self.reads.located(ns, keys))
        self.spaces = NamespaceTable(self.budget, region_bytes=region_bytes, span_bytes=span_bytes, quotas=self.quotas,
                                     max_namespaces=max_namespaces, exported=self.publisher.exports)  # fmt: skip
        self.spaces.set_region_hook(region_hook, release_hook)
        self.namespaces = self.spaces.by_name  # the table's own dict: name -> Namespace
        self.orphans = Orphans()  # chunks no session names, kept as cache: least recently used first
        self.live = LiveBytes()
        self.seq = 0
        self.holders: set[Holder] = set()
        self.local = self.new_holder()  # for in-process callers that pass none
        self.replay_stats: dict[str, float] = {}
        self.max_missing = 1 << 20  # keys a commit reports missing at once (the server fits it to a frame)
        self.compactor = Compactor(self, compact_threshold)
        self.tiers = Tiers(lock=self.lock, spaces=self.spaces, budget=self.budget, capacity=capacity,
                           disk_capacity=self.disk_capacity, high_watermark=high_watermark, quotas=self.quotas,
                           log=self.log, reserve=self.reserve, live=self.live, orphans=self.orphans,
                           publisher=self.publisher, holders=self.holders, directory=self.dir,
                           compaction=self.compactor, tombstone=self.tombstone)  # fmt: skip
        self.admission = self.tiers.admission  # reservations of saves in flight
        self.promotion = Promotion(self.lock, self.tiers, self.log)
        self.reads = Reads(self.lock, self.spaces, self.tiers, self.promotion, self.orphans, self.log)
        self.writes = Writes(self.lock, self.spaces, self.tiers, self.admission, self.log, self.live)
        self.maintenance = Maintenance(self.upkeep, lambda line: self.say(line))
        self._open = False

    # -- lifecycle -------------------------------------------------------------------------
    def open(self, *, background: bool = True) -> None:
        t0 = time.perf_counter()
        self.dir_lock.acquire()
        try:
            self.tiers.fs_free = fs_free_bytes(self.dir)
            with self.lock:
                replayed = replay(self)
                self.seq = replayed.seq
                self.replay_stats.update(replayed.stats)
                self.log.open_for_append()
            if not self.reserve.refill():
                self.say(f"rdmakv: warning: no room for the {self.reserve.size}-byte reserve in {self.dir}")
            fs_free = self.tiers.fs_free = fs_free_bytes(self.dir)
            if fs_free + self.log.disk_bytes() < self.disk_capacity:
                self.say(
                    f"rdmakv: warning: the filesystem under {self.dir} has room for "
                    f"{(fs_free + self.log.disk_bytes()) >> 20} MiB, less than --disk-capacity "
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
            self.reads.drop_restore_hold(h)
            for (ns_name, key) in list(h.pending):
                self.tiers.drop_pending(h, ns_name, key)
            self.admission.end(h)
            self.holders.discard(h)
            self.admission.room_freed()

    # -- the log ---------------------------------------------------------------------------
    def _append_small(self, rtype: int, parts: list[bytes | memoryview]) -> tuple[Location, int]:
        """Append a small record that must get through on a full disk (tombstones, pins):
        on ENOSPC the reserve is given up and the append tried once more."""
        try:
            return self.log.append(rtype, parts)
        except DiskFullError:
            if not self.reserve.give_up():
                raise
            self.say("rdmakv: disk full: gave up the reserve so that a delete or pin goes through")
            return self.log.append(rtype, parts)

    def tombstone(self, ns: Namespace, name: str) -> int:
        """Log that ``name`` is gone (a delete, or an eviction) and forget its older records."""
        self.seq += 1
        loc, lsn = self._append_small(rec.REC_DELETE, rec.delete_parts(ns.name, name, self.seq))
        old = ns.tombstones.pop(name, None)
        if old is not None:
            self.live.dead(ns, old.loc)
        ns.tombstones[name] = Tombstone(self.seq, loc)
        ns.last_seq[name] = self.seq
        self.live.live(ns, loc)
        return lsn

    # -- chunks ----------------------------------------------------------------------------
    def exists(self, ns_name: str, keys: np.ndarray) -> np.ndarray:
        with self.lock:
            chunks = self.existing(ns_name).chunks
            return np.fromiter((k in chunks for k in keys.tolist()), dtype=bool, count=len(keys))

    # -- the parts' public faces (callers hold an Engine; the parts stay behind it) -----------
    def put_chunks(self, ns_name: str, items: Sequence[tuple[Key, memoryview]],
                   holder: Holder | None = None) -> tuple[int, int]:  # fmt: skip
        return self.writes.put_chunks(ns_name, items, holder or self.local)

    def reserve_run(self, ns_name: str, lengths: list[int],
                    holder: Holder | None = None) -> tuple[list[Slot], list[int]]:  # fmt: skip
        return self.writes.reserve_run(ns_name, lengths, holder)

    def cancel_run(self, ns_name: str, slots: list[Slot]) -> None:
        self.writes.cancel_run(ns_name, slots)

    def install_written(self, ns_name: str, keys: list[Key], slots: list[Slot],
                        holder: Holder | None = None) -> tuple[int, int]:  # fmt: skip
        return self.writes.install_written(ns_name, keys, slots, holder or self.local)

    def get_manifest(self, ns_name: str, name: str, want_locations: bool = False,
                     holder: Holder | None = None) -> tuple[bytes, bytes | None, str]:  # fmt: skip
        return self.reads.get_manifest(ns_name, name, want_locations, holder or self.local)

    def get_manifests(self, ns_name: str, names: Sequence[str], want_locations: bool, holder: Holder | None,
                      max_bytes: int) -> tuple[list[Found], np.ndarray | None]:  # fmt: skip
        return self.reads.get_manifests(ns_name, names, want_locations, holder or self.local, max_bytes)

    def has_manifests(self, ns_name: str, names: Sequence[str]) -> np.ndarray:
        return self.reads.has_manifests(ns_name, names)

    def peek_manifest(self, ns_name: str, name: str) -> bytes:
        return self.reads.peek_manifest(ns_name, name)

    def read_chunks_into(self, ns_name: str, keys: Sequence[int],
                         out: bytearray) -> tuple[bytearray, list[memoryview | None]]:  # fmt: skip
        return self.reads.read_chunks_into(ns_name, keys, out)

    def chunk_views(self, ns_name: str, keys: Sequence[Key], max_bytes: int) -> ChunkViews:
        return self.reads.chunk_views(ns_name, keys, max_bytes)

    def locate(self, ns_name: str, keys: np.ndarray) -> Locations:
        return self.reads.locate(ns_name, keys)

    def mem_used(self) -> int:
        return self.tiers.mem_used()

    def pending_chunks(self) -> int:
        return self.tiers.pending_chunks()

    def fs_room(self) -> int:
        return self.tiers.fs_room()

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
                self.admission.admit(ns, holder, [n for _, n in missing])  # room for all of them, or wait
                return keys_array([k for k, _ in missing[: self.max_missing]], m.hash_alg)
            for k, length in zip(unique, unique_lengths):
                if chunks[k].length != length:
                    raise ManifestError(
                        f"manifest says chunk {key_hex(k)} has {length} bytes; the stored chunk has "
                        f"{chunks[k].length}"
                    )
            self.tiers.disk_room(ns, len(data) + 128)
            self.tiers.make_room(ns, len(data), hard=True, holder=holder)
            for k in unique:
                chunks[k].holds += 1  # nothing may free them before the install below
            self.seq += 1
            seq = self.seq
        expires = now + ttl if ttl > 0 else 0.0
        try:
            self.tiers.make_disk_room(len(data) + 128)
            parts = rec.manifest_parts(
                ns_name, name, seq, data, pinned=pin, expires_ms=int(expires * 1000), committed_ms=int(now * 1000)
            )
            loc, lsn = self.log.append(rec.REC_MANIFEST, parts)
            if self.log.fsync_policy == "manifest":
                self.log.sync_to(lsn)
        except BaseException:
            with self.lock:
                for k in unique:
                    self.tiers.unhold(ns, chunks[k])
            raise
        with self.lock:
            ns.disk_records[name] += 1
            s = Session(ns_name, name, seq, loc, m.n_chunks, unique_arr, m.total_bytes, len(data), now, expires, pin)
            self.install(ns, s, data)
            for k in unique:
                self.tiers.unhold(ns, chunks[k])
                if (ns_name, k) in holder.pending:
                    self.tiers.drop_pending(holder, ns_name, k)
            ns.counters["manifests_committed"] += 1
            ns.counters[saved_by] += 1
            ns.counters["chunks_referenced"] += len(unique)  # with chunks_stored: the dedup ratio
            self.admission.end(holder)
            self.admission.room_freed()  # its chunks are a committed session now: demotable
        return np.zeros(0, dtype=np.uint64)

    def install(self, ns: Namespace, s: Session, data: bytes | None) -> None:
        """Make ``s`` the visible version of its name, unless a newer one got there first (a commit,
        or replay)."""
        if s.seq <= ns.last_seq.get(s.name, 0):
            return  # superseded before it was installed: its record is garbage already
        ns.last_seq[s.name] = s.seq
        old = ns.sessions.get(s.name)
        ns.sessions[s.name] = s
        self.live.live(ns, s.loc)
        tomb = ns.tombstones.pop(s.name, None)
        if tomb is not None:
            self.live.dead(ns, tomb.loc)  # a newer manifest outranks it on replay
        for k in s.unique_keys():
            c = ns.chunks[k]
            c.refs += 1
            if c.orphan:
                self.tiers.unorphan(ns, c)
                ns.counters["orphans_reused"] += 1
        if data is not None:
            self.tiers.charge_manifest(ns, s, data)
            self.tiers.claim(ns, s)
            s.complete = all(ns.chunks[k].slot is not None for k in s.unique_keys())
        self.tiers.lru_add(s)
        if old is not None:
            old.replaced = True  # its chunks that no other session names stay, as cache
            self.tiers.retire(ns, old)

    def delete_manifest(self, ns_name: str, name: str) -> None:
        with self.lock:
            ns = self.existing(ns_name)
            s = self.reads.lookup(ns, name)
            lsn = self.tombstone(ns, name)
            del ns.sessions[name]
            self.tiers.retire(ns, s)
            self.tiers.free_orphans_of(ns, name)
            ns.counters["deletes"] += 1
            self.admission.room_freed()
        self.log.sync_to(lsn)
        self.compactor.wake()

    def set_pin(self, ns_name: str, name: str, pinned: bool) -> None:
        with self.lock:
            ns = self.existing(ns_name)
            s = self.reads.lookup(ns, name)
            self.seq += 1
            loc, lsn = self._append_small(rec.REC_PIN, rec.pin_parts(ns_name, name, self.seq, s.seq, pinned))
            if s.pin_loc is not None:
                self.live.dead(ns, s.pin_loc)
            s.pin_loc = loc
            self.live.live(ns, loc)
            self.tiers.lru_remove(s)
            s.pinned = pinned
            self.tiers.lru_add(s)
        self.log.sync_to(lsn)

    def list(self, ns_name: str, prefix: str = "", after: str = "", limit: int | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return namespace_list(self.existing(ns_name), prefix, after, limit)

    def store_stats(self) -> dict[str, Any]:
        with self.lock:
            return store_stats(self)

    def stats(self, ns_name: str) -> dict[str, Any]:
        with self.lock:
            return namespace_stats(self.existing(ns_name))

    def all_stats(self, limit: int) -> builtins.list[dict[str, Any]]:  # (list: the method above)
        """Every namespace's figures, the ``limit`` largest by memory used (admin STATS, `rdmakv top`)."""
        with self.lock:
            spaces = sorted(self.namespaces.values(), key=lambda ns: -ns.used)[:limit]
            return [namespace_stats(ns) for ns in spaces]


    # -- namespaces ------------------------------------------------------------------------
    def set_region_hook(self, hook: RegionHook | None, release: ReleaseHook | None = None) -> None:
        """Install the RDMA registration hooks and register regions that already exist."""
        with self.lock:
            self.spaces.set_region_hook(hook, release)

    def existing(self, name: str) -> Namespace:
        """The namespace to read (an empty stand-in, not kept, when it holds nothing)."""
        return self.spaces.existing(name)

    def namespace(self, name: str, *, replaying: bool = False) -> Namespace:
        """The namespace to write to, made on its first write. Under the engine lock."""
        return self.spaces.writable(name, replaying=replaying)

    # -- the one-sided index -----------------------------------------------------------------
    def published_index(self, ns_name: str, entries: int = INDEX_ENTRIES) -> PublishedIndex:
        with self.lock:
            return self.publisher.index(ns_name, entries)

    def publish(self, ns_name: str, name: str) -> bool:
        """Point the namespace's index at ``name``'s current version (see Publisher.publish)."""
        with self.lock:
            ns = self.namespaces.get(ns_name)
            return ns is not None and self.publisher.publish(ns, ns.sessions.get(name))

    def upkeep(self) -> None:
        """One round of background work (Maintenance runs it every second; tests call it)."""
        now = time.monotonic()
        tiers = self.tiers
        tiers.refresh_fs_free()
        with self.lock:
            tiers.expire_due()
            self.admission.expire_stalled(now, self.local)
            for h in list(self.holders):
                if (h.restore is not None or h.batch) and now - h.restore_at > RESTORE_HOLD_S:
                    self.reads.drop_restore_hold(h)
                for (ns_name, key), at in list(h.pending.items()):
                    if now - at > SAVE_HOLD_S:
                        tiers.drop_pending(h, ns_name, key)
            tiers.release_regions(now - REGION_GRACE_S)
            tiers.relieve_pressure()
            garbage = self.log.disk_bytes() - self.live.total
        if garbage > self.log.segment_bytes // 2:
            self.compactor.wake()
        if self.reserve.held < self.reserve.size:
            self.reserve.refill()

    def compact(self) -> dict[str, Any]:
        """A full compaction pass, the open segment included (``rdmakv compact``)."""
        return self.compactor.full_pass()
