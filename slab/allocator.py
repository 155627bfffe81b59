"""Registered-memory slab: page-aligned regions carved into size-class slots.

Pure memory management, no sockets. Each region is one anonymous mapping that
the RDMA layer can register once as a single memory region (``Region.address``
and ``Region.length``); nothing is ever allocated outside the regions.

A region is divided into spans; a span serves one size class. Slots of one
class are handed out in address order from the class's current span and, when
that span is full, preferably from the span right after it, so the new chunks
of one save form a contiguous run in manifest order and a restore can fetch
them with a few large READs. A chunk too big for its region's spans takes
consecutive spans. Freed slots are zeroed at once (deleted KV must not be
readable from its old location), then reused by their class; a span whose
slots are all free returns to its region, and a region whose spans are all free
is *retired*: it still counts against the budget until ``release_empty`` hands
it back (after a grace period, so that a client READing a location it was just
given does not hit a deregistered MR). Every slot has a generation, bumped when
it is freed, so a location handed out earlier can be recognised as stale;
region ids are never reused.

Regions start small (``min_region_bytes``) and double up to ``region_bytes``:
a namespace that stores little pins little, one that stores much ends up with
few large regions (few MRs). Small regions use small spans (1/16 of the
region), so a 4 KiB namespace costs a 64 KiB region, not a megabyte.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .size_classes import ALIGN, class_size

PAGE = mmap.PAGESIZE
# A new region's pages are backed by a background thread (MADV_POPULATE_WRITE, Linux >= 5.14)
# in steps of PREFAULT_STEP, so the first save into it does not take one page fault per 4 KiB on
# its own path (host: 36 ms of faults per 50 MB copied into fresh memory; cold saves into a fresh
# server, A/B: 4k tokens 230 -> 204 ms, 16k 1,445 -> 1,140 ms; bench/results/throughput).
MADV_POPULATE_WRITE = 23
PREFAULT_STEP = 2 << 20
_libc = ctypes.CDLL(None, use_errno=True)  # (a foreign call releases the GIL; mmap.madvise does not)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
DEFAULT_REGION_BYTES = 64 << 20
DEFAULT_SPAN_BYTES = 1 << 20
MIN_REGION_BYTES = 64 << 10
SPANS_PER_SMALL_REGION = 16
MIN_SPAN_BYTES = 16 << 10


class SlabFullError(MemoryError):
    """Not enough capacity for the requested slots."""


class CapacityBudget:
    """Bytes that all slabs (one per namespace) may map together, plus whatever else the
    owner charges to it (the store charges resident manifests too)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.reserved = 0

    @property
    def room(self) -> int:
        return self.capacity - self.reserved

    def try_reserve(self, n: int) -> bool:
        if self.reserved + n > self.capacity:
            return False
        self.reserved += n
        return True

    def release(self, n: int) -> None:
        self.reserved -= n


