"""The namespaces (tenants) and their slab regions: a part of the engine that owns the table of
namespaces (the engine calls it under its lock).

A namespace is made by its first write and holds its own sessions, chunk index, slab regions
(registered for RDMA through the region hooks) and counters. One that is only read costs nothing:
reads get an empty stand-in that is not kept. At most ``max_namespaces`` exist; those left empty
are forgotten first.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from slab import CapacityBudget, Region, Slab

from ...errors import StoreFullError
from .index import Namespace

RegionHook = Callable[[str, Region], int]  # (namespace, region) -> rkey
ReleaseHook = Callable[[str, Region], None]


class NamespaceTable:
    def __init__(self, budget: CapacityBudget, *, region_bytes: int, span_bytes: int, quotas: dict[str, int],
                 max_namespaces: int, exported: Callable[[str], bool]) -> None:  # fmt: skip
        self.by_name: dict[str, Namespace] = {}
        self.budget = budget
        self.region_bytes = region_bytes
        self.span_bytes = span_bytes
        self.quotas = quotas
        self.max_namespaces = max_namespaces
        self.exported = exported  # whether a namespace has a published index (it is not empty then)
        self.region_hook: RegionHook | None = None
        self.release_hook: ReleaseHook | None = None
        self._no_slab = Slab(CapacityBudget(1), region_bytes=region_bytes, span_bytes=span_bytes)  # never allocates

    def set_region_hook(self, hook: RegionHook | None, release: ReleaseHook | None = None) -> None:
        """Install the RDMA registration hooks and register regions that already exist."""
        self.region_hook = hook
        self.release_hook = release
        if hook is None:
            return
        for ns in self.by_name.values():
            for region in ns.slab.regions.values():
                ns.rkeys[region.id] = hook(ns.name, region)
            ns.region_version += 1

    def existing(self, name: str) -> Namespace:
        """The namespace to read: as stored or, when it holds nothing yet, an empty stand-in that
        is not kept (a namespace that is only read, listed or asked for STATS costs nothing)."""
        ns = self.by_name.get(name)
        return ns if ns is not None else Namespace(name, self._no_slab, self.quotas.get(name))

    def writable(self, name: str, *, replaying: bool = False) -> Namespace:
        """The namespace to write to, made on its first write; at most ``max_namespaces`` (namespaces
        left empty are forgotten first)."""
        ns = self.by_name.get(name)
        if ns is None:
            if len(self.by_name) >= self.max_namespaces and not replaying and not self._forget_empty():
                raise StoreFullError(f"namespace {name!r} cannot be made: the store holds {len(self.by_name)} "
                                     f"namespaces (limit {self.max_namespaces}, --max-namespaces)")  # fmt: skip
            ns = Namespace(name, self._no_slab, self.quotas.get(name))
            ns.slab = Slab(
                self.budget, region_bytes=self.region_bytes, span_bytes=self.span_bytes,
                on_new_region=partial(self._new_region, ns), on_release_region=partial(self._release_region, ns),
            )  # fmt: skip
            self.by_name[name] = ns
        return ns

    def _forget_empty(self) -> int:
        """Drop namespaces that hold nothing any more (no chunk, session, tombstone, manifest
        record on disk, slab region or published index); how many went."""
        gone = [name for name, ns in self.by_name.items()
                if not (ns.chunks or ns.sessions or ns.zombies or ns.tombstones or ns.disk_records or ns.disk_live
                        or ns.slab.regions or self.exported(name))]  # fmt: skip
        for name in gone:
            del self.by_name[name]
        return len(gone)

    def _new_region(self, ns: Namespace, region: Region) -> None:
        if self.region_hook is not None:
            ns.rkeys[region.id] = self.region_hook(ns.name, region)
        ns.region_version += 1

    def _release_region(self, ns: Namespace, region: Region) -> None:
        if self.release_hook is not None and region.id in ns.rkeys:
            self.release_hook(ns.name, region)
        ns.rkeys.pop(region.id, None)
        ns.region_version += 1
