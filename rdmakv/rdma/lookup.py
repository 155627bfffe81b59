"""Client side of the one-sided lookup: READ the index entries a name hashes to, then the blob
(manifest + chunk locations) its entry points at, each checked; the server's CPU does nothing.
The layout is wire.lookup_index; store.published says how the server keeps it."""

from __future__ import annotations

import numpy as np
import xxhash

from ..kvstate import RestoreReport
from ..wire.lookup_index import ENTRY, dec_blob, entry_check, home, name_hash
from ..wire.messages import Locations, dec_locations
from .requester import ReadOp, Sge


class OneSidedIndex:
    def __init__(self, restorer, addr: int, rkey: int, entries: int, probe: int) -> None:
        self.r = restorer
        self.addr, self.rkey, self.entries, self.probe = addr, rkey, entries, probe

    def _read(self, addr: int, rkey: int, n: int, rep: RestoreReport) -> bytes:
        rep.reads_posted += 1
        r = self.r
        if n <= len(r.scratch):
            buf, laddr, lkey = r.scratch, r.scratch_addr, r.scratch_lkey
        else:
            buf, laddr, lkey = r.pool.alloc(n)
        r.requester.read([ReadOp(addr, rkey, [Sge(laddr, n, lkey)])])
        return bytes(memoryview(buf)[:n])

    def lookup(self, name: str, rep: RestoreReport) -> tuple[bytes, Locations] | None:
        """(manifest, locations) of ``name``, or None: not in the index, or still inconsistent
        after one retry (the caller then looks it up over TCP). Raises RdmaError on a bad READ."""
        h = name_hash(name)
        start = home(h, self.entries)
        for attempt in range(2):
            if attempt:
                rep.index_retries += 1
            raw = self._read(self.addr + start * ENTRY.itemsize, self.rkey, self.probe * ENTRY.itemsize, rep)
            table = np.frombuffer(raw, ENTRY)
            hits = np.flatnonzero(table["hash"] == np.void(h))
            if not len(hits):
                rep.index_misses += 1
                return None
            e = table[int(hits[0])]
            if int(e["version"]) % 2 or entry_check(e.tobytes()) != int(e["check"]):
                continue  # an update in flight, or a torn entry
            blob = self._read(int(e["addr"]), int(e["rkey"]), int(e["length"]), rep)
            if xxhash.xxh3_64_intdigest(blob) != int(e["blob_xxh3"]):
                continue  # the blob's slot was reused since the entry was read
            try:
                got, manifest, loc = dec_blob(blob)
                if got != name:
                    continue
                return bytes(manifest), dec_locations(loc)
            except (ValueError, UnicodeDecodeError):
                continue
        rep.index_fallbacks += 1
        return None
