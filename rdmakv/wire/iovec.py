"""Scatter-gather bookkeeping shared by every writer of part lists (sockets, files): no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typing-only (collections.abc.Buffer is 3.12+)

IOV_MAX = 512  # parts per sendmsg/writev (Linux allows 1024)


def byte_views(parts: Sequence[Buffer]) -> list[memoryview]:
    """Byte views of the non-empty parts, in order (no copy)."""
    return [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]


def advance(views: list[memoryview], i: int, done: int) -> int:
    """After a write of ``done`` bytes starting at ``views[i]``: the index of the first part not
    wholly written; a part written in part is replaced by its unwritten rest."""
    while done:
        n = views[i].nbytes
        if done >= n:
            done -= n
            i += 1
        else:
            views[i] = views[i][done:]
            done = 0
    return i
