"""Contiguous runs: the one helper that joins items lying back to back into stretches (pure).

A server sends a save's chunks as one view per stretch of the slab (one MAC update and one
iovec each), opens one RDMA window per stretch of reserved slots, and a client receives a reply
straight into one stretch of its restore buffer per run of chunks."""

from __future__ import annotations

from collections.abc import Sequence


def contiguous_runs(
    groups: Sequence[int], starts: Sequence[int], lengths: Sequence[int], joinable: Sequence[bool] | None = None
) -> list[tuple[int, int, int]]:
    """(group, start, length) of each maximal stretch of items, in order, where an item starts
    in the same group exactly where the one before it ended. ``joinable[i]`` False: nothing may
    be joined after item i (a slot whose bytes are followed by padding)."""
    out: list[list[int]] = []
    open_end = False
    for i, (g, s, n) in enumerate(zip(groups, starts, lengths)):
        if out and open_end and out[-1][0] == g and out[-1][1] + out[-1][2] == s:
            out[-1][2] += n
        else:
            out.append([g, s, n])
        open_end = True if joinable is None else bool(joinable[i])
    return [(g, s, n) for g, s, n in out]
