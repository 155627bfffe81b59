"""Durable append-only segment log (DESIGN §3).

Record = header (magic, type, payload length, xxh3-64 of type+length+payload)
followed by the payload. Chunk records are appended as they arrive; a
manifest record is appended after all of its chunks and, under the default
policy, fsync'd before the commit is acknowledged — fsync of the one open
segment also covers the chunk records before it, and a segment is fsync'd
when it is closed. Replay stops at the first record that is short or fails
its checksum and truncates the file there (a torn tail from a crash).
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ..errors import CodecError

REC_CHUNK = 1
REC_MANIFEST = 2
REC_DELETE = 3
_HEAD = struct.Struct("<4sBxxxIQ")  # magic, type, payload length, checksum
_MAGIC = b"RKLG"
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
FSYNC_POLICIES = ("manifest", "always", "never")
DEFAULT_SEGMENT_BYTES = 256 << 20
MAX_RECORD = 1 << 31


def _checksum(rtype: int, parts: list[bytes | memoryview]) -> int:
    h = xxhash.xxh3_64()
    h.update(bytes((rtype,)))
    h.update(_U64.pack(sum(memoryview(p).nbytes for p in parts)))
    for p in parts:
        h.update(p)
    return h.intdigest()


def chunk_parts(ns: str, key: int, data: bytes | memoryview) -> list[bytes | memoryview]:
    nsb = ns.encode("utf-8")
    return [_U16.pack(len(nsb)) + nsb + _U64.pack(key), data]


def manifest_parts(ns: str, name: str, manifest: bytes | memoryview) -> list[bytes | memoryview]:
    nsb, nb = ns.encode("utf-8"), name.encode("utf-8")
    return [_U16.pack(len(nsb)) + nsb + _U16.pack(len(nb)) + nb, manifest]


def delete_parts(ns: str, name: str) -> list[bytes | memoryview]:
    nsb, nb = ns.encode("utf-8"), name.encode("utf-8")
    return [_U16.pack(len(nsb)) + nsb + _U16.pack(len(nb)) + nb]


@dataclass
class Record:
    rtype: int
    ns: str
    key: int  # chunks
    name: str  # manifests, deletes
    body: memoryview  # chunk data or manifest bytes
    segment: Path
    data_offset: int  # file offset of ``body`` (to re-read chunk data later)


def parse_record(rtype: int, payload: memoryview) -> tuple[str, int, str, memoryview, int]:
    """(ns, key, name, body, body offset within payload); raises CodecError."""
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if pos + n > len(payload):
            raise CodecError("log record payload truncated")
        out = payload[pos : pos + n]
        pos += n
        return out

    ns = bytes(take(_U16.unpack(take(2))[0])).decode("utf-8")
    if rtype == REC_CHUNK:
        key = _U64.unpack(take(8))[0]
        return ns, key, "", payload[pos:], pos
    if rtype in (REC_MANIFEST, REC_DELETE):
        name = bytes(take(_U16.unpack(take(2))[0])).decode("utf-8")
        return ns, 0, name, payload[pos:], pos
    raise CodecError(f"unknown log record type {rtype}")


class SegmentLog:
    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        fsync: str = "manifest",
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync_policy = fsync
        self.segment_bytes = segment_bytes
        self._fd: int | None = None
        self._size = 0
        self._seq = 0
        self.bytes_written = 0

    # -- reading ------------------------------------------------------------------------
    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("seg-*.log"))

    def replay(self) -> Iterator[Record]:
        """Every intact record in order; truncates a torn tail (and drops later segments)."""
        segs = self.segments()
        for i, seg in enumerate(segs):
            good_end = yield from self._replay_segment(seg)
            size = seg.stat().st_size
            if good_end < size:
                print(
                    f"rdmakv: {seg.name}: torn or corrupt record at offset {good_end}; "
                    f"truncating {size - good_end} bytes",
                    file=sys.stderr,
                )
                with open(seg, "r+b") as f:
                    f.truncate(good_end)
                    os.fsync(f.fileno())
                for later in segs[i + 1 :]:
                    print(f"rdmakv: dropping {later.name}, written after the damage", file=sys.stderr)
                    later.unlink()
                break

    def _replay_segment(self, seg: Path) -> Iterator[Record]:
        with open(seg, "rb") as f:
            data = f.read()
        view = memoryview(data)
        pos = 0
        while pos + _HEAD.size <= len(data):
            magic, rtype, length, check = _HEAD.unpack_from(data, pos)
            start = pos + _HEAD.size
            if magic != _MAGIC or start + length > len(data):
                break
            payload = view[start : start + length]
            if _checksum(rtype, [payload]) != check:
                break
            try:
                ns, key, name, body, off = parse_record(rtype, payload)
            except (CodecError, UnicodeDecodeError):
                break
            yield Record(rtype, ns, key, name, body, seg, start + off)
            pos = start + length
        return pos

    def read_at(self, segment: Path, offset: int, length: int) -> bytes:
        with open(segment, "rb") as f:
            return os.pread(f.fileno(), length, offset)

    # -- writing ------------------------------------------------------------------------
    def open_for_append(self) -> None:
        segs = self.segments()
        self._seq = int(segs[-1].stem.split("-")[1]) if segs else 0
        if segs and segs[-1].stat().st_size < self.segment_bytes:
            self._open(segs[-1])
        else:
            self._rotate()

    def _open(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        if self._fd is not None:
            if self.fsync_policy != "never":
                os.fsync(self._fd)
            os.close(self._fd)
        self._seq += 1
        self._open(self.dir / f"seg-{self._seq:08d}.log")
        if self.fsync_policy != "never":
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def append(self, rtype: int, parts: list[bytes | memoryview], *, durable: bool = False) -> None:
        if self._fd is None:
            self.open_for_append()
        length = sum(memoryview(p).nbytes for p in parts)
        if length >= MAX_RECORD:
            raise ValueError("log record too large")
        if self._size + _HEAD.size + length > self.segment_bytes and self._size > 0:
            self._rotate()
        head = _HEAD.pack(_MAGIC, rtype, length, _checksum(rtype, parts))
        buffers = [head, *parts]
        total = _HEAD.size + length
        written = os.writev(self._fd, buffers)
        if written != total:  # short write: finish it so the record is whole
            rest = b"".join(bytes(b) for b in buffers)[written:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]
        self._size += total
        self.bytes_written += total
        if self.fsync_policy == "always" or (durable and self.fsync_policy == "manifest"):
            os.fsync(self._fd)

    def sync(self) -> None:
        if self._fd is not None and self.fsync_policy != "never":
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.segments())
