"""The store itself, without sockets: namespaces, chunk index, slab, durable log.

Semantics (DESIGN §2): chunks are immutable and content-addressed; manifests are
name-addressed and replaced atomically; a manifest is visible only when every
chunk it names is present. Chunks are reference-counted by the manifests that
name them. A chunk no manifest names yet (a save in flight, or one whose client
died) is an *orphan*: it is kept, and evicted oldest-first only when the slab
needs room — acknowledged data is never evicted.

Thread safety: one lock around every call; callers copy chunk bytes out under
it (``read_chunks``) because a slot may be reused as soon as it is released.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slab import CapacityBudget, Region, Slab, SlabFullError, Slot

from ..errors import IntegrityError, ManifestError, NotFoundError, StoreFullError
from ..hashing import chunk_key
from ..wire import manifest as mf
from ..wire.messages import LOCATION_DTYPE, NO_REGION, Locations, make_regions
from .segment_log import (
    REC_CHUNK,
    REC_DELETE,
    REC_MANIFEST,
    SegmentLog,
    chunk_parts,
    delete_parts,
    manifest_parts,
)

RegionHook = Callable[[str, Region], int]  # (namespace, region) -> rkey


@dataclass
class StoredManifest:
    data: bytes
    keys: np.ndarray  # per chunk, manifest order
    unique: list[int]
    total_bytes: int
    committed_at: float
    locations: np.ndarray | None = None  # cached LOCATION_DTYPE rows, manifest order
    encoded_locations: tuple[int, bytes] | None = None  # (regions in the table, Locations bytes)


@dataclass
class Namespace:
    name: str
    slab: Slab
    chunks: dict[int, Slot] = field(default_factory=dict)
    refs: dict[int, int] = field(default_factory=dict)
    orphans: OrderedDict[int, None] = field(default_factory=OrderedDict)
    manifests: dict[str, StoredManifest] = field(default_factory=dict)
    rkeys: dict[int, int] = field(default_factory=dict)  # region id -> rkey
    counters: dict[str, int] = field(
        default_factory=lambda: {
            "bytes_received": 0,
            "bytes_sent": 0,
            "chunks_received": 0,
            "chunks_stored": 0,
            "chunks_deduped": 0,
            "manifests_committed": 0,
            "evicted_orphans": 0,
        }
    )


class Engine:
    def __init__(
        self,
        data_dir: str | Path,
        capacity: int,
        *,
        fsync: str = "manifest",
        region_bytes: int = 64 << 20,
        span_bytes: int = 1 << 20,
        segment_bytes: int = 256 << 20,
        region_hook: RegionHook | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.budget = CapacityBudget(capacity)
        self.region_bytes = region_bytes
        self.span_bytes = span_bytes
        self.region_hook = region_hook
        self.log = SegmentLog(data_dir, fsync=fsync, segment_bytes=segment_bytes)
        self.namespaces: dict[str, Namespace] = {}
        self.replay_stats: dict[str, float] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        t0 = time.perf_counter()
        with self.lock:
            self._replay()
            self.log.open_for_append()
        self.replay_stats["replay_s"] = time.perf_counter() - t0

    def close(self) -> None:
        with self.lock:
            self.log.close()

    def set_region_hook(self, hook: RegionHook | None) -> None:
        """Install the RDMA registration hook and register regions that already exist."""
        with self.lock:
            self.region_hook = hook
            if hook is None:
                return
            for ns in self.namespaces.values():
                for region in ns.slab.regions:
                    ns.rkeys[region.id] = hook(ns.name, region)

    def namespace(self, name: str) -> Namespace:
        ns = self.namespaces.get(name)
        if ns is None:
            ns = Namespace(name, None)  # type: ignore[arg-type]
            ns.slab = Slab(
                self.budget,
                region_bytes=self.region_bytes,
                span_bytes=self.span_bytes,
                on_new_region=lambda region, ns=ns: self._new_region(ns, region),
            )
            self.namespaces[name] = ns
        return ns

    def _new_region(self, ns: Namespace, region: Region) -> None:
        if self.region_hook is not None:
            ns.rkeys[region.id] = self.region_hook(ns.name, region)

    # -- chunks ----------------------------------------------------------------------------
    def exists(self, ns_name: str, keys: np.ndarray) -> np.ndarray:
        with self.lock:
            chunks = self.namespace(ns_name).chunks
            return np.fromiter((k in chunks for k in keys.tolist()), dtype=bool, count=len(keys))

    def put_chunks(self, ns_name: str, items: Sequence[tuple[int, memoryview]]) -> tuple[int, int]:
        """Store chunks after checking each hashes to its key; (stored, already present)."""
        for key, data in items:
            if chunk_key(data) != key:
                raise IntegrityError(f"chunk {key:016x}: bytes do not hash to the key")
        stored = existed = 0
        with self.lock:
            ns = self.namespace(ns_name)
            ns.counters["chunks_received"] += len(items)
            batch = {key for key, _ in items}
            for key, data in items:
                if key in ns.chunks:
                    existed += 1
                    continue
                slot = self._alloc(ns, len(data), batch)
                try:
                    self.log.append(REC_CHUNK, chunk_parts(ns.name, key, data))
                except OSError as e:
                    ns.slab.free(slot)
                    raise StoreFullError(f"cannot append to the log: {e.strerror}") from e
                ns.slab.view(slot)[:] = data
                ns.chunks[key] = slot
                ns.orphans[key] = None
                stored += 1
            ns.counters["chunks_stored"] += stored
            ns.counters["chunks_deduped"] += existed
        return stored, existed

    def _alloc(self, ns: Namespace, length: int, keep: set[int]) -> Slot:
        while True:
            try:
                return ns.slab.alloc(length)
            except SlabFullError:
                victim = next((k for k in ns.orphans if k not in keep), None)
                if victim is None:
                    raise StoreFullError(
                        f"store full: no room for a {length}-byte chunk in namespace "
                        f"{ns.name!r} (capacity {self.budget.capacity} bytes, every stored "
                        f"chunk belongs to a committed manifest)"
                    ) from None
                del ns.orphans[victim]
                ns.slab.free(ns.chunks.pop(victim))
                ns.counters["evicted_orphans"] += 1

    def read_chunks_into(
        self, ns_name: str, keys: Sequence[int], out: bytearray
    ) -> tuple[bytearray, list[memoryview | None]]:
        """Copy chunks into ``out`` and return (buffer, views of it). The caller keeps the buffer
        for the next call, so a large restore does not allocate and fault in fresh memory each
        time; a bigger one replaces it when needed (views of the old one may still be alive)."""
        with self.lock:
            ns = self.namespace(ns_name)
            slots = [ns.chunks.get(k) for k in keys]
            need = sum(s.length for s in slots if s is not None)
            if len(out) < need:
                out = bytearray(max(need, 2 * len(out)))
            view = memoryview(out)
            result: list[memoryview | None] = []
            pos = 0
            for slot in slots:
                if slot is None:
                    result.append(None)
                    continue
                dst = view[pos : pos + slot.length]
                dst[:] = ns.slab.view(slot)
                result.append(dst)
                pos += slot.length
            return out, result

    def locate(self, ns_name: str, keys: np.ndarray) -> Locations:
        with self.lock:
            ns = self.namespace(ns_name)
            return Locations(self._region_table(ns), self._locations(ns, keys))

    def _locations(self, ns: Namespace, keys: np.ndarray) -> np.ndarray:
        out = np.zeros(len(keys), dtype=LOCATION_DTYPE)
        out["region"] = NO_REGION
        for i, k in enumerate(keys.tolist()):
            slot = ns.chunks.get(k)
            if slot is not None:
                out[i] = (slot.region, slot.offset, slot.gen, slot.size)
        return out

    def _region_table(self, ns: Namespace) -> np.ndarray:
        return make_regions(
            [(r.id, r.address, r.length, ns.rkeys.get(r.id, 0)) for r in ns.slab.regions]
        )

    # -- manifests -------------------------------------------------------------------------
    def commit_manifest(self, ns_name: str, name: str, data: bytes) -> np.ndarray:
        """Commit if every chunk is present; else return the missing keys (nothing changes)."""
        m = mf.decode(data)  # raises ManifestError
        unique = np.unique(m.keys)
        with self.lock:
            ns = self.namespace(ns_name)
            chunks = ns.chunks
            missing = [k for k in unique.tolist() if k not in chunks]
            if missing:
                return np.array(missing, dtype=np.uint64)
            for k, length in zip(m.keys.tolist(), m.lengths.tolist()):
                if chunks[k].length != length:
                    raise ManifestError(
                        f"manifest says chunk {k:016x} has {length} bytes; the stored chunk has "
                        f"{chunks[k].length}"
                    )
            self.log.append(REC_MANIFEST, manifest_parts(ns.name, name, data), durable=True)
            self._install(ns, name, bytes(data), m, unique.tolist())
            ns.counters["manifests_committed"] += 1
            return np.zeros(0, dtype=np.uint64)

    def _install(self, ns: Namespace, name: str, data: bytes, m: mf.Manifest, unique: list[int]) -> None:
        for k in unique:
            ns.refs[k] = ns.refs.get(k, 0) + 1
            ns.orphans.pop(k, None)
        sm = StoredManifest(data, m.keys, unique, m.total_bytes, time.time())
        sm.locations = self._locations(ns, m.keys)
        old = ns.manifests.get(name)
        ns.manifests[name] = sm
        if old is not None:
            self._release(ns, old)

    def _release(self, ns: Namespace, sm: StoredManifest) -> None:
        for k in sm.unique:
            n = ns.refs[k] - 1
            if n:
                ns.refs[k] = n
            else:
                del ns.refs[k]
                ns.slab.free(ns.chunks.pop(k))

    def get_manifest(self, ns_name: str, name: str, want_locations: bool = False) -> tuple[bytes, bytes | None]:
        """The manifest, and with ``want_locations`` its encoded chunk locations (cached per
        manifest: this is a restore's hot path)."""
        with self.lock:
            ns = self.namespace(ns_name)
            sm = ns.manifests.get(name)
            if sm is None:
                raise NotFoundError(f"no manifest named {name!r} in namespace {ns_name!r}")
            if not want_locations:
                return sm.data, None
            n_regions = len(ns.slab.regions)  # slots of a live manifest never move; only the table grows
            if sm.encoded_locations is None or sm.encoded_locations[0] != n_regions:
                sm.encoded_locations = (n_regions, Locations(self._region_table(ns), sm.locations).encode())
            return sm.data, sm.encoded_locations[1]

    def delete_manifest(self, ns_name: str, name: str) -> None:
        with self.lock:
            ns = self.namespace(ns_name)
            sm = ns.manifests.get(name)
            if sm is None:
                raise NotFoundError(f"no manifest named {name!r} in namespace {ns_name!r}")
            self.log.append(REC_DELETE, delete_parts(ns.name, name), durable=True)
            del ns.manifests[name]
            self._release(ns, sm)

    def list(self, ns_name: str, prefix: str = "") -> list[dict]:
        with self.lock:
            ns = self.namespace(ns_name)
            return [
                {
                    "name": n,
                    "manifest_bytes": len(sm.data),
                    "chunks": len(sm.keys),
                    "kv_bytes": sm.total_bytes,
                    "committed_at": sm.committed_at,
                }
                for n, sm in sorted(ns.manifests.items())
                if n.startswith(prefix)
            ]

    def stats(self, ns_name: str) -> dict:
        with self.lock:
            ns = self.namespace(ns_name)
            slab = ns.slab.stats()
            return {
                "namespace": ns.name,
                "manifests": len(ns.manifests),
                "manifest_bytes": sum(len(sm.data) for sm in ns.manifests.values()),
                "chunks": len(ns.chunks),
                "chunk_bytes": slab["payload_bytes"],
                "slab_used_bytes": slab["used_bytes"],
                "slab_mapped_bytes": slab["mapped_bytes"],
                "slab_regions": slab["regions"],
                "orphan_chunks": len(ns.orphans),
                "capacity_bytes": self.budget.capacity,
                "capacity_reserved_bytes": self.budget.reserved,
                "log_bytes": self.log.disk_bytes(),
                **ns.counters,
            }

    # -- replay ----------------------------------------------------------------------------
    def _replay(self) -> None:
        """Two passes: find the final manifests, then load only the chunks they name."""
        manifests: dict[tuple[str, str], bytes] = {}
        where: dict[tuple[str, int], tuple[Path, int, int]] = {}
        for rec in self.log.replay():
            if rec.rtype == REC_CHUNK:
                where.setdefault((rec.ns, rec.key), (rec.segment, rec.data_offset, len(rec.body)))
            elif rec.rtype == REC_MANIFEST:
                manifests[(rec.ns, rec.name)] = bytes(rec.body)
            elif rec.rtype == REC_DELETE:
                manifests.pop((rec.ns, rec.name), None)
        decoded: dict[tuple[str, str], mf.Manifest] = {}
        for ident, data in manifests.items():
            try:
                decoded[ident] = mf.decode(data)
            except ManifestError as e:  # checksummed record, so this means a codec change
                raise ManifestError(f"log holds an unreadable manifest {ident}: {e}") from e
        live: dict[str, set[int]] = {}
        for (ns_name, _), m in decoded.items():
            live.setdefault(ns_name, set()).update(m.keys.tolist())
        for ns_name, keys in live.items():
            ns = self.namespace(ns_name)
            absent = [k for k in keys if (ns_name, k) not in where]
            if absent:
                raise ManifestError(f"log is inconsistent: {len(absent)} chunks of namespace {ns_name!r} are missing")
            # reload in log order: the chunks of one save land contiguously again
            todo = sorted(keys, key=lambda k: where[(ns_name, k)][:2])
            for k in todo:
                seg, off, length = where[(ns_name, k)]
                slot = ns.slab.alloc(length)
                ns.slab.view(slot)[:] = self.log.read_at(seg, off, length)
                ns.chunks[k] = slot
        for (ns_name, name), m in sorted(decoded.items(), key=lambda kv: kv[0]):
            ns = self.namespace(ns_name)
            self._install(ns, name, manifests[(ns_name, name)], m, np.unique(m.keys).tolist())
        self.replay_stats.update(
            manifests=float(len(decoded)), chunks=float(sum(len(v) for v in live.values()))
        )
