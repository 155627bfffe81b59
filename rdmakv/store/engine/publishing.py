"""Engine mixin: keep the one-sided lookup index (``published``) in step with the sessions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import xxhash

from slab import SlabFullError

from ...wire import manifest as mf
from ...wire.lookup_index import INDEX_ENTRIES, enc_blob
from .published import PublishedIndex

if TYPE_CHECKING:
    from .core import Engine
    from .index import Namespace, Session


# Its methods take ``self: Engine``; mypy accepts an explicit self-type only when it is a supertype
# of the class or a Protocol (python/mypy#7191), so each such def carries ``type: ignore[misc]`` for
# that one check. The bodies are checked against Engine; the ignores go when the parts are composed.
class Publishing:
    def published_index(self: Engine, ns_name: str, entries: int = INDEX_ENTRIES) -> PublishedIndex:  # type: ignore[misc]
        with self.lock:
            idx = self.published.get(ns_name)
            if idx is None:
                idx = self.published[ns_name] = PublishedIndex(entries)
            return idx

    def publish(self: Engine, ns_name: str, name: str) -> bool:  # type: ignore[misc]
        """Point the index at ``name``'s current version, when it is wholly in memory and the
        namespace is exported; False when it could not be (the lookup then goes over TCP)."""
        with self.lock:
            idx = self.published.get(ns_name)
            ns = self.namespaces.get(ns_name)
            s = ns.sessions.get(name) if ns is not None else None
            if idx is None or ns is None or s is None or not s.complete or s.data is None or not ns.rkeys:
                return False
            current = idx.slots.get(name)
            if current is not None and current[2] is s:
                return True  # the entry names this version already (a restore's TCP lookup asks again)
            loc = self._located(ns, mf.keys_view(s.data).tolist()).encode()
            blob = enc_blob(name, s.data, loc)
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
            gone = idx.put(name, addr, len(blob), rkey, xxhash.xxh3_64_intdigest(blob), slot, s)
            if gone is not None:
                ns.slab.free(gone)
            return gone is not slot

    def _unpublish(self: Engine, ns: Namespace, s: Session) -> None:  # type: ignore[misc]
        """``s`` leaves memory or the store: its entry (if it is still ``s``'s) goes."""
        idx = self.published.get(ns.name)
        if idx is not None:
            gone = idx.drop(s.name, owner=s)
            if gone is not None:
                ns.slab.free(gone)
