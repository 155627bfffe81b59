"""Durable append-only segment log (docs/data-model.md §3, §4): files, appends, group commit, replay.

Records (``records``) are appended to the open segment; a segment is sealed and a new one
opened when it reaches ``segment_bytes``. Durability:

- ``--fsync manifest`` (default): a commit waits until an fsync covers its record. Commits
  that arrive while an fsync runs share the next one (group commit); the fsync runs on a
  duplicate of the segment's descriptor, with no lock held, so appends go on meanwhile. A
  segment is fsync'd when it is sealed, so one fsync of the open segment covers everything.
- ``always``: every append waits for an fsync; ``never``: nothing is fsync'd.

A failed append (ENOSPC, EDQUOT, EFBIG, EIO) truncates the segment back to the last good
record and raises DiskFullError / StorageError: nothing half-written stays in the file to
be mistaken for the end of the log by the next replay.

Replay reads each record's header (which has its own checksum) and payload with bounded
buffers. A damaged stretch is skipped and reported with its segment and offset, and replay
resumes at the next intact header; only a torn tail of the newest segment is truncated.

Compaction (``compactor``) writes live records into a temporary file, fsyncs it, renames it
to a new segment and fsyncs the directory, then retires the old segment; since replay keeps
the highest sequence number per name, a crash at any point leaves a log that replays to the
same state.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import CodecError, StorageError
from .log_batches import BatchAppends
from .log_files import Location, Segment, storage_error, write_all
from .records import HEADER_SIZE, Header, Record, decode_header, decode_payload, encode_header, payload_checksum
from .records import payload_ok as _payload_ok

FSYNC_POLICIES = ("manifest", "always", "never")
DEFAULT_SEGMENT_BYTES = 256 << 20
MIN_SEGMENT_BYTES = 1 << 20
SEGMENT_NAME = re.compile(r"seg-(\d{8})\.log$")
READ_BLOCK = 1 << 20


def segment_bytes_for(disk_capacity: int) -> int:
    """1/16 of the disk budget, between 1 MiB and 256 MiB: compaction needs room to work."""
    return max(MIN_SEGMENT_BYTES, min(DEFAULT_SEGMENT_BYTES, disk_capacity // 16))


@dataclass
class Damage:
    segment: str
    offset: int
    length: int
    what: str

    def __str__(self) -> str:
        return f"{self.segment} offset {self.offset}: {self.what} ({self.length} bytes skipped)"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentLog(BatchAppends):
    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: str = "manifest",
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        on_damage: Callable[[Damage], None] | None = None,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync_policy = fsync
        self.segment_bytes = segment_bytes
        self.on_damage = on_damage or (lambda d: None)
        self.segments: dict[int, Segment] = {}
        self._lock = threading.Lock()  # appends, rotation
        self._cond = threading.Condition()  # group commit
        self._fd: int | None = None
        self._active: Segment | None = None
        self._size = 0
        self._next_id = 1
        self._written = 0  # bytes appended since open (the LSN)
        self._synced = 0
        self._sync_busy = False
        self.broken: str | None = None
        self.bytes_written = 0
        self.fsyncs = 0
        self.on_fsync: Callable[[float], None] | None = None  # seconds of each log fsync (metrics)
        self._init_writeback()

    # -- files ----------------------------------------------------------------------------
    def segment_paths(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.dir.iterdir():
            m = SEGMENT_NAME.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def _path(self, sid: int) -> Path:
        return self.dir / f"seg-{sid:08d}.log"

    def disk_bytes(self) -> int:
        return sum(s.size for s in self.segments.values())

    @property
    def active_id(self) -> int | None:
        return self._active.id if self._active is not None else None

    # -- replay ---------------------------------------------------------------------------
    def replay(self) -> Iterator[tuple[Record, Location]]:
        """Every intact record with its location. Call once, before ``open_for_append``.

        Leftover compaction files are removed; damage is reported through ``on_damage``; a torn
        tail of the newest segment is truncated."""
        for p in self.dir.glob("compact-*.tmp"):
            p.unlink()
        paths = self.segment_paths()
        for i, (sid, path) in enumerate(paths):
            self.segments[sid] = Segment(sid, path)
            self._next_id = max(self._next_id, sid + 1)
            yield from self._replay_segment(self.segments[sid], last=i == len(paths) - 1)

    def _replay_segment(self, seg: Segment, last: bool, raw: bool = False) -> Iterator[Any]:  # (record, loc[, raw])
        reader = _BlockReader(seg)
        pos = 0
        size = seg.size
        while pos < size:
            head = reader.read(pos, HEADER_SIZE)
            h = decode_header(head)
            if h is None or pos + h.size + h.length > size:
                nxt = self._resync(reader, pos + 1, size)
                if nxt is None:
                    if last:
                        self._truncate_tail(seg, pos)
                    else:
                        self.on_damage(Damage(seg.path.name, pos, size - pos, "damaged end of a sealed segment"))
                    return
                self.on_damage(Damage(seg.path.name, pos, nxt - pos, "damaged bytes between records"))
                pos = nxt
                continue
            payload = reader.read(pos + h.size, h.length)
            end = pos + h.size + h.length
            if not _payload_ok(h, payload):
                self.on_damage(Damage(seg.path.name, pos, end - pos, "record fails its checksum"))
                pos = end
                continue
            try:
                rec = decode_payload(h, payload)
            except CodecError as e:
                self.on_damage(Damage(seg.path.name, pos, end - pos, f"undecodable record: {e}"))
                pos = end
                continue
            loc = Location(seg.id, pos, end - pos, h.size + rec.body_offset)
            yield (rec, loc, reader.read(pos, end - pos)) if raw else (rec, loc)
            pos = end

    def _resync(self, reader: _BlockReader, start: int, size: int) -> int | None:
        """Offset of the next intact record header at or after ``start`` (None: there is none)."""
        pos = start
        while pos + HEADER_SIZE <= size:
            block = reader.read(pos, min(READ_BLOCK, size - pos))
            for magic in (b"RKL2", b"RKLG"):
                i = bytes(block).find(magic)
                while i >= 0:
                    at = pos + i
                    h = decode_header(reader.read(at, min(HEADER_SIZE, size - at)))
                    if h is not None and at + h.size + h.length <= size:
                        payload = reader.read(at + h.size, h.length)
                        if _payload_ok(h, payload):
                            return at
                    i = bytes(block).find(magic, i + 1)
            pos += max(1, len(block) - HEADER_SIZE)
        return None

    def _truncate_tail(self, seg: Segment, at: int) -> None:
        self.on_damage(Damage(seg.path.name, at, seg.size - at, "torn tail truncated"))
        with open(seg.path, "r+b") as f:
            f.truncate(at)
            os.fsync(f.fileno())
        seg.size = at

    def _fsync(self, fd: int) -> None:
        t0 = time.perf_counter()
        os.fsync(fd)
        if self.on_fsync is not None:
            self.on_fsync(time.perf_counter() - t0)

    # -- writing --------------------------------------------------------------------------
    def open_for_append(self) -> None:
        with self._lock:
            self._rotate_locked()

    def _room_for(self, total: int) -> None:
        """(under the lock) An open segment with room for ``total`` more bytes (a full one is
        sealed and a new one opened; a record larger than a segment gets a segment of its own)."""
        if self.broken:
            raise StorageError(f"the log is not writable: {self.broken}")
        if self._fd is None:
            self._rotate_locked()
        elif self._size > 0 and self._size + total > self.segment_bytes:
            try:
                self._rotate_locked()
            except OSError as e:
                raise storage_error(e, "opening a new log segment") from e

    def _rotate_locked(self) -> None:
        if self._fd is not None:
            if self.fsync_policy != "never":
                self._fsync(self._fd)
                self.fsyncs += 1
            os.close(self._fd)
            self._fd = None
            with self._cond:
                self._synced = max(self._synced, self._written)
        sid = self._next_id
        self._next_id += 1
        path = self._path(sid)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        self._size = 0
        self._active = self.segments[sid] = Segment(sid, path)
        if self.fsync_policy != "never":
            fsync_dir(self.dir)

    def append(self, rtype: int, parts: list[bytes | memoryview]) -> tuple[Location, int]:
        """Append one record; returns (its location, the LSN to pass to ``sync_to``).

        The record's body (chunk or manifest bytes) is its last part."""
        sizes = [memoryview(p).nbytes for p in parts]
        length = sum(sizes)
        header = encode_header(rtype, length, payload_checksum(parts))
        total = HEADER_SIZE + length
        with self._lock:
            self._room_for(total)
            assert self._fd is not None and self._active is not None
            start = self._size
            try:
                write_all(self._fd, [header, *parts], total)
            except OSError as e:
                self._undo(start, e)
                raise storage_error(e, f"appending a {total}-byte record") from e
            self._size += total
            self._active.size = self._size
            self._written += total
            self.bytes_written += total
            loc = Location(self._active.id, start, total, HEADER_SIZE + length - sizes[-1])
            lsn = self._written
        if self.fsync_policy == "always":
            self.sync_to(lsn)
        return loc, lsn

    def _undo(self, start: int, cause: OSError) -> None:
        fd = self._fd
        assert fd is not None  # (a write to it just failed)
        try:
            os.ftruncate(fd, start)
        except OSError as e:
            self.broken = f"a failed append ({cause.strerror}) could not be truncated away ({e.strerror})"

    def sync_to(self, lsn: int) -> None:
        """Return once an fsync covers every byte up to ``lsn`` (group commit: whoever finds no
        fsync running starts one for everything appended so far; the others wait for it).

        Lock order: the append lock may take the condition, never the other way round."""
        if self.fsync_policy == "never":
            return
        while True:
            if self.broken:
                raise StorageError(f"the log cannot be made durable: {self.broken}")
            with self._cond:
                while self._synced < lsn and self._sync_busy:
                    self._cond.wait()
                if self._synced >= lsn:
                    return
                self._sync_busy = True
            err: OSError | None = None
            target = 0
            try:
                with self._lock:
                    target = self._written
                    fd = os.dup(self._fd) if self._fd is not None else None
                if fd is not None:
                    try:
                        self._fsync(fd)
                    finally:
                        os.close(fd)
            except OSError as e:
                err = e
            with self._cond:
                self._sync_busy = False
                if err is None:
                    self.fsyncs += 1
                    self._synced = max(self._synced, target)
                self._cond.notify_all()
            if err is not None:
                raise storage_error(err, "fsync of the log") from err

    def rotate(self) -> None:
        """Seal the open segment (so that compaction can take it) and open a new one."""
        with self._lock:
            self._rotate_locked()

    def segment(self, sid: int) -> Segment:
        seg = self.segments.get(sid)
        if seg is None:
            raise StorageError(f"log segment {sid} is gone")
        return seg

    def read_into(self, loc: Location, dest: memoryview) -> None:
        """A record's body (chunk or manifest bytes) into ``dest``."""
        self.segment(loc.segment).read(loc.body, dest)

    def scan(self, sid: int) -> Iterator[tuple[Record, Location, memoryview]]:
        """The intact records of a sealed segment with their raw bytes (valid until the next)."""
        yield from self._replay_segment(self.segment(sid), last=False, raw=True)

    # -- compaction -----------------------------------------------------------------------
    def new_segment_writer(self) -> SegmentWriter:
        with self._lock:
            sid = self._next_id
            self._next_id += 1
        return SegmentWriter(self, sid)

    def install(self, writer: SegmentWriter) -> Segment:
        path = self._path(writer.id)
        os.rename(writer.tmp, path)
        fsync_dir(self.dir)
        seg = Segment(writer.id, path)
        with self._lock:
            self.segments[seg.id] = seg
        return seg

    def remove(self, sid: int) -> None:
        with self._lock:
            seg = self.segments.pop(sid)
        seg.path.unlink()
        fsync_dir(self.dir)
        seg.retire()

    def close(self) -> None:
        self._stop_writeback()
        with self._lock:
            if self._fd is not None:
                if self.fsync_policy != "never":
                    self._fsync(self._fd)
                os.close(self._fd)
                self._fd = None
        for seg in self.segments.values():
            seg.retire()