def span_size_for(region_length: int, span_bytes: int) -> int:
    """Span size of a region: ``span_bytes``, or 1/16 of a small region (a power of two of at
    least 16 KiB, and at most a quarter of the region)."""
    want = max(MIN_SPAN_BYTES, region_length // SPANS_PER_SMALL_REGION)
    span = min(span_bytes, 1 << (want.bit_length() - 1))
    while span > PAGE and span * 4 > region_length:
        span //= 2
    return span


class Region:
    """One page-aligned anonymous mapping; registered as one MR by the RDMA layer."""

    def __init__(self, rid: int, length: int, span: int) -> None:
        self.id = rid
        self.length = length
        self.span = span
        self._map = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._map)
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.address = ctypes.addressof(self._anchor)
        self.n_spans = length // span
        self.free_spans: list[int] = list(range(self.n_spans))  # kept sorted
        self.gens: dict[int, int] = {}  # offset -> generation (absent = 0)
        self.retired_at: float | None = None  # when its last span came back
        self._mapping = threading.Lock()  # held across each prefault step: close waits for it
        self._closed = False

    def prefault(self, step: int = PREFAULT_STEP) -> int:
        """Back the region's pages now, a step at a time, until it is closed; the bytes backed
        (less than the length where the kernel has no MADV_POPULATE_WRITE, or memory ran out:
        those pages are then backed by their first write, as without this)."""
        done = 0
        for offset in range(0, self.length, step):
            size = min(step, self.length - offset)
            with self._mapping:  # never advise an address range that close() has unmapped
                if self._closed or _libc.madvise(self.address + offset, size, MADV_POPULATE_WRITE) != 0:
                    break
            done += size
        return done

    @property
    def empty(self) -> bool:
        return len(self.free_spans) == self.n_spans

    def take_span(self, index: int) -> bool:
        i = bisect.bisect_left(self.free_spans, index)
        if i < len(self.free_spans) and self.free_spans[i] == index:
            del self.free_spans[i]
            return True
        return False

    def take_spans(self, count: int) -> int | None:
        """First index of ``count`` consecutive free spans, taken; None if none."""
        fs = self.free_spans
        for i in range(len(fs) - count + 1):
            if fs[i + count - 1] - fs[i] == count - 1:
                start = fs[i]
                del fs[i : i + count]
                return start
        return None

    def give_spans(self, start: int, count: int) -> None:
        for s in range(start, start + count):
            bisect.insort(self.free_spans, s)

    def zero(self, offset: int, size: int) -> None:
        ctypes.memset(self.address + offset, 0, size)

    def close(self) -> None:
        """Unmap. Raises BufferError while a view of the region is still alive."""
        with self._mapping:
            self._closed = True
        self.view.release()
        del self._anchor
        self._map.close()


@dataclass(slots=True)
class Slot:
    region: int
    offset: int
    size: int  # bytes reserved (class size, or whole spans for a large chunk)
    length: int  # payload bytes
    gen: int


class _Span:
    __slots__ = ("region", "index", "size", "n_slots", "next_free", "used", "free")

    def __init__(self, region: int, index: int, size: int, n_slots: int) -> None:
        self.region = region
        self.index = index
        self.size = size
        self.n_slots = n_slots
        self.next_free = 0  # bump pointer: slots below it were handed out at least once
        self.used = 0
        self.free: list[int] = []  # offsets of freed slots below the bump pointer


