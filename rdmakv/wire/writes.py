"""Codec of saves by RDMA WRITE: the reservation a PUT_MANIFEST may answer with, and COMMIT.

A PUT_MANIFEST with ``SaveOptions.reserve`` whose chunks are not all stored may answer status 2:
the missing keys, then a reservation: slots for them as a run in manifest order, reachable
through at most ``MAX_WINDOWS`` memory windows (address, length, rkey), and each missing
chunk's address. The client WRITEs the chunks there and sends COMMIT (reservation id, then the
PUT_MANIFEST payload again); the server closes the windows, checks every chunk and commits.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..errors import CodecError
from .chunk_messages import MAX_KEYS, enc_keys, read_keys
from .codec import Reader

MAX_WINDOWS = 8
STATUS_RESERVED = 2
WINDOW_DTYPE = np.dtype([("addr", "<u8"), ("length", "<u8"), ("rkey", "<u4")])
_HEAD = struct.Struct("<QIH")  # reservation id, expires in ms, number of windows
_ID = struct.Struct("<Q")


@dataclass
class Reservation:
    id: int
    expires_ms: int
    windows: np.ndarray  # WINDOW_DTYPE
    addrs: np.ndarray  # <u8: where each missing chunk goes, in the order of the missing keys

    def window_of(self, addr: int, length: int) -> int:
        """Index of the window holding [addr, addr+length); CodecError when none does."""
        w = self.windows
        inside = (w["addr"] <= addr) & (addr + length <= w["addr"] + w["length"])
        hits = np.flatnonzero(inside)
        if not len(hits):
            raise CodecError(f"reserved address {addr:#x} (+{length}) lies in no window of the reservation")
        return int(hits[0])


def enc_reserved_result(missing: np.ndarray, res: Reservation) -> bytes:
    if len(res.addrs) != len(missing):
        raise CodecError("a reservation needs one address per missing key")
    if not 0 < len(res.windows) <= MAX_WINDOWS:
        raise CodecError(f"a reservation has 1..{MAX_WINDOWS} windows, not {len(res.windows)}")
    return b"".join([
        struct.pack("<B", STATUS_RESERVED), enc_keys(missing),
        _HEAD.pack(res.id, res.expires_ms, len(res.windows)),
        np.ascontiguousarray(res.windows, dtype=WINDOW_DTYPE).tobytes(),
        np.ascontiguousarray(res.addrs, dtype="<u8").tobytes(),
    ])  # fmt: skip


def dec_put_result(data: bytes | memoryview) -> tuple[np.ndarray, Reservation | None]:
    """(missing keys, reservation or None) from any PUT_MANIFEST or COMMIT reply."""
    r = Reader(data)
    status = r.u8()
    if status not in (0, 1, STATUS_RESERVED):
        raise CodecError(f"unknown PUT_MANIFEST result status {status}")
    missing = read_keys(r, MAX_KEYS)
    if (status == 0) != (len(missing) == 0):
        raise CodecError("PUT_MANIFEST result status disagrees with its missing list")
    if status != STATUS_RESERVED:
        r.end()
        return missing, None
    rid, expires_ms, n = _HEAD.unpack(r.take(_HEAD.size))
    if not 0 < n <= MAX_WINDOWS:
        raise CodecError(f"a reservation has 1..{MAX_WINDOWS} windows, not {n}")
    windows = r.array(WINDOW_DTYPE, n)
    addrs = r.array(np.dtype("<u8"), len(missing))
    r.end()
    return missing, Reservation(rid, expires_ms, windows, addrs)


_INDEX = struct.Struct("<QIIH")  # address, rkey, entries, probe
INDEX_INFO_SIZE = _INDEX.size


def enc_index_info(addr: int, rkey: int, entries: int, probe: int = 8) -> bytes:
    """Where a namespace's one-sided lookup index is (the RDMA_CONNECT reply carries it)."""
    return _INDEX.pack(addr, rkey, entries, probe)


def dec_index_info(data: bytes | memoryview) -> tuple[int, int, int, int]:
    if len(data) < _INDEX.size:
        raise CodecError("RDMA_CONNECT reply is shorter than its index description")
    addr, rkey, entries, probe = _INDEX.unpack_from(data)
    if not 0 < probe <= 64 or entries > 1 << 24:
        raise CodecError(f"index of {entries} entries probed {probe} at a time is out of range")
    return addr, rkey, entries, probe


def enc_commit(reservation_id: int, put_manifest_parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    return [_ID.pack(reservation_id), *put_manifest_parts]


def dec_commit(data: bytes | memoryview) -> tuple[int, memoryview]:
    """(reservation id, the PUT_MANIFEST payload that follows it)."""
    if len(data) < _ID.size:
        raise CodecError("COMMIT payload is shorter than its reservation id")
    return _ID.unpack_from(data)[0], memoryview(data)[_ID.size :]
