"""Scratch slot files that stay mapped between restores, so a fetch lands in the file's own pages.

A restore over TCP receives each chunk straight into its place in the slot file llama-server
then reads: no restore buffer and no second copy into the file. Mapping a file and faulting in
its pages costs about what the copy saves, so the files are kept (at most ``keep``, in the
proxy's work directory) together with their mappings, and a restore takes one, resizes it to
the file it needs and renames it into the slot dir; once llama-server has loaded it, it moves
back. Measured: bench/results/ttft (the store fetch into the file beside the loopback and
file-write limits).
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
from pathlib import Path

from .scratch import remove, work_dir

DEFAULT_MAPPED = 2


class MappedScratch:
    def __init__(self, slot_dir: Path, keep: int = DEFAULT_MAPPED) -> None:
        self.dir = work_dir(Path(slot_dir)) / "mapped"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._ids = itertools.count()
        self._free: list[tuple[Path, mmap.mmap]] = []
        self._lock = threading.Lock()

    def take(self, path: Path, size: int) -> mmap.mmap:
        """A file of exactly ``size`` bytes at ``path``, mapped shared; hand it back with ``give_back``."""
        with self._lock:
            item = self._free.pop() if self._free else None
        if item is not None:
            spare, m = item
            try:
                os.rename(spare, path)
                if m.size() != size:
                    m.resize(size)  # the file too; the pages it keeps stay mapped
                return m
            except (OSError, ValueError, BufferError):
                _close(m)
                remove(spare, path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
            return mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            remove(path)
            raise
        finally:
            os.close(fd)

    def give_back(self, path: Path, m: mmap.mmap) -> None:
        """Done with the file at ``path``: keep it and its mapping for the next restore, or drop both."""
        with self._lock:
            if len(self._free) < self.keep:
                spare = self.dir / f"{next(self._ids)}.slot"
                try:
                    os.rename(path, spare)
                except OSError:
                    _close(m)
                    return
                self._free.append((spare, m))
                return
        _close(m)
        remove(path)

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for spare, m in free:
            _close(m)
            remove(spare)


def _close(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:  # a view outlived its use (a traceback): the GC unmaps it
        pass
