"""The data dir itself: one server at a time (a flock'd lock file), a reserve of free space,
and what the filesystem under it has left."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ...errors import RdmakvError

LOCK_NAME = "LOCK"
RESERVE_NAME = "reserve"


class DataDirInUse(RdmakvError):
    """Another server holds this data dir."""

    code = 25


class DataDirLock:
    """An exclusive flock on ``DIR/LOCK`` holding the owner's PID; released when the process ends."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            other = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DataDirInUse(
                    f"data dir {self.path.parent} is in use by another rdmakv server (pid {other}); "
                    "stop it first, or give this one another --data-dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Reserve:
    """A file of preallocated space. Deletes, evictions and compaction must work on a full disk
    (they are how an operator frees space), so when one of them hits ENOSPC the reserve is
    given up and the write retried; ``refill`` takes the space back once there is room."""

    def __init__(self, directory: Path, size: int) -> None:
        self.path = directory / RESERVE_NAME
        self.size = size

    @property
    def held(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def refill(self) -> bool:
        if self.held >= self.size:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, self.size)
            os.fsync(fd)
            return True
        except OSError:
            os.ftruncate(fd, 0)
            return False
        finally:
            os.close(fd)

    def give_up(self) -> int:
        freed = self.held
        self.path.unlink(missing_ok=True)
        return freed


def fs_free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize

