"""Registered-memory slab: page-aligned regions carved into size-class slots.

Pure memory management, no sockets. Each region is one anonymous mapping that
the RDMA layer can register once as a single memory region (``Region.address``
and ``Region.length``); nothing is ever allocated outside the regions.

A region is divided into spans; a span serves one size class. Slots of one
class are handed out in address order from the class's current span and, when
that span is full, preferably from the span right after it, so the new chunks
of one save form a contiguous run in manifest order and a restore can fetch
them with a few large READs. Freed slots go to a per-class free list; a span
whose slots are all free returns to the region's pool of free spans. Every
slot has a generation, bumped when it is freed, so a location handed out
earlier can be recognised as stale.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .size_classes import ALIGN, class_size

PAGE = mmap.PAGESIZE
DEFAULT_REGION_BYTES = 64 << 20
DEFAULT_SPAN_BYTES = 1 << 20
INITIAL_REGION_BYTES = 4 << 20


class SlabFullError(MemoryError):
    """Not enough capacity for the requested slots."""


class CapacityBudget:
    """Bytes of region memory that all slabs (one per namespace) may map together."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.reserved = 0

    def try_reserve(self, n: int) -> bool:
        if self.reserved + n > self.capacity:
            return False
        self.reserved += n
        return True

    def release(self, n: int) -> None:
        self.reserved -= n


class Region:
    """One page-aligned anonymous mapping; registered as one MR by the RDMA layer."""

    def __init__(self, rid: int, length: int, span_bytes: int) -> None:
        self.id = rid
        self.length = length
        self._map = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._map)
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.address = ctypes.addressof(self._anchor)
        self.n_spans = length // span_bytes
        self.free_spans: list[int] = list(range(self.n_spans))  # kept sorted

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


@dataclass(slots=True)
class Slot:
    region: int
    offset: int
    size: int  # class size (bytes reserved)
    length: int  # payload bytes
    gen: int


class _Span:
    __slots__ = ("region", "index", "size", "n_slots", "next_free", "used")

    def __init__(self, region: int, index: int, size: int, n_slots: int) -> None:
        self.region = region
        self.index = index
        self.size = size
        self.n_slots = n_slots
        self.next_free = 0  # bump pointer: slots below it were handed out at least once
        self.used = 0


