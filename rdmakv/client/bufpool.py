"""Client-side buffer pool for restore destinations.

A restore takes one contiguous extent of an arena and the restored numpy
arrays are views of it (no copy after the data lands). The extent returns to
the pool when the last array viewing it is garbage-collected. For RDMA the
arenas are registered when created, never per restore; for TCP they are plain
memory, reused so that a large restore does not fault in fresh pages each time.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import threading
import weakref
from typing import Any

import numpy as np

ALIGN = 64
DEFAULT_ARENA_BYTES = 32 << 20


class _Arena:
    def __init__(self, pd: Any | None, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.anchor = ctypes.c_char.from_buffer(self.map)
        self.addr = ctypes.addressof(self.anchor)
        # pd: an rdmakv.rdma.verbs.ProtectionDomain, or None for plain (TCP) memory
        self.mr = pd.register(self.addr, size, remote_read=False, keepalive=self.map) if pd is not None else None
        self.lkey = self.mr.lkey if self.mr is not None else 0
        self.free: list[tuple[int, int]] = [(0, size)]  # sorted (offset, length)

    def take(self, n: int) -> int | None:
        for i, (off, ln) in enumerate(self.free):
            if ln >= n:
                if ln == n:
                    del self.free[i]
                else:
                    self.free[i] = (off + n, ln - n)
                return off
        return None

    def give(self, off: int, n: int) -> None:
        i = bisect.bisect_left(self.free, (off, 0))
        self.free.insert(i, (off, n))
        # coalesce with neighbours
        if i + 1 < len(self.free) and off + n == self.free[i + 1][0]:
            self.free[i] = (off, n + self.free[i + 1][1])
            del self.free[i + 1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == off:
            self.free[i - 1] = (self.free[i - 1][0], self.free[i - 1][1] + self.free[i][1])
            del self.free[i]


class BufferPool:
    def __init__(self, pd: Any | None = None, arena_bytes: int = DEFAULT_ARENA_BYTES) -> None:
        self.pd = pd
        self.arena_bytes = arena_bytes
        self.arenas: list[_Arena] = []
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> tuple[np.ndarray, int, int]:
        """(uint8 array of nbytes, its address, lkey); freed when the array is collected."""
        n = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        with self._lock:
            for arena in self.arenas:
                off = arena.take(n)
                if off is not None:
                    break
            else:
                # arenas double: a connection that restores little pins little
                grow = 2 * self.arenas[-1].size if self.arenas else self.arena_bytes
                size = max(grow, -(-n // mmap.PAGESIZE) * mmap.PAGESIZE)
                arena = _Arena(self.pd, size)
                self.arenas.append(arena)
                off = arena.take(n)
                assert off is not None
        arr = np.frombuffer(arena.map, dtype=np.uint8, count=nbytes, offset=off)
        weakref.finalize(arr, self._give, arena, off, n)
        return arr, arena.addr + off, arena.lkey

    def _give(self, arena: _Arena, off: int, n: int) -> None:
        with self._lock:
            arena.give(off, n)
