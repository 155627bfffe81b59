"""The one-sided lookup index kept in step with the sessions (a part of the engine that owns the
namespaces' published indexes; the engine calls it under its lock).

A session is published when it is wholly in memory and its namespace is exported: its manifest
and chunk locations are written as a blob into the slab and the index entry points at it, so a
client looks it up with READs alone. It is unpublished when it leaves memory or the store."""

from __future__ import annotations

from collections.abc import Callable

import xxhash

from slab import SlabFullError

from ...hashing import Key
from ...wire import manifest as mf
from ...wire.lookup_index import INDEX_ENTRIES, enc_blob
from ...wire.messages import Locations
from .index import Namespace, Session
from .published import PublishedIndex


class Publisher:
    def __init__(self, located: Callable[[Namespace, list[Key]], Locations]) -> None:
        self.located = located  # where a namespace's chunks lie in its slab (the engine's index knows)
        self.indexes: dict[str, PublishedIndex] = {}  # namespace -> its index, once a client connects by RDMA

    def index(self, ns_name: str, entries: int = INDEX_ENTRIES) -> PublishedIndex:
        idx = self.indexes.get(ns_name)
        if idx is None:
            idx = self.indexes[ns_name] = PublishedIndex(entries)
        return idx

    def exports(self, ns_name: str) -> bool:
        return ns_name in self.indexes

    def publish(self, ns: Namespace, s: Session | None) -> bool:
        """Point the index at ``s`` (the current version of its name), when it is wholly in memory
        and the namespace is exported; False when it could not be (the lookup then goes over TCP)."""
        idx = self.indexes.get(ns.name)
        if idx is None or s is None or not s.complete or s.data is None or not ns.rkeys:
            return False
        current = idx.slots.get(s.name)
        if current is not None and current[2] is s:
            return True  # the entry names this version already (a restore's TCP lookup asks again)
        loc = self.located(ns, mf.keys_view(s.data).tolist()).encode()
        blob = enc_blob(s.name, s.data, loc)
        try:
            slot = ns.slab.alloc(len(blob))
        except SlabFullError:
            return False
        ns.slab.view(slot)[:] = blob
        rkey = ns.rkeys.get(slot.region)
        if rkey is None:
            ns.slab.free(slot)
            return False
        addr = ns.slab.regions[slot.region].address + slot.offset
        gone = idx.put(s.name, addr, len(blob), rkey, xxhash.xxh3_64_intdigest(blob), slot, s)
        if gone is not None:
            ns.slab.free(gone)
        return gone is not slot

    def unpublish(self, ns: Namespace, s: Session) -> None:
        """``s`` leaves memory or the store: its entry (if it is still ``s``'s) goes."""
        idx = self.indexes.get(ns.name)
        if idx is not None:
            gone = idx.drop(s.name, owner=s)
            if gone is not None:
                ns.slab.free(gone)
