"""SegmentLog's batched appends and background writeback (a part of ``segment_log.SegmentLog``).

- ``append_many``: the records of one PUT_CHUNKS batch or one RDMA commit in as few ``writev``s
  as IOV_MAX and the segment size allow, with the failure behaviour of a loop of ``append``.
- With ``--fsync manifest``, an fsync starts in the background once WRITEBACK_BYTES are
  unsynced, so that the disk works while a large save's bytes still arrive and its commit's
  fsync has only the tail left. A commit still waits for an fsync that covers its record; a
  failed background fsync marks the log broken, so nothing more is acknowledged.
"""

from __future__ import annotations

import threading

from ...errors import StorageError
from .log_files import Location, Segment, storage_error, write_all
from .records import HEADER_SIZE, encode_header, payload_checksum

WRITEBACK_BYTES = 16 << 20  # unsynced log bytes that start a background fsync (--fsync manifest)
_IOV = 1020  # buffers per writev (Linux IOV_MAX is 1024)


class BatchAppends:
    """Mixed into SegmentLog: uses its lock, condition, open segment and group commit, declared
    here (SegmentLog sets them) so that this half of the class is checked on its own."""

    _lock: threading.Lock
    _cond: threading.Condition
    _fd: int | None
    _active: Segment | None
    _size: int
    _written: int
    _synced: int
    _sync_busy: bool
    broken: str | None
    bytes_written: int
    segment_bytes: int
    fsync_policy: str

    def _room_for(self, total: int) -> None: ...

    def _undo(self, start: int, cause: OSError) -> None: ...

    def sync_to(self, lsn: int) -> None: ...

    def _init_writeback(self) -> None:
        self._flusher: threading.Thread | None = None  # background writeback (``_maybe_writeback``)
        self._writeback_wanted = False
        self._closing = False

    def _stop_writeback(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._flusher is not None:
            self._flusher.join(30)

    def append_many(self, rtype: int, records: list[list[bytes | memoryview]]) -> list[Location]:
        """Append records of one type (each one's body its last part) with as few ``writev`` calls
        as the segment size and IOV_MAX allow; their locations, in order. On an error, the ones
        of the failing write are truncated away and those written before it stay (never made
        live by the caller: garbage for the compactor), as a loop of ``append`` would leave them."""
        staged = []
        for parts in records:  # (a loop over every chunk of a save: kept to plain statements)
            length = body = 0
            for p in parts:
                body = len(p) if type(p) is bytes else memoryview(p).nbytes
                length += body
            staged.append((encode_header(rtype, length, payload_checksum(parts)), parts, HEADER_SIZE + length,
                           HEADER_SIZE + length - body))  # fmt: skip
        locs: list[Location] = []
        lsn = 0
        with self._lock:
            i = 0
            while i < len(staged):
                self._room_for(staged[i][2])
                assert self._fd is not None and self._active is not None
                # the run of records that fits in this segment and in one writev
                start, room, iov, j = self._size, self.segment_bytes - self._size, 0, i
                bufs: list[bytes | memoryview] = []
                while j < len(staged) and (j == i or (staged[j][2] <= room and iov + 1 + len(staged[j][1]) <= _IOV)):
                    header, parts, size, _ = staged[j]
                    bufs.append(header)
                    bufs.extend(parts)
                    iov += 1 + len(parts)
                    room -= size
                    j += 1
                run = sum(x[2] for x in staged[i:j])
                try:
                    write_all(self._fd, bufs, run)
                except OSError as e:
                    self._undo(start, e)
                    raise storage_error(e, f"appending {j - i} records of {run} bytes") from e
                at = start
                for _, _, size, body_offset in staged[i:j]:
                    locs.append(Location(self._active.id, at, size, body_offset))
                    at += size
                self._size += run
                self._active.size = self._size
                self._written += run
                self.bytes_written += run
                lsn = self._written
                i = j
        if self.fsync_policy == "always":
            self.sync_to(lsn)
        else:
            self._maybe_writeback()
        return locs

    def _maybe_writeback(self) -> None:
        """Start an fsync in the background once WRITEBACK_BYTES are unsynced, so that the disk
        works while a large save's bytes still arrive and its commit's fsync has only the tail
        left. It changes no promise: a commit still waits for an fsync that covers its record."""
        if self.fsync_policy != "manifest" or self._written - self._synced < WRITEBACK_BYTES or self._sync_busy:
            return
        with self._cond:
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._writeback_loop, name="rdmakv-log-writeback",
                                                 daemon=True)  # fmt: skip
                self._flusher.start()
            self._writeback_wanted = True
            self._cond.notify_all()

    def _writeback_loop(self) -> None:
        while True:
            with self._cond:
                while not self._writeback_wanted and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                self._writeback_wanted = False
                target = self._written
            try:
                self.sync_to(target)
            except StorageError as e:  # its pages may now count as clean: acknowledge nothing more
                self.broken = self.broken or f"a background fsync failed ({e})"