class SegmentWriter:
    """A compaction output file: records copied in, fsync'd, then installed as a segment."""

    def __init__(self, log: SegmentLog, sid: int) -> None:
        self.log = log
        self.id = sid
        self.tmp = log.dir / f"compact-{sid:08d}.tmp"
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.size = 0

    def write(self, record: bytes | memoryview) -> int:
        """Append raw record bytes; returns their offset in the new segment."""
        at = self.size
        n = memoryview(record).nbytes
        try:
            write_all(self._fd, [record], n)
        except OSError as e:
            raise storage_error(e, "writing a compacted segment") from e
        self.size += n
        return at

    def finish(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp.unlink(missing_ok=True)


class _BlockReader:
    """Reads of a segment through one reusable buffer (bounded memory, few syscalls)."""

    def __init__(self, seg: Segment) -> None:
        self.seg = seg
        self.buf = bytearray(READ_BLOCK)
        self.start = 0
        self.end = 0

    def read(self, offset: int, n: int) -> memoryview:
        if self.start <= offset and offset + n <= self.end:
            return memoryview(self.buf)[offset - self.start : offset - self.start + n]
        want = min(max(n, READ_BLOCK), self.seg.size - offset)
        if len(self.buf) < want:
            self.buf = bytearray(want)
        view = memoryview(self.buf)[:want]
        self.seg.read(offset, view)
        self.start, self.end = offset, offset + want
        return view[:n]


__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "FSYNC_POLICIES",
    "Damage",
    "Header",
    "Location",
    "Segment",
    "SegmentLog",
    "SegmentWriter",
    "fsync_dir",
    "segment_bytes_for",
]
