"""Engine mixin: the namespaces (tenants) and their slab regions.

A namespace is made by its first write and holds its own sessions, chunk index, slab regions
(registered for RDMA through the region hooks) and counters. One that is only read costs nothing:
reads get an empty stand-in that is not kept. At most ``max_namespaces`` exist; those left empty
are forgotten first.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from slab import Region, Slab

from ...errors import StoreFullError
from .index import Namespace

if TYPE_CHECKING:
    from .core import Engine, RegionHook, ReleaseHook


# Its methods take ``self: Engine``; mypy accepts an explicit self-type only when it is a supertype
# of the class or a Protocol (python/mypy#7191), so each such def carries ``type: ignore[misc]`` for
# that one check. The bodies are checked against Engine; the ignores go when the parts are composed.
class Namespaces:
    def set_region_hook(self: Engine, hook: RegionHook | None, release: ReleaseHook | None = None) -> None:  # type: ignore[misc]
        """Install the RDMA registration hooks and register regions that already exist."""
        with self.lock:
            self.region_hook = hook
            self.release_hook = release
            if hook is None:
                return
            for ns in self.namespaces.values():
                for region in ns.slab.regions.values():
                    ns.rkeys[region.id] = hook(ns.name, region)
                ns.region_version += 1

    def existing(self: Engine, name: str) -> Namespace:  # type: ignore[misc]
        """The namespace to read: as stored or, when it holds nothing yet, an empty stand-in that
        is not kept (a namespace that is only read, listed or asked for STATS costs nothing)."""
        ns = self.namespaces.get(name)
        return ns if ns is not None else Namespace(name, self._no_slab, self.quotas.get(name))

    def namespace(self: Engine, name: str, *, replaying: bool = False) -> Namespace:  # type: ignore[misc]
        """The namespace to write to, made on its first write; at most ``max_namespaces`` (namespaces
        left empty are forgotten first). Under the engine lock."""
        ns = self.namespaces.get(name)
        if ns is None:
            if len(self.namespaces) >= self.max_namespaces and not replaying and not self._forget_empty_namespaces():
                raise StoreFullError(f"namespace {name!r} cannot be made: the store holds {len(self.namespaces)} "
                                     f"namespaces (limit {self.max_namespaces}, --max-namespaces)")  # fmt: skip
            # its slab's callbacks name the namespace: made without one, given it on the next line
            ns = Namespace(name, None, self.quotas.get(name))  # type: ignore[arg-type]
            ns.slab = Slab(
                self.budget, region_bytes=self.region_bytes, span_bytes=self.span_bytes,
                on_new_region=partial(self._new_region, ns), on_release_region=partial(self._release_region, ns),
            )  # fmt: skip
            self.namespaces[name] = ns
        return ns

    def _forget_empty_namespaces(self: Engine) -> int:  # type: ignore[misc]
        """Drop namespaces that hold nothing any more (no chunk, session, tombstone, manifest
        record on disk, slab region or published index); how many went."""
        gone = [name for name, ns in self.namespaces.items()
                if not (ns.chunks or ns.sessions or ns.zombies or ns.tombstones or ns.disk_records or ns.disk_live
                        or ns.slab.regions or name in self.published)]  # fmt: skip
        for name in gone:
            del self.namespaces[name]
        return len(gone)

    def _new_region(self: Engine, ns: Namespace, region: Region) -> None:  # type: ignore[misc]
        if self.region_hook is not None:
            ns.rkeys[region.id] = self.region_hook(ns.name, region)
        ns.region_version += 1

    def _release_region(self: Engine, ns: Namespace, region: Region) -> None:  # type: ignore[misc]
        if self.release_hook is not None and region.id in ns.rkeys:
            self.release_hook(ns.name, region)
        ns.rkeys.pop(region.id, None)
        ns.region_version += 1
