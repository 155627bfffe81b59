"""Chunk payloads (pure: bytes in, objects out): key lists, EXISTS bitmaps, PUT_CHUNKS and the
GET_CHUNKS reply, and the verification of a chunk against its key or the store's check of it.

Bulk data (chunk bytes) is returned as memoryviews of the frame; lengths are checked against the
buffer before anything is sliced or allocated.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import cast

import numpy as np

from ..errors import CodecError, IntegrityError
from ..hashing import (
    CHECK_DTYPES,
    HASH_BLAKE3_256,
    HASH_XXH3_64,
    KEY_BYTES,
    KEY_OPAQUE_BLAKE3,
    KEY_OPAQUE_XXH3,
    OPAQUE_MAX,
    Check,
    Key,
    is_opaque,
    key_alg,
    key_dtype,
    key_hex,
    keys_array,
    verified,
)
from .codec import U8, U32, Reader

MAX_KEYS = 1 << 22


def verify_chunk(key: Key, data: bytes | memoryview, length: int | None = None, check: Check | None = None) -> None:
    """Raise IntegrityError unless ``data`` (of ``length`` bytes, when given) is the chunk ``key``
    names: it hashes to a content key (xxh3-64 for an int, BLAKE3-256 for 32 bytes), or to the
    ``check`` the store keeps beside an opaque key."""
    if (length is not None and memoryview(data).nbytes != length) or not verified(key, data, check):
        raise IntegrityError(f"chunk {key_hex(key)} failed verification: bytes do not match its key")


def alg_of(keys: np.ndarray | Sequence[Key]) -> int:
    """The hash_alg of a key list (all its keys are of one kind)."""
    if isinstance(keys, np.ndarray):
        if keys.dtype == key_dtype(HASH_BLAKE3_256):
            return HASH_BLAKE3_256
        if keys.dtype == key_dtype(KEY_OPAQUE_XXH3):
            return key_alg(keys[:1].tobytes()) if len(keys) else KEY_OPAQUE_XXH3
        return HASH_XXH3_64
    return key_alg(next(iter(keys))) if keys else HASH_XXH3_64


def check_opaque(keys: np.ndarray, alg: int) -> None:
    """CodecError unless every opaque key is well formed: its length byte says 1..64 and its check
    kind (the 0x80 bit) matches ``alg``, and its padding is zero (so one key has one spelling)."""
    if not is_opaque(alg) or not len(keys):
        return
    raw = np.frombuffer(np.ascontiguousarray(keys).tobytes(), dtype=np.uint8).reshape(len(keys), -1)
    lengths = raw[:, 0] & 0x7F
    flags = raw[:, 0] & 0x80
    want_flag = 0x80 if alg == KEY_OPAQUE_BLAKE3 else 0
    if lengths.min() < 1 or lengths.max() > OPAQUE_MAX or np.any(flags != want_flag):
        raise CodecError(f"malformed opaque key (length byte out of 1..{OPAQUE_MAX}, or the wrong check kind)")
    pad = np.arange(1, raw.shape[1])[None, :] > lengths[:, None]
    if np.any(raw[:, 1:][pad]):
        raise CodecError("malformed opaque key (nonzero padding after its length)")


def _alg(r: Reader) -> int:
    alg = r.u8()
    if alg not in KEY_BYTES:
        raise CodecError(f"unknown hash_alg {alg} in a key list")
    return alg


# -- key lists: u8 hash_alg | u32 n | n keys (8, 32 or 65 bytes each) ----------------
def enc_keys(keys: np.ndarray | Sequence[Key], alg: int | None = None) -> bytes:
    alg = alg or alg_of(keys)
    arr = keys_array(keys, alg)
    return U8.pack(alg) + U32.pack(len(arr)) + arr.tobytes()


def read_keys(r: Reader, max_keys: int) -> np.ndarray:
    alg = _alg(r)
    n = r.u32()
    if n > max_keys:
        raise CodecError(f"{n} keys in one request exceeds {max_keys}")
    keys = r.array(key_dtype(alg), n)
    check_opaque(keys, alg)
    return keys


def dec_keys(data: bytes | memoryview, max_keys: int = MAX_KEYS) -> np.ndarray:
    r = Reader(data)
    keys = read_keys(r, max_keys)
    r.end()
    return keys


def enc_bitmap(flags: np.ndarray) -> bytes:
    return U32.pack(len(flags)) + np.packbits(flags.astype(bool)).tobytes()


def dec_bitmap(data: bytes | memoryview) -> np.ndarray:
    r = Reader(data)
    n = r.u32()
    bits = r.array(np.dtype("u1"), (n + 7) // 8)
    r.end()
    return np.unpackbits(bits, count=n).astype(bool)


def _entry_dtype(alg: int) -> np.dtype:
    return np.dtype([("key", key_dtype(alg)), ("length", "<u4")])


def served_dtype(alg: int) -> np.dtype:
    """A GET_CHUNKS reply's entry: key and length, and for an opaque key the store's check."""
    if is_opaque(alg):
        return np.dtype([("key", key_dtype(alg)), ("length", "<u4"), ("check", CHECK_DTYPES[alg])])
    return _entry_dtype(alg)


def _check_value(alg: int, check: Check | None) -> Check:
    if check is None:
        raise CodecError("an opaque key's chunk needs the store's check")
    return check


# -- PUT_CHUNKS: u8 alg | u32 n | (key, u32 length)[n] | chunk bytes -----------------
def enc_put_chunks(keys: Sequence[Key], chunks: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    alg = alg_of(keys)
    table = np.empty(len(keys), dtype=_entry_dtype(alg))
    table["key"] = keys_array(keys, alg)
    table["length"] = [memoryview(c).nbytes for c in chunks]
    return [U8.pack(alg) + U32.pack(len(keys)) + table.tobytes(), *chunks]


def dec_put_chunks(data: bytes | memoryview) -> list[tuple[Key, memoryview]]:
    r = Reader(data)
    alg = _alg(r)
    n = r.u32()
    if n > MAX_KEYS:
        raise CodecError(f"{n} chunks in one PUT_CHUNKS exceeds {MAX_KEYS}")
    table = r.array(_entry_dtype(alg), n)
    check_opaque(table["key"], alg)
    if int(table["length"].sum(dtype=np.uint64)) != len(r.data) - r.pos:
        raise CodecError("PUT_CHUNKS lengths do not add up to the payload size")
    out = []
    for key, length in zip(table["key"].tolist(), table["length"].tolist()):
        if length == 0:
            raise CodecError("zero-length chunk")
        out.append((key, r.take(length)))
    r.end()
    return out


def enc_put_result(stored: int, existed: int) -> bytes:
    return U32.pack(stored) + U32.pack(existed)


def dec_put_result(data: bytes | memoryview) -> tuple[int, int]:
    r = Reader(data)
    out = (r.u32(), r.u32())
    r.end()
    return out


# -- GET_CHUNKS response: u8 alg | u32 n | u32 m | n entries (key, length[, check]) | m absent keys
# | the bytes. A reply carries as many chunks as fit in the frame limit (at least one, which may then
# travel in continuation frames); keys it neither serves nor reports absent are asked for again. An
# opaque key's entry carries the store's check of its bytes, which the client verifies them against.
Served = tuple[Key, int, Check | None]  # (key, length, check: None for content keys)


def enc_chunks(
    served: Sequence[tuple[Key, bytes | memoryview]],
    absent: Sequence[Key],
    alg: int,
    payload: Sequence[bytes | memoryview] | None = None,
    checks: Sequence[Check | None] | None = None,
) -> list[bytes | memoryview]:
    """``payload``: the served chunks' bytes in order, in as few pieces as the caller has them;
    ``checks``: for opaque keys, the store's check of each served chunk."""
    table = np.empty(len(served), dtype=served_dtype(alg))
    table["key"] = keys_array([k for k, _ in served], alg)
    table["length"] = [memoryview(c).nbytes for _, c in served]
    if is_opaque(alg):
        if checks is None or len(checks) != len(served):
            raise CodecError("GET_CHUNKS reply of opaque keys without a check for each chunk")
        vals = [_check_value(alg, c) for c in checks]
        table["check"] = vals if alg == KEY_OPAQUE_XXH3 else np.frombuffer(b"".join(cast(list[bytes], vals)), "V32")
    head = U8.pack(alg) + U32.pack(len(served)) + U32.pack(len(absent)) + table.tobytes()
    body = payload if payload is not None else [c for _, c in served]
    return [head, keys_array(absent, alg).tobytes(), *body]