class Slab:
    """Allocator over lazily created regions, bounded by a CapacityBudget."""

    def __init__(
        self,
        budget: CapacityBudget,
        *,
        region_bytes: int = DEFAULT_REGION_BYTES,
        span_bytes: int = DEFAULT_SPAN_BYTES,
        min_region_bytes: int = MIN_REGION_BYTES,
        on_new_region: Callable[[Region], None] | None = None,
        on_release_region: Callable[[Region], None] | None = None,
        prefault: bool = True,
    ) -> None:
        if span_bytes % PAGE or span_bytes <= 0:
            raise ValueError("span_bytes must be a positive multiple of the page size")
        self.budget = budget
        self.region_bytes = max(span_bytes, region_bytes // span_bytes * span_bytes)
        self.span_bytes = span_bytes
        self.min_region_bytes = max(PAGE, min(min_region_bytes, self.region_bytes))
        self.regions: dict[int, Region] = {}
        self.on_new_region = on_new_region
        self.on_release_region = on_release_region
        self.prefault = prefault  # back each new region's pages on a thread of its own
        self._next_id = 0
        self._spans: dict[tuple[int, int], _Span] = {}
        self._large: dict[tuple[int, int], int] = {}  # (region, offset) -> span count
        self._current: dict[int, _Span] = {}  # class size -> span being filled
        self._partial: dict[int, dict[tuple[int, int], _Span]] = {}  # class -> spans with freed slots
        self.used_bytes = 0
        self.payload_bytes = 0
        self.live_slots = 0

    # -- public ---------------------------------------------------------------
    @property
    def mapped_bytes(self) -> int:
        return sum(r.length for r in self.regions.values())

    def alloc_run(self, lengths: Sequence[int], hint: int = 0) -> list[Slot]:
        """Slots for ``lengths`` in order, contiguous where possible; all or nothing.

        A new region is sized for the whole run (``hint`` bytes still to come, if larger)."""
        out: list[Slot] = []
        sizes = {n: class_size(int(n)) for n in set(lengths)}  # (few distinct lengths)
        remaining = max(hint, sum(sizes[n] for n in lengths))
        try:
            for n in lengths:
                slot = self._alloc(int(n), remaining, sizes[n])
                remaining -= slot.size
                out.append(slot)
        except SlabFullError:
            for s in out:
                self.free(s)
            raise
        return out

    def alloc(self, length: int) -> Slot:
        return self._alloc(length, 0)

    def free(self, slot: Slot) -> None:
        region = self.regions[slot.region]
        region.zero(slot.offset, slot.size)
        region.gens[slot.offset] = region.gens.get(slot.offset, 0) + 1
        self.used_bytes -= slot.size
        self.payload_bytes -= slot.length
        self.live_slots -= 1
        count = self._large.pop((slot.region, slot.offset), None)
        if count is not None:
            region.give_spans(slot.offset // region.span, count)
            self._maybe_retire(region)
            return
        span = self._spans[(slot.region, slot.offset // region.span)]
        span.used -= 1
        if span.used == 0:
            self._release_span(span)
            return
        span.free.append(slot.offset)
        self._partial.setdefault(span.size, {})[(span.region, span.index)] = span

    def view(self, slot: Slot) -> memoryview:
        return self.regions[slot.region].view[slot.offset : slot.offset + slot.length]

    def generation(self, region: int, offset: int) -> int:
        r = self.regions.get(region)
        return r.gens.get(offset, 0) if r is not None else 0

    def release_empty(self, older_than: float | None = None) -> int:
        """Hand retired regions (all spans free) back to the budget: those retired at or before
        ``older_than`` (a time.monotonic() value), or all of them. Returns the bytes released."""
        freed = 0
        for region in list(self.regions.values()):
            if region.retired_at is None or not region.empty:
                continue
            if older_than is not None and region.retired_at > older_than:
                continue
            if self.on_release_region is not None:
                self.on_release_region(region)  # deregister the MR before the memory goes away
            try:
                region.close()
            except BufferError:
                continue  # a view is still alive somewhere; try again next time
            del self.regions[region.id]
            self.budget.release(region.length)
            freed += region.length
        return freed

    def stats(self) -> dict[str, int]:
        return {
            "regions": len(self.regions),
            "mapped_bytes": self.mapped_bytes,
            "used_bytes": self.used_bytes,
            "payload_bytes": self.payload_bytes,
            "live_slots": self.live_slots,
        }

    def close(self) -> None:
        for r in list(self.regions.values()):
            if self.on_release_region is not None:
                self.on_release_region(r)
            self.budget.release(r.length)
        self.regions.clear()

    # -- internals --------------------------------------------------------------
    def _alloc(self, length: int, run_bytes: int, size: int = 0) -> Slot:
        size = size or class_size(length)
        span = self._current.get(size)
        if span is None or span.next_free >= span.n_slots:
            span = self._next_span(size, span)
        if span is not None:
            return self._bump(span, length)
        partial = self._partial.get(size)
        if partial:
            span = next(iter(partial.values()))
            offset = span.free.pop()
            if not span.free:
                del partial[(span.region, span.index)]
            span.used += 1
            return self._account(span.region, offset, size, length)
        for region in self.regions.values():
            slot = self._alloc_large(region, size, length)
            if slot is not None:
                return slot
        fresh = self._new_region(size, run_bytes)
        if fresh is None:
            raise SlabFullError(f"slab full: no room for a {length}-byte chunk")
        region = fresh
        if self._small(size, region):
            span = self._take_span(size, region, region.free_spans[0])
            return self._bump(span, length)
        slot = self._alloc_large(region, size, length)
        assert slot is not None
        return slot

    @staticmethod
    def _small(size: int, region: Region) -> bool:
        return 2 * size <= region.span  # at least two slots per span, else whole spans

    def _bump(self, span: _Span, length: int) -> Slot:
        offset = span.index * self.regions[span.region].span + span.next_free * span.size
        span.next_free += 1
        span.used += 1
        return self._account(span.region, offset, span.size, length)

    def _alloc_large(self, region: Region, size: int, length: int) -> Slot | None:
        if self._small(size, region):
            return None
        count = -(-size // region.span)
        start = region.take_spans(count)
        if start is None:
            return None
        region.retired_at = None
        offset = start * region.span
        self._large[(region.id, offset)] = count
        return self._account(region.id, offset, count * region.span, length)

    def _account(self, rid: int, offset: int, size: int, length: int) -> Slot:
        self.used_bytes += size
        self.payload_bytes += length
        self.live_slots += 1
        return Slot(rid, offset, size, length, self.regions[rid].gens.get(offset, 0))

    def _next_span(self, size: int, prev: _Span | None) -> _Span | None:
        """A fresh span for ``size``: the one after ``prev`` if free (keeps runs contiguous),
        else the first free span of a region whose spans hold at least two such slots."""
        if prev is not None:
            region = self.regions[prev.region]
            if region.take_span(prev.index + 1):
                return self._take_span(size, region, prev.index + 1, taken=True)
        for region in self.regions.values():
            if region.free_spans and self._small(size, region):
                return self._take_span(size, region, region.free_spans[0])
        return None

    def _take_span(self, size: int, region: Region, index: int, taken: bool = False) -> _Span:
        if not taken:
            assert region.take_span(index)
        region.retired_at = None
        span = _Span(region.id, index, size, region.span // size)
        self._spans[(region.id, index)] = span
        self._current[size] = span
        return span

    def _release_span(self, span: _Span) -> None:
        key = (span.region, span.index)
        del self._spans[key]
        partial = self._partial.get(span.size)
        if partial is not None:
            partial.pop(key, None)
        if self._current.get(span.size) is span:
            del self._current[span.size]
        region = self.regions[span.region]
        region.give_spans(span.index, 1)
        self._maybe_retire(region)

    def _maybe_retire(self, region: Region) -> None:
        if region.empty and region.retired_at is None:
            region.retired_at = time.monotonic()

    def _new_region(self, need: int, hint: int = 0) -> Region | None:
        """A region holding at least ``need`` bytes: double what is mapped (at least
        ``min_region_bytes``, and ``hint`` when a run is coming), at most ``region_bytes``
        unless one chunk needs more, and never more than the budget has room for."""
        want = max(self.min_region_bytes, 2 * self.mapped_bytes, hint)
        size = min(self.region_bytes, 1 << (want - 1).bit_length())  # a power of two: whole spans
        size = max(size, need)
        span = span_size_for(size, self.span_bytes)
        size = -(-size // span) * span
        room = self.budget.room
        if size > room:  # the last region may be smaller: use the whole capacity
            size = room // span * span
        if size < max(need, PAGE) or not self.budget.try_reserve(size):
            return None
        region = Region(self._next_id, size, span)
        self._next_id += 1
        self.regions[region.id] = region
        if self.on_new_region is not None:
            try:
                self.on_new_region(region)
            except BaseException:
                del self.regions[region.id]
                self.budget.release(size)
                region.close()
                raise
        if self.prefault:  # (one short-lived thread per region: regions are few, and double in size)
            threading.Thread(target=region.prefault, name=f"slab-prefault-{region.id}", daemon=True).start()
        return region


__all__ = ["ALIGN", "CapacityBudget", "Region", "Slab", "SlabFullError", "Slot", "span_size_for"]
