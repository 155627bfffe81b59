"""The orphan cache's order: chunks no session names any more, least recently used first.

A chunk becomes an orphan when the last session naming it is replaced by a newer version of its
name (a delete, an eviction or an expiry frees it instead). Orphans stay readable by key, and they
are what the store gives up first: under memory pressure an orphan's slot goes (it stays on disk),
under disk pressure the orphan goes. Two queues keep both passes linear: the orphans that still
hold a slab slot, and those that are on disk only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from .index import Chunk

Ident = tuple[str, int | bytes]  # (namespace, chunk key)


class Orphans:
    def __init__(self) -> None:
        self._resident: OrderedDict[Ident, Chunk] = OrderedDict()
        self._on_disk: OrderedDict[Ident, Chunk] = OrderedDict()

    def __len__(self) -> int:
        return len(self._resident) + len(self._on_disk)

    def add(self, ns: str, c: Chunk) -> None:
        self._queue(c)[(ns, c.key)] = c

    def discard(self, ns: str, c: Chunk) -> None:
        ident = (ns, c.key)
        for q in (self._resident, self._on_disk):
            if q.get(ident) is c:
                del q[ident]

    def touch(self, ns: str, c: Chunk) -> None:
        """Read by key: the most recently used now."""
        ident = (ns, c.key)
        for q in (self._resident, self._on_disk):
            if q.get(ident) is c:
                q.move_to_end(ident)

    def left_memory(self, ns: str, c: Chunk) -> None:
        """``c`` gave up its slot: from the resident queue to the disk-only one."""
        ident = (ns, c.key)
        if self._resident.get(ident) is c:
            del self._resident[ident]
            self._on_disk[ident] = c

    def resident(self) -> Iterator[tuple[str, Chunk]]:
        """Orphans that hold a slot, oldest first (a snapshot: the caller may change the queues)."""
        return iter([(ns, c) for (ns, _), c in self._resident.items()])

    def all(self) -> Iterator[tuple[str, Chunk]]:
        """Every orphan, the disk-only ones first, each queue oldest first (a snapshot)."""
        return iter([(ns, c) for q in (self._on_disk, self._resident) for (ns, _), c in q.items()])

    def _queue(self, c: Chunk) -> OrderedDict[Ident, Chunk]:
        return self._resident if c.slot is not None else self._on_disk
