"""Slab allocator: size classes, contiguous runs, free lists, generations, capacity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slab import CapacityBudget, Slab, SlabFullError, class_size


def test_size_classes_fit_and_power_of_two_is_exact():
    for n in [1, 63, 64, 65, 255, 256, 257, 1000, 4096, 5000, 16384, 65536, 100_000]:
        c = class_size(n)
        assert c >= n and c % 64 == 0 and c <= max(64, n * 1.25 + 64)
    for p in range(6, 22):
        assert class_size(1 << p) == 1 << p


def test_run_of_one_save_is_contiguous_in_manifest_order():
    s = Slab(CapacityBudget(64 << 20), region_bytes=16 << 20)
    slots = s.alloc_run([16384] * 200)  # spans 4 MiB -> crosses span boundaries
    for a, b in zip(slots, slots[1:]):
        assert (b.region, b.offset) == (a.region, a.offset + a.size)


def test_regions_are_page_aligned_and_registrable():
    s = Slab(CapacityBudget(64 << 20))
    slot = s.alloc(100)
    r = s.regions[slot.region]
    assert r.address % 4096 == 0 and r.length % 4096 == 0
    s.view(slot)[:] = b"x" * 100
    assert bytes(r.view[slot.offset : slot.offset + 100]) == b"x" * 100


def test_free_bumps_generation_and_slot_is_reused():
    s = Slab(CapacityBudget(8 << 20), region_bytes=1 << 20, span_bytes=1 << 20)
    a = [s.alloc(4096) for _ in range(256)]  # fill one span
    assert all(x.gen == 0 for x in a)
    s.free(a[10])
    assert s.generation(a[10].region, a[10].offset) == 1
    # fresh spans are preferred while capacity allows (keeps runs contiguous)...
    b = s.alloc(4096)
    assert (b.region, b.offset) != (a[10].region, a[10].offset)


def test_store_full_and_all_or_nothing_runs():
    s = Slab(CapacityBudget(2 << 20), region_bytes=2 << 20, span_bytes=1 << 20)
    s.alloc_run([65536] * 16)  # one span full
    before = s.stats()
    with pytest.raises(SlabFullError):
        s.alloc_run([65536] * 40)
    assert s.stats()["used_bytes"] == before["used_bytes"]  # nothing leaked
    # under pressure the free list is used: free one slot, its class can reuse it
    s2 = Slab(CapacityBudget(1 << 20), region_bytes=1 << 20, span_bytes=1 << 20)
    slots = s2.alloc_run([65536] * 16)
    with pytest.raises(SlabFullError):
        s2.alloc(65536)
    s2.free(slots[3])
    again = s2.alloc(65536)
    assert (again.region, again.offset) == (slots[3].region, slots[3].offset) and again.gen == 1


def test_large_chunks_take_whole_spans_and_grow_regions():
    s = Slab(CapacityBudget(64 << 20), region_bytes=8 << 20)
    big = s.alloc(3 << 20)
    assert big.size == 3 << 20 and big.offset % (1 << 20) == 0
    huge = s.alloc(12 << 20)  # larger than a region: gets a region of its own
    assert s.regions[huge.region].length >= 12 << 20
    s.free(big)
    s.free(huge)
    assert s.stats()["used_bytes"] == 0


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 300_000)), max_size=120))
def test_random_alloc_free_never_overlaps(ops):
    s = Slab(CapacityBudget(16 << 20), region_bytes=4 << 20, span_bytes=1 << 20)
    live = []
    for do_alloc, n in ops:
        if do_alloc or not live:
            try:
                live.append(s.alloc(n))
            except SlabFullError:
                continue
        else:
            s.free(live.pop(n % len(live)))
        spans = sorted((x.region, x.offset, x.offset + x.size) for x in live)
        for (r1, _, e1), (r2, b2, _) in zip(spans, spans[1:]):
            assert r1 != r2 or e1 <= b2
        assert s.stats()["used_bytes"] == sum(x.size for x in live)
        assert s.budget.reserved <= s.budget.capacity


def test_freed_slots_are_zeroed_before_reuse():
    s = Slab(CapacityBudget(8 << 20))
    slot = s.alloc(5000)
    s.view(slot)[:] = b"\xab" * 5000
    r = s.regions[slot.region]
    s.free(slot)
    assert bytes(r.view[slot.offset : slot.offset + slot.size]) == bytes(slot.size)


def test_empty_regions_go_back_to_the_budget_and_ids_are_never_reused():
    budget = CapacityBudget(8 << 20)
    released = []
    s = Slab(budget, region_bytes=4 << 20, on_release_region=lambda r: released.append(r.id))
    slots = s.alloc_run([16384] * 300)  # several regions
    ids = {x.region for x in slots}
    assert len(ids) > 1 and budget.reserved == s.mapped_bytes > 0
    for x in slots:
        s.free(x)
    assert s.used_bytes == 0 and budget.reserved > 0  # retired, not yet released (grace period)
    assert s.release_empty() > 0
    assert budget.reserved == 0 and s.regions == {} and sorted(released) == sorted(ids)
    again = s.alloc(100)
    assert again.region not in ids  # a stale location can never name a new region


def test_release_empty_honours_the_grace_period():
    import time

    s = Slab(CapacityBudget(8 << 20))
    s.free(s.alloc(100))
    assert s.release_empty(older_than=time.monotonic() - 60) == 0
    assert s.release_empty(older_than=time.monotonic()) > 0


def test_a_region_in_use_is_not_released_and_reuse_unretires_it():
    s = Slab(CapacityBudget(8 << 20))
    a, b = s.alloc(100), s.alloc(100)
    s.free(a)
    assert s.release_empty() == 0  # b still lives there
    s.free(b)
    c = s.alloc(100)  # taken again before the grace period ran out
    assert s.release_empty() == 0 and c.region == a.region


def test_a_thousand_small_namespaces_fit_in_256_mib():
    budget = CapacityBudget(256 << 20)
    slabs = [Slab(budget) for _ in range(1000)]
    for sl in slabs:
        sl.alloc_run([1024] * 4)  # 4 KiB each
    assert budget.reserved <= 128 << 20


def _resident_bytes(address: int) -> int:
    """Rss of the mapping that starts at ``address`` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                inside = int(head.split("-")[0], 16) == address
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping at {address:#x}")


def _wait_resident(region, want: int, timeout: float = 10.0) -> int:
    import time

    deadline = time.monotonic() + timeout
    while (got := _resident_bytes(region.address)) < want and time.monotonic() < deadline:
        time.sleep(0.01)
    return got


@pytest.mark.parametrize("prefault", [True, False])
def test_a_new_region_is_backed_ahead_of_its_first_writes(prefault):
    """A save's first copies into a fresh region must not fault page by page on its path: the
    slab backs each new region on a thread of its own (MADV_POPULATE_WRITE)."""
    s = Slab(CapacityBudget(64 << 20), region_bytes=16 << 20, min_region_bytes=16 << 20, prefault=prefault)
    slot = s.alloc(4096)
    region = s.regions[slot.region]
    got = _wait_resident(region, region.length, timeout=10.0 if prefault else 0.5)
    assert (got == region.length) == prefault, got
    s.close()


def test_closing_a_region_stops_its_prefault():
    from slab import Region

    r = Region(0, 256 << 20, 1 << 20)
    import threading

    t = threading.Thread(target=r.prefault, args=(1 << 20,))
    t.start()
    r.close()  # waits for the step under way at most; later steps see it closed
    t.join(10)
    assert not t.is_alive()


@given(st.lists(st.integers(1, 1 << 22), max_size=50))
def test_total_class_size_is_the_sum_of_each_class(lengths):
    from slab import total_class_size

    assert total_class_size(lengths) == sum(class_size(n) for n in lengths)
