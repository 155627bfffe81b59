"""Plan a restore's one-sided READs (pure: arrays in, READ list out).

Chunks are sorted by where they live in the server's slab; chunks in adjacent
slots of one region merge into one READ that scatters into several local SGEs
(the slack at the end of a slot, when a chunk is smaller than its slot class,
goes to a scratch buffer). A READ is cut when the next chunk is not adjacent,
when it would need more than ``max_sge`` SGEs, or when it would exceed
``max_read_bytes``. Consecutive destinations that are contiguous in the
restore buffer share one SGE, so a freshly saved session (laid out in manifest
order, same order as the restore buffer) becomes one SGE per READ.

All of it is vectorised: the per-chunk work is numpy, the per-READ work is
Python over a list that merging keeps short.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..wire.messages import NO_REGION


@dataclass
class ReadPlan:
    reads: Sequence[tuple[int, int, Sequence[tuple[int, int, int]]]]  # (remote addr, rkey, [(laddr, len, lkey)])
    chunk_index: np.ndarray  # indices (into the unique-chunk arrays) covered, in READ order
    n_reads: int
    n_sges: int
    bytes_read: int


def plan_reads(
    region: np.ndarray,
    offset: np.ndarray,
    slot_size: np.ndarray,
    length: np.ndarray,
    dest: np.ndarray,
    region_addr: dict[int, int],
    region_rkey: dict[int, int],
    *,
    local_base: int,
    lkey: int,
    scratch_addr: int,
    scratch_lkey: int,
    scratch_bytes: int,
    max_sge: int,
    max_read_bytes: int = 1 << 20,
    merge: bool = True,
) -> ReadPlan:
    """READs for chunks at (region, offset) of ``length`` bytes into ``local_base + dest``.

    Inputs are parallel arrays over unique chunks; every chunk must have a location.
    """
    n = len(region)
    if n == 0:
        return ReadPlan([], np.zeros(0, np.int64), 0, 0, 0)
    if (region == NO_REGION).any():
        raise ValueError("every chunk needs a location")
    if max_sge < 4:
        raise ValueError("max_sge must be at least 4")
    region = region.astype(np.int64)
    offset = offset.astype(np.int64)
    slot_size = slot_size.astype(np.int64)
    length = length.astype(np.int64)
    dest = dest.astype(np.int64)
    order = np.lexsort((offset, region))
    region, offset, slot_size, length, dest = (a[order] for a in (region, offset, slot_size, length, dest))
    gap = slot_size - length
    if int(gap.max()) > scratch_bytes:
        raise ValueError(f"slot slack {int(gap.max())} exceeds the scratch buffer ({scratch_bytes})")

    # a new READ starts where adjacency breaks...
    start = np.ones(n, dtype=bool)
    start[1:] = (region[1:] != region[:-1]) | (offset[1:] != offset[:-1] + slot_size[:-1]) | (not merge)
    # ...and where the SGE or byte budget of the current READ would overflow. SGEs are counted
    # per chunk (a new one unless it continues the previous destination, plus one for slack)
    # and budgets are cut in fixed strides from each adjacency run's start, which keeps this
    # vectorised; the stride leaves room for the one SGE a cut can add.
    laddr = local_base + dest
    cont = np.zeros(n, dtype=bool)
    cont[1:] = ~start[1:] & (gap[:-1] == 0) & (laddr[1:] == laddr[:-1] + length[:-1])
    inc = (~cont).astype(np.int64) + (gap > 0)
    run_id = np.cumsum(start) - 1
    run_first = np.flatnonzero(start)[run_id]
    sges_before = np.cumsum(inc) - inc
    sge_group = (sges_before - sges_before[run_first]) // (max_sge - 2)
    byte_group = (offset - offset[run_first]) // max_read_bytes
    start[1:] |= (sge_group[1:] != sge_group[:-1]) | (byte_group[1:] != byte_group[:-1])

    read_id = np.cumsum(start) - 1
    # Data SGEs: a chunk extends the previous chunk's SGE when it is in the same READ, the
    # previous chunk had no slack, and the destinations are contiguous.
    new_sge = start.copy()
    new_sge[1:] |= (gap[:-1] > 0) | (laddr[1:] != laddr[:-1] + length[:-1])
    seg_first = np.flatnonzero(new_sge)
    seg_last = np.append(seg_first[1:], n) - 1
    seg_len = np.add.reduceat(length, seg_first)
    # slack after a segment is read (into scratch) unless the segment ends its READ
    seg_gap = np.where(start[np.minimum(seg_last + 1, n - 1)] | (seg_last == n - 1), 0, gap[seg_last])

    reads: list[tuple[int, int, list[tuple[int, int, int]]]] = []
    cur = -1
    sges: list[tuple[int, int, int]] = []
    for first, ln, gp in zip(seg_first.tolist(), seg_len.tolist(), seg_gap.tolist()):
        rid = int(read_id[first])
        if rid != cur:
            cur = rid
            sges = []
            reg = int(region[first])
            reads.append((region_addr[reg] + int(offset[first]), region_rkey[reg], sges))
        sges.append((int(laddr[first]), ln, lkey))
        if gp:
            sges.append((scratch_addr, gp, scratch_lkey))
    n_sges = len(seg_first) + int(np.count_nonzero(seg_gap))
    total = int(seg_len.sum()) + int(seg_gap.sum())
    return ReadPlan(reads, order, len(reads), n_sges, total)
