"""Saves whose chunk bytes arrive by RDMA WRITE: slots reserved for them, then checked and made
durable from slab memory. The verbs side (the memory window over the slots) is the server's;
this is the engine's part, with no sockets and no verbs."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from slab import Slot

from ..errors import IntegrityError
from ..hashing import key_hex, matches
from . import records as rec

if TYPE_CHECKING:
    from .engine import Engine


class Writes:
    def reserve_run(self: Engine, ns_name: str, lengths: list[int], holder=None) -> tuple[list[Slot], list[int]]:
        """Slots for chunks a client will WRITE, laid out as a run in this order (contiguous
        where the slab can); returns (slots, each slot's address). StoreFullError as for puts;
        the slots come out of ``holder``'s admission."""
        with self.lock:
            ns = self.namespace(ns_name)
            self._disk_room(ns, sum(lengths) + 64 * len(lengths))
            slots = self._alloc_run(ns, lengths, holder=holder)
            if holder is not None:
                self._consume_reservation(holder, sum(s.size for s in slots))
            addrs = [ns.slab.regions[s.region].address + s.offset for s in slots]
            self.reserved_slots += len(slots)
        return slots, addrs

    def region_of(self: Engine, ns_name: str, slot: Slot):
        with self.lock:
            return self.namespace(ns_name).slab.regions[slot.region]

    def cancel_run(self: Engine, ns_name: str, slots: list[Slot]) -> None:
        """Give reserved slots back (freed slots are zeroed: nothing written stays)."""
        with self.lock:
            ns = self.namespace(ns_name)
            for s in slots:
                ns.slab.free(s)
            self.reserved_slots -= len(slots)

    def install_written(self: Engine, ns_name: str, keys: list[int], slots: list[Slot], holder=None) -> tuple[int, int]:
        """Check every written slot against its key, log the chunks from slab memory and make
        them live for this caller's commit. Nothing is kept when any slot does not match."""
        holder = holder or self.local
        with self.lock:
            ns = self.namespace(ns_name)
            views = [ns.slab.view(s) for s in slots]
        try:
            bad = [k for k, v in zip(keys, views) if not matches(k, v)]
            if bad:
                shown = ", ".join(key_hex(k) for k in bad[:8]) + (" ..." if len(bad) > 8 else "")
                raise IntegrityError(f"{len(bad)} of {len(keys)} chunks written by RDMA do not hash to their keys "
                                     f"({shown}); nothing of this save was kept")  # fmt: skip
            with self.lock:
                for s in slots:  # the window covered the padding too: leave no client bytes there
                    if s.size > s.length:
                        ns.slab.regions[s.region].zero(s.offset + s.length, s.size - s.length)
            self._make_disk_room(sum(s.length for s in slots) + 64 * len(slots))
            records = [rec.chunk_parts(ns_name, k, v) for k, v in zip(keys, views)]
            placed = list(zip(keys, self.log.append_many(rec.REC_CHUNK, records)))  # few writevs, from the slab
            records.clear()
        except BaseException:
            views.clear()
            self.cancel_run(ns_name, slots)
            raise
        views.clear()
        with self.lock:
            self.reserved_slots -= len(slots)
            ns.counters["chunks_received"] += len(keys)
        return self._adopt_placed(ns, placed, slots, holder, 0, time.monotonic())
