"""The one-sided lookup index: per namespace, a table a client READs to find a session's
manifest and chunk locations without asking the server (no server CPU on a restore).

The table is open-addressed by a 128-bit hash of the name, ``PROBE`` entries per name, never
wrapping (``INDEX_ENTRIES + PROBE`` entries in all), in its own buffer (the exporter registers
exactly it, so a READ past it fails). An entry points at a blob in a slab slot: the name, the
manifest and its encoded locations. Entries are written as a seqlock (the version is odd while
one is changed) and carry a checksum over themselves and one over the blob. A reader that sees
an odd version or a bad checksum retries once and then asks over TCP; a blob whose slot was
reused fails its checksum, and a chunk whose slot was reused fails its key: nothing here has to
outlive its readers.
"""

from __future__ import annotations

import mmap
import threading

import numpy as np

from slab import Slot

from ...wire.lookup_index import ENTRY, INDEX_ENTRIES, PROBE, entry_check, home, name_hash


class PublishedIndex:
    def __init__(self, entries: int = INDEX_ENTRIES) -> None:
        self.entries = entries
        self.size = (entries + PROBE) * ENTRY.itemsize
        self.buf = mmap.mmap(-1, -(-self.size // mmap.PAGESIZE) * mmap.PAGESIZE)
        self.table = np.frombuffer(self.buf, ENTRY, count=entries + PROBE)
        self.slots: dict[str, tuple[int, Slot, object]] = {}  # name -> (entry index, blob slot, owner)
        self.lock = threading.Lock()
        self.full = 0  # publishes that found no free entry in their probe window

    def put(self, name: str, addr: int, length: int, rkey: int, blob_xxh3: int, slot: Slot, owner: object
            ) -> Slot | None:  # fmt: skip
        """Point ``name`` at a new blob; returns the blob slot it replaces (to free), or
        ``slot`` itself when the probe window is full (the name is then looked up over TCP)."""
        h = name_hash(name)
        with self.lock:
            old = self.slots.get(name)
            if old is not None:
                i = old[0]
            else:
                start = home(h, self.entries)
                used = {v[0] for v in self.slots.values()}
                free = [j for j in range(start, start + PROBE) if j not in used]
                if not free:
                    self.full += 1
                    return slot
                i = free[0]
            self._write(i, h, addr, length, rkey, blob_xxh3)
            self.slots[name] = (i, slot, owner)
            return None if old is None else old[1]

    def drop(self, name: str, owner: object | None = None) -> Slot | None:
        """Clear ``name``'s entry (only if ``owner`` published it, when given); its blob slot."""
        with self.lock:
            old = self.slots.get(name)
            if old is None or (owner is not None and old[2] is not owner):
                return None
            del self.slots[name]
            self._write(old[0], b"\0" * 16, 0, 0, 0, 0)
            return old[1]

    def _write(self, i: int, h: bytes, addr: int, length: int, rkey: int, blob_xxh3: int) -> None:
        e = self.table[i : i + 1]
        v = int(e["version"][0])
        e["version"] = v + 1 if v % 2 == 0 else v + 2  # odd: a reader retries
        e["hash"] = np.void(h)
        e["addr"], e["length"], e["rkey"], e["blob_xxh3"] = addr, length, rkey, blob_xxh3
        e["version"] = int(e["version"][0]) + 1  # even again, then the checksum that covers it
        e["check"] = entry_check(e.tobytes())
