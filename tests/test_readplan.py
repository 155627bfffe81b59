"""READ planning (pure): merging, SGE limits, slack, and that a plan moves exactly the right bytes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rdmakv.rdma.readplan import plan_reads
from slab import CapacityBudget, Slab

SCRATCH = 1 << 40


def _simulate(plan, remote: dict[int, bytearray], region_addr, local: bytearray, base: int, scratch: bytearray):
    """Execute a plan in memory the way the NIC would."""
    for raddr, _rkey, sges in plan.reads:
        reg = next(r for r, a in region_addr.items() if a <= raddr < a + len(remote[r]))
        pos = raddr - region_addr[reg]
        for laddr, ln, _lkey in sges:
            data = remote[reg][pos : pos + ln]
            if laddr >= SCRATCH:
                scratch[laddr - SCRATCH : laddr - SCRATCH + ln] = data
            else:
                local[laddr - base : laddr - base + ln] = data
            pos += ln


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 70_000), min_size=1, max_size=60),
    shuffle_seed=st.integers(0, 1000),
    max_sge=st.integers(4, 8),
    max_read=st.sampled_from([4096, 65536, 1 << 20]),
    holes=st.booleans(),
)
def test_plan_moves_exactly_the_chunk_bytes(lengths, shuffle_seed, max_sge, max_read, holes):
    slab = Slab(CapacityBudget(64 << 20), region_bytes=8 << 20)
    slots = slab.alloc_run(lengths)
    if holes:  # free every third slot and reallocate: non-adjacent placements
        for s in slots[::3]:
            slab.free(s)
        slots[::3] = [slab.alloc(n) for n in lengths[::3]]
    rng = np.random.default_rng(shuffle_seed)
    remote = {r.id: bytearray(rng.bytes(r.length)) for r in slab.regions.values()}
    region_addr = {r.id: 1_000_000_000 * (r.id + 1) for r in slab.regions.values()}
    dest_order = rng.permutation(len(lengths)) if shuffle_seed % 2 else np.arange(len(lengths))
    dest = np.zeros(len(lengths), np.int64)
    dest[dest_order] = np.concatenate([[0], np.cumsum(np.array(lengths)[dest_order])[:-1]])
    base = 4096
    plan = plan_reads(
        np.array([s.region for s in slots]), np.array([s.offset for s in slots]),
        np.array([s.size for s in slots]), np.array(lengths), dest,
        region_addr, {r: 7 for r in region_addr},
        local_base=base, lkey=1, scratch_addr=SCRATCH, scratch_lkey=2, scratch_bytes=1 << 20,
        max_sge=max_sge, max_read_bytes=max_read,
    )  # fmt: skip
    local = bytearray(sum(lengths))
    _simulate(plan, remote, region_addr, local, base, bytearray(1 << 20))
    for s, n, d in zip(slots, lengths, dest.tolist()):
        assert local[d : d + n] == remote[s.region][s.offset : s.offset + n]
    assert all(1 <= len(sges) <= max_sge for _, _, sges in plan.reads)
    assert plan.n_reads <= len(lengths) and sorted(plan.chunk_index.tolist()) == list(range(len(lengths)))


def test_fresh_save_in_manifest_order_is_few_reads_with_one_sge_each():
    slab = Slab(CapacityBudget(64 << 20), region_bytes=64 << 20)
    lengths = [16384] * 192  # 256 tokens at W=64 of the Qwen shape
    slots = slab.alloc_run(lengths)
    dest = np.arange(192) * 16384
    region = slab.regions[0]
    plan = plan_reads(
        np.array([s.region for s in slots]), np.array([s.offset for s in slots]),
        np.array([s.size for s in slots]), np.array(lengths), dest,
        {0: region.address}, {0: 5}, local_base=0, lkey=1, scratch_addr=0, scratch_lkey=2,
        scratch_bytes=0, max_sge=32, max_read_bytes=1 << 20,
    )  # fmt: skip
    assert plan.n_reads == 3 and plan.n_sges == 3 and plan.bytes_read == 192 * 16384
