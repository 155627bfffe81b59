"""The log's files at the lowest level: where a record lies (``Location``), one segment file and
its shared read descriptor (``Segment``), writing a list of buffers whole, and what an OSError
of the disk means to a caller. The segment log and its batched appends both build on these."""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ...errors import DiskFullError, StorageError

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def storage_error(e: OSError, what: str) -> Exception:
    if e.errno in _DISK_FULL_ERRNOS:
        return DiskFullError(f"disk full: {what} failed ({os.strerror(e.errno)}); delete or unpin sessions, "
                             "or give the data dir more room")  # fmt: skip
    return StorageError(f"storage error: {what} failed ({e.strerror or e})")


@dataclass(frozen=True, slots=True)
class Location:
    segment: int
    offset: int  # of the record header
    size: int  # header + payload bytes
    body_offset: int = 0  # of the chunk/manifest bytes, from the header start

    @property
    def body(self) -> int:
        return self.offset + self.body_offset


class Segment:
    """One segment file and a read descriptor shared by its readers. A reader ``acquire``s it
    (under the engine lock, where it learnt the location), reads without locks, and
    ``release``s it; a retired segment's descriptor closes when its last reader is done."""

    def __init__(self, sid: int, path: Path) -> None:
        self.id = sid
        self.path = path
        self.size = path.stat().st_size
        self._fd = os.open(path, os.O_RDONLY)
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()

    def acquire(self) -> Segment:
        with self._lock:
            if self._fd < 0:
                raise StorageError(f"log segment {self.path.name} is gone")
            self._users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._retired and not self._users:
                self._close()

    def pread_into(self, offset: int, dest: memoryview) -> None:
        """Fill ``dest`` from ``offset`` (the caller holds an ``acquire``)."""
        got = 0
        while got < dest.nbytes:
            n = os.preadv(self._fd, [dest[got:]], offset + got)
            if n == 0:
                raise StorageError(f"{self.path.name}: short read at offset {offset + got}")
            got += n

    def read(self, offset: int, dest: memoryview) -> None:
        self.acquire()
        try:
            self.pread_into(offset, dest)
        finally:
            self.release()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            if not self._users:
                self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_all(fd: int, buffers: list[bytes | memoryview], total: int) -> None:
    written = os.writev(fd, buffers)
    if written == total:
        return
    rest = memoryview(b"".join(bytes(b) for b in buffers))[written:]
    while rest.nbytes:
        n = os.write(fd, rest)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        rest = rest[n:]