class Slab:
    """Allocator over lazily created regions, bounded by a CapacityBudget."""

    def __init__(
        self,
        budget: CapacityBudget,
        *,
        region_bytes: int = DEFAULT_REGION_BYTES,
        span_bytes: int = DEFAULT_SPAN_BYTES,
        on_new_region: Callable[[Region], None] | None = None,
    ) -> None:
        if span_bytes % PAGE or span_bytes <= 0:
            raise ValueError("span_bytes must be a positive multiple of the page size")
        region_bytes = max(span_bytes, min(region_bytes, budget.capacity) // span_bytes * span_bytes)
        self.budget = budget
        # Regions grow geometrically up to region_bytes: a namespace that stores little
        # pins little, one that stores much ends up with few large regions (few MRs).
        self.initial_region_bytes = min(region_bytes, max(span_bytes, INITIAL_REGION_BYTES))
        self.region_bytes = region_bytes
        self.span_bytes = span_bytes
        self.regions: list[Region] = []
        self.on_new_region = on_new_region
        self._spans: dict[tuple[int, int], _Span] = {}
        self._current: dict[int, _Span] = {}  # class size -> span being filled
        self._free_slots: dict[int, list[tuple[int, int]]] = {}  # class size -> [(region, offset)]
        self._gen: dict[tuple[int, int], int] = {}
        self.used_bytes = 0
        self.payload_bytes = 0
        self.live_slots = 0

    # -- public ---------------------------------------------------------------
    def alloc_run(self, lengths: Sequence[int]) -> list[Slot]:
        """Slots for ``lengths`` in order, contiguous where possible; all or nothing."""
        out: list[Slot] = []
        try:
            for n in lengths:
                out.append(self._alloc(int(n)))
        except SlabFullError:
            for s in out:
                self.free(s)
            raise
        return out

    def alloc(self, length: int) -> Slot:
        return self._alloc(length)

    def free(self, slot: Slot) -> None:
        key = (slot.region, slot.offset)
        self._gen[key] = self._gen.get(key, 0) + 1
        self.used_bytes -= slot.size
        self.payload_bytes -= slot.length
        self.live_slots -= 1
        if slot.size >= self.span_bytes:
            first = slot.offset // self.span_bytes
            self.regions[slot.region].give_spans(first, slot.size // self.span_bytes)
            return
        span = self._spans[(slot.region, slot.offset // self.span_bytes)]
        span.used -= 1
        if span.used == 0 and self._current.get(span.size) is not span:
            self._release_span(span)
        else:
            self._free_slots.setdefault(slot.size, []).append(key)

    def view(self, slot: Slot) -> memoryview:
        return self.regions[slot.region].view[slot.offset : slot.offset + slot.length]

    def generation(self, region: int, offset: int) -> int:
        return self._gen.get((region, offset), 0)

    def stats(self) -> dict[str, int]:
        mapped = sum(r.length for r in self.regions)
        return {
            "regions": len(self.regions),
            "mapped_bytes": mapped,
            "used_bytes": self.used_bytes,
            "payload_bytes": self.payload_bytes,
            "live_slots": self.live_slots,
        }

    def close(self) -> None:
        for r in self.regions:
            self.budget.release(r.length)
        self.regions.clear()

    # -- internals --------------------------------------------------------------
    def _alloc(self, length: int) -> Slot:
        size = class_size(length)
        if size >= self.span_bytes:
            return self._alloc_large(length)
        span = self._current.get(size)
        if span is None or span.next_free >= span.n_slots:
            span = self._next_span(size, span)
        if span is not None:
            offset = span.index * self.span_bytes + span.next_free * size
            span.next_free += 1
            span.used += 1
            return self._account(span.region, offset, size, length)
        free = self._free_slots.get(size)
        if free:
            rid, offset = free.pop()
            self._spans[(rid, offset // self.span_bytes)].used += 1
            return self._account(rid, offset, size, length)
        raise SlabFullError(f"slab full: no room for a {length}-byte chunk")

    def _alloc_large(self, length: int) -> Slot:
        count = -(-length // self.span_bytes)
        for region in self.regions:
            start = region.take_spans(count)
            if start is not None:
                return self._account(region.id, start * self.span_bytes, count * self.span_bytes, length)
        region = self._new_region(count * self.span_bytes)
        if region is None:
            raise SlabFullError(f"slab full: no room for a {length}-byte chunk")
        start = region.take_spans(count)
        assert start is not None
        return self._account(region.id, start * self.span_bytes, count * self.span_bytes, length)

    def _account(self, rid: int, offset: int, size: int, length: int) -> Slot:
        self.used_bytes += size
        self.payload_bytes += length
        self.live_slots += 1
        return Slot(rid, offset, size, length, self._gen.get((rid, offset), 0))

    def _next_span(self, size: int, prev: _Span | None) -> _Span | None:
        """A fresh span for ``size``: the one after ``prev`` if free (keeps runs contiguous)."""
        if prev is not None and prev.used == 0:
            self._release_span(prev)
        region_index = None
        if prev is not None and self.regions[prev.region].take_span(prev.index + 1):
            region_index = (prev.region, prev.index + 1)
        if region_index is None:
            for region in self.regions:
                if region.free_spans:
                    region_index = (region.id, region.free_spans.pop(0))
                    break
        if region_index is None:
            region = self._new_region()
            if region is None:
                return None
            region_index = (region.id, region.free_spans.pop(0))
        span = _Span(region_index[0], region_index[1], size, self.span_bytes // size)
        self._spans[region_index] = span
        self._current[size] = span
        return span

    def _release_span(self, span: _Span) -> None:
        lo = span.index * self.span_bytes
        hi = lo + self.span_bytes
        free = self._free_slots.get(span.size)
        if free:
            self._free_slots[span.size] = [
                (r, o) for (r, o) in free if r != span.region or not lo <= o < hi
            ]
        del self._spans[(span.region, span.index)]
        if self._current.get(span.size) is span:
            del self._current[span.size]
        self.regions[span.region].give_spans(span.index, 1)

    def _new_region(self, at_least: int = 0) -> Region | None:
        size = min(self.region_bytes, self.initial_region_bytes << len(self.regions))
        size = max(size, at_least)
        room = (self.budget.capacity - self.budget.reserved) // self.span_bytes * self.span_bytes
        size = min(size, room)  # the last region may be smaller: use the whole capacity
        if size < max(at_least, self.span_bytes) or not self.budget.try_reserve(size):
            return None
        region = Region(len(self.regions), size, self.span_bytes)
        self.regions.append(region)
        if self.on_new_region is not None:
            self.on_new_region(region)
        return region


__all__ = ["ALIGN", "CapacityBudget", "Region", "Slab", "SlabFullError", "Slot"]