def struct_u32x2(data: bytes | memoryview) -> tuple[int, int]:
    return struct.unpack("<II", data)


def chunk_table_size(alg: int, n: int, m: int) -> int:
    """Bytes of a GET_CHUNKS reply's entries and absent keys (after its 9-byte head)."""
    return n * served_dtype(alg).itemsize + m * KEY_BYTES[alg]


def _served(entries: np.ndarray, alg: int) -> list[Served]:
    keys, lengths = entries["key"].tolist(), entries["length"].tolist()
    if not is_opaque(alg):
        return [(k, ln, None) for k, ln in zip(keys, lengths)]
    return list(zip(keys, lengths, entries["check"].tolist()))


def dec_chunk_table(alg: int, n: int, m: int, table: bytes | memoryview) -> tuple[list[Served], list[Key]]:
    """The (key, length, check) entries and absent keys of a GET_CHUNKS reply whose table was read apart."""
    if alg not in KEY_BYTES or n > MAX_KEYS or m > MAX_KEYS:
        raise CodecError("GET_CHUNKS reply table out of range")
    r = Reader(table)
    entries = r.array(served_dtype(alg), n)
    absent = r.array(key_dtype(alg), m)
    r.end()
    check_opaque(entries["key"], alg)
    check_opaque(absent, alg)
    return _served(entries, alg), absent.tolist()


def dec_chunks(data: bytes | memoryview) -> tuple[list[tuple[Key, memoryview, Check | None]], list[Key]]:
    """(served (key, bytes, check) triples, absent keys)."""
    r = Reader(data)
    alg = _alg(r)
    n, m = r.u32(), r.u32()
    if n > MAX_KEYS or m > MAX_KEYS:
        raise CodecError("GET_CHUNKS reply lists too many keys")
    table = r.array(served_dtype(alg), n)
    absent = r.array(key_dtype(alg), m)
    check_opaque(table["key"], alg)
    check_opaque(absent, alg)
    if int(table["length"].sum(dtype=np.uint64)) != len(r.data) - r.pos:
        raise CodecError("GET_CHUNKS reply lengths do not add up to its size")
    served = [(k, r.take(ln), c) for k, ln, c in _served(table, alg)]
    r.end()
    return served, absent.tolist()
