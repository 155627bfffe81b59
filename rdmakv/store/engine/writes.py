"""Saves whose chunk bytes arrive by RDMA WRITE: slots reserved for them, then checked and made
durable from slab memory. The verbs side (the memory window over the slots) is the server's;
this is the engine's part, with no sockets and no verbs."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from slab import Slot

from ...errors import IntegrityError
from ...hashing import Check, Key, check_of, is_opaque, key_alg, key_hex, matches
from . import records as rec
from .admission import Admission
from .index import Chunk, Holder, Namespace
from .live_bytes import LiveBytes
from .namespaces import NamespaceTable
from .segment_log import Location, SegmentLog
from .tiering import Tiers


class Writes:
    """Chunks coming in: checked against their keys, given slots (the tiers make room), logged,
    and held for their save's commit. Owns ``reserved_slots``, the slots of RDMA saves whose bytes
    are being written."""

    def __init__(self, lock: threading.RLock, spaces: NamespaceTable, tiers: Tiers, admission: Admission,
                 log: SegmentLog, live: LiveBytes) -> None:  # fmt: skip
        self.lock = lock
        self.spaces = spaces
        self.tiers = tiers
        self.admission = admission
        self.log = log
        self.live = live
        self.reserved_slots = 0

    def reserve_run(
        self, ns_name: str, lengths: list[int], holder: Holder | None
    ) -> tuple[list[Slot], list[int]]:
        """Slots for chunks a client will WRITE, laid out as a run in this order (contiguous
        where the slab can); returns (slots, each slot's address). StoreFullError as for puts;
        the slots come out of ``holder``'s admission."""
        with self.lock:
            ns = self.spaces.writable(ns_name)
            self.tiers.disk_room(ns, sum(lengths) + 64 * len(lengths))
            slots = self.tiers.alloc_run(ns, lengths, holder=holder)
            if holder is not None:
                self.admission.consume(holder, sum(s.size for s in slots))
            addrs = [ns.slab.regions[s.region].address + s.offset for s in slots]
            self.reserved_slots += len(slots)
        return slots, addrs

    def cancel_run(self, ns_name: str, slots: list[Slot]) -> None:
        """Give reserved slots back (freed slots are zeroed: nothing written stays)."""
        with self.lock:
            ns = self.spaces.writable(ns_name)
            for s in slots:
                ns.slab.free(s)
            self.reserved_slots -= len(slots)

    def install_written(
        self, ns_name: str, keys: list[Key], slots: list[Slot], holder: Holder
    ) -> tuple[int, int]:
        """Check every written slot against its key, log the chunks from slab memory and make
        them live for this caller's commit. Nothing is kept when any slot does not match."""
        with self.lock:
            ns = self.spaces.writable(ns_name)
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
            self.tiers.make_disk_room(sum(s.length for s in slots) + 64 * len(slots))
            records = rec.chunk_records(ns_name, keys, views)
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

    def put_chunks(
        self, ns_name: str, items: Sequence[tuple[Key, memoryview]], holder: Holder
    ) -> tuple[int, int]:
        """Store chunks (each checked against its key) and hold them for this caller's next
        commit; returns (stored, already present)."""
        checks: dict[Key, Check] = {}  # opaque keys: the store's own check of the bytes, kept beside the key
        for key, data in items:
            if is_opaque(key_alg(key)):
                checks[key] = check_of(key, data)  # type: ignore[assignment]
            elif not matches(key, data):
                raise IntegrityError(f"chunk {key_hex(key)}: bytes do not hash to the key")
        now = time.monotonic()
        with self.lock:
            ns = self.spaces.writable(ns_name)
            ns.counters["chunks_received"] += len(items)
            new: dict[Key, memoryview] = {}
            existed = 0
            for key, data in items:
                c = ns.chunks.get(key)
                if c is not None:
                    existed += 1
                    self._hold_pending(holder, ns, c, now)
                elif key not in new:
                    new[key] = data
            if not new:
                ns.counters["chunks_deduped"] += existed
                return 0, existed
            lengths = [memoryview(d).nbytes for d in new.values()]
            self.tiers.disk_room(ns, sum(lengths) + 64 * len(lengths))
            slots = self.tiers.alloc_run(ns, lengths, holder=holder)
            self.admission.consume(holder, sum(s.size for s in slots))
            views = [ns.slab.view(s) for s in slots]
        placed: list[tuple[Key, Location]] = []
        try:
            self.tiers.make_disk_room(sum(lengths) + 64 * len(lengths))
            for data, view in zip(new.values(), views):
                view[:] = data
            # one writev per run of records, from the slab copies (the frame's buffer can go)
            records = rec.chunk_records(ns_name, list(new), views, checks)
            placed = list(zip(new, self.log.append_many(rec.REC_CHUNK, records)))
            records.clear()
        except BaseException:
            with self.lock:  # records already appended were never live: garbage for the compactor
                for s in slots:
                    ns.slab.free(s)
            raise
        finally:
            views.clear()
        return self._adopt_placed(ns, placed, slots, holder, existed, now, checks)

    def _adopt_placed(
        self, ns: Namespace, placed: list[tuple[Key, Location]], slots: list[Slot], holder: Holder,
        existed: int, now: float, checks: dict[Key, Check] | None = None,
    ) -> tuple[int, int]:  # fmt: skip
        """Make chunks whose bytes sit in ``slots`` and whose records are in the log live, held
        for this caller's commit; returns (stored, already present)."""
        made: list[Location] = []
        chunks = ns.chunks
        with self.lock:
            for (key, loc), slot in zip(placed, slots):
                if key in chunks:  # a concurrent put of the same chunk won
                    ns.slab.free(slot)
                    existed += 1
                    self._hold_pending(holder, ns, chunks[key], now)
                    continue
                c = chunks[key] = Chunk(key, slot.length, loc, slot, check=checks.get(key) if checks else None)
                made.append(loc)
                self._hold_pending(holder, ns, c, now)
            self.live.live_many(ns, made)
            ns.counters["chunks_stored"] += len(made)
            ns.counters["chunks_deduped"] += existed
        return len(made), existed

    def _hold_pending(self, holder: Holder, ns: Namespace, c: Chunk, now: float) -> None:
        ident = (ns.name, c.key)
        if ident not in holder.pending:
            c.holds += 1
        holder.pending[ident] = now
