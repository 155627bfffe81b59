"""Payload codecs for each operation (pure: bytes in, objects out).

Every decoder checks lengths against the buffer before slicing, so a malformed payload raises
``CodecError`` and never an IndexError or a huge allocation. The chunk payloads (key lists,
PUT_CHUNKS, GET_CHUNKS) are in ``chunk_messages`` and the location tables in ``locations``; their
names are re-exported here, so callers import one module for every operation.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import CodecError
from ..hashing import KEY_BYTES, Key, key_hex
from .chunk_messages import (
    MAX_KEYS,
    Served,
    alg_of,
    check_opaque,
    chunk_table_size,
    dec_bitmap,
    dec_chunk_table,
    dec_chunks,
    dec_keys,
    dec_put_chunks,
    dec_put_result,
    enc_bitmap,
    enc_chunks,
    enc_keys,
    enc_put_chunks,
    enc_put_result,
    served_dtype,
    struct_u32x2,
    verify_chunk,
)
from .codec import MAX_NAME, U8, U16, U32, Reader, enc_name, read_name, validate_name, validate_namespace
from .locations import LOCATION_DTYPE, NO_REGION, Locations, dec_locations, make_regions

__all__ = [  # what this module offers, its own and re-exported
    "KEY_BYTES", "LOCATION_DTYPE", "MAX_ERROR_KEYS", "MAX_KEYS", "MAX_NAME", "MAX_NAMES", "NO_REGION",
    "CodecError", "Key", "Locations", "Reader", "SaveOptions", "Served", "alg_of", "check_opaque",
    "chunk_table_size", "dec_bitmap", "dec_chunk_table", "dec_chunks", "dec_keys", "dec_locations",
    "dec_put_chunks", "dec_put_result", "enc_bitmap", "enc_chunks", "enc_keys", "enc_name", "enc_put_chunks",
    "enc_put_result", "key_hex", "make_regions", "served_dtype", "struct_u32x2", "validate_name",
    "validate_namespace", "verify_chunk",
]  # fmt: skip

MAX_ERROR_KEYS = 1 << 12  # an error frame lists at most this many missing keys


# -- manifests -------------------------------------------------------------------------
PUT_PIN = 1
PUT_RESERVE = 2  # missing chunks: reserve slots the client then WRITEs by RDMA (wire.writes)
PUT_OPTIONS = struct.Struct("<BQ")  # flags (PUT_PIN, PUT_RESERVE), TTL in milliseconds (0 = none)
MAX_TTL_MS = 10 * 365 * 86400 * 1000


@dataclass(frozen=True)
class SaveOptions:
    pin: bool = False
    ttl: float = 0.0  # seconds; 0 = never expires
    reserve: bool = False  # answer missing chunks with a write reservation when RDMA can take them


def enc_put_manifest(name: str, manifest: bytes, options: SaveOptions | None = None) -> list[bytes | memoryview]:
    options = options or SaveOptions()
    ttl_ms = round(options.ttl * 1000)
    if not 0 <= ttl_ms <= MAX_TTL_MS:
        raise CodecError(f"ttl must be between 0 and {MAX_TTL_MS // 1000} seconds, got {options.ttl}")
    flags = (PUT_PIN if options.pin else 0) | (PUT_RESERVE if options.reserve else 0)
    return [enc_name(name) + PUT_OPTIONS.pack(flags, ttl_ms), manifest]


def dec_put_manifest(data: bytes | memoryview) -> tuple[str, memoryview, SaveOptions]:
    r = Reader(data)
    name = read_name(r)
    flags, ttl_ms = PUT_OPTIONS.unpack(r.take(PUT_OPTIONS.size))
    if flags & ~(PUT_PIN | PUT_RESERVE):
        raise CodecError(f"unknown PUT_MANIFEST flags 0x{flags:02x}")
    if ttl_ms > MAX_TTL_MS:
        raise CodecError(f"ttl of {ttl_ms} ms exceeds {MAX_TTL_MS} ms")
    return name, r.rest(), SaveOptions(bool(flags & PUT_PIN), ttl_ms / 1000, bool(flags & PUT_RESERVE))


def enc_manifest_result(missing: np.ndarray) -> bytes:
    return U8.pack(0 if len(missing) == 0 else 1) + enc_keys(missing)


def dec_manifest_result(data: bytes | memoryview) -> np.ndarray:
    r = Reader(data)
    status = r.u8()
    if status == 2:
        raise CodecError("PUT_MANIFEST answered with a write reservation that was not asked for")
    missing = dec_keys(r.rest())
    if (status == 0) != (len(missing) == 0):
        raise CodecError("PUT_MANIFEST result status disagrees with its missing list")
    return missing


GET_WANT_LOCATIONS = 1
# GET_MANIFEST over TCP may ask for the session's chunks to follow its manifest: the server then
# sends, right after the manifest reply and with the same request id, a GET_CHUNKS reply of the
# session's first distinct chunks (in manifest order, up to FOLLOW_BYTES), so that a small
# session is restored in one round trip. The manifest reply says whether one follows (its tier
# byte's FOLLOWS bit). A server that does not know the flag ignores it, and nothing follows.
GET_WITH_CHUNKS = 2
FOLLOWS = 0x80
FOLLOW_BYTES = 8 << 20  # as the client's GET_CHUNKS batches (fallback_tcp DEFAULT_FETCH_BYTES)


def enc_get_manifest(name: str, flags: int = 0) -> bytes:
    return U8.pack(flags) + enc_name(name)


def dec_get_manifest(data: bytes | memoryview) -> tuple[str, int]:
    r = Reader(data)
    flags = r.u8()
    name = read_name(r)
    r.end()
    return name, flags


TIERS = ("memory", "disk")  # where a restore found the session: in the slab, or only in the log


def enc_manifest_reply(
    manifest: bytes, locations: Locations | bytes | None, tier: str = "memory", follows: bool = False
) -> list[bytes | memoryview]:
    """``follows``: a GET_CHUNKS reply to the same request comes next (see GET_WITH_CHUNKS)."""
    if follows and locations is not None:
        raise ValueError("chunks follow a manifest reply without locations only")
    tier_byte = TIERS.index(tier) | (FOLLOWS if follows else 0)
    parts: list[bytes | memoryview] = [U32.pack(len(manifest)), manifest, U8.pack(tier_byte)]
    if locations is not None:
        parts.append(locations if isinstance(locations, bytes) else locations.encode())
    return parts


def dec_manifest_reply(data: bytes | memoryview) -> tuple[memoryview, Locations | None, str, bool]:
    """(manifest, locations or None, tier, whether a GET_CHUNKS reply follows)."""
    r = Reader(data)
    manifest = r.take(r.u32())
    tier = r.u8()
    follows = bool(tier & FOLLOWS)
    tier &= ~FOLLOWS
    if tier >= len(TIERS):
        raise CodecError(f"unknown tier {tier} in a GET_MANIFEST reply")
    locations = None if r.pos == len(r.data) else Locations.decode(r)
    r.end()
    if follows and locations is not None:
        raise CodecError("a GET_MANIFEST reply with locations says chunks follow it")
    return manifest, locations, TIERS[tier], follows


def enc_pin(name: str, pinned: bool) -> bytes:
    return U8.pack(int(pinned)) + enc_name(name)


def dec_pin(data: bytes | memoryview) -> tuple[str, bool]:
    r = Reader(data)
    pinned = r.u8()
    if pinned > 1:
        raise CodecError(f"PIN flag must be 0 or 1, got {pinned}")
    name = read_name(r)
    r.end()
    return name, bool(pinned)



def enc_name_only(name: str) -> bytes:
    return enc_name(name)


def dec_name_only(data: bytes | memoryview) -> str:
    r = Reader(data)
    name = read_name(r)
    r.end()
    return name


# -- HAS_MANIFESTS: u32 n | n x (u8 len | name) -> bitmap ------------------------------
MAX_NAMES = 1 << 16  # names in one HAS_MANIFESTS (a 64 KiB-name request stays well inside a frame)


def enc_names(names: Sequence[str]) -> bytes:
    if len(names) > MAX_NAMES:
        raise CodecError(f"{len(names)} names in one request exceeds {MAX_NAMES}")
    return U32.pack(len(names)) + b"".join(enc_name(n) for n in names)


def dec_names(data: bytes | memoryview, max_names: int = MAX_NAMES) -> list[str]:
    r = Reader(data)
    n = r.u32()
    if n > max_names:
        raise CodecError(f"{n} names in one request exceeds {max_names}")
    names = [read_name(r) for _ in range(n)]
    r.end()
    return names


# -- LIST: u8 prefix_len | prefix | u8 after_len | after (the last name of the previous page) ---
LIST_PAGE = 1000


def enc_list(prefix: str, after: str = "") -> bytes:
    p, a = prefix.encode("utf-8"), after.encode("utf-8")
    if len(p) > MAX_NAME or len(a) > MAX_NAME:
        raise CodecError("LIST prefix and cursor are at most 255 bytes")
    return U8.pack(len(p)) + p + U8.pack(len(a)) + a


def dec_list(data: bytes | memoryview) -> tuple[str, str]:
    r = Reader(data)
    try:
        prefix = bytes(r.take(r.u8())).decode("utf-8")
        after = bytes(r.take(r.u8())).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CodecError("LIST prefix or cursor is not valid UTF-8") from e
    r.end()
    return prefix, after


# -- LIST / STATS / ERROR -------------------------------------------------------------
def enc_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True).encode("utf-8")


def dec_json(data: bytes | memoryview) -> object:
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodecError(f"bad JSON payload: {e}") from e


def enc_error(code: int, message: str, missing: np.ndarray | None = None) -> bytes:
    msg = message.encode("utf-8")[:4000]
    missing = missing if missing is not None else np.zeros(0, np.uint64)
    return U16.pack(code) + U16.pack(len(msg)) + msg + enc_keys(missing[:MAX_ERROR_KEYS])


def dec_error(data: bytes | memoryview) -> tuple[int, str, np.ndarray]:
    r = Reader(data)
    code = r.u16()
    msg = bytes(r.take(r.u16())).decode("utf-8", "replace")
    missing = dec_keys(r.rest())
    return code, msg, missing


# -- handshake: nonce | u16 ns_len | ns | 16-byte key fingerprint | u8 MAC algorithm ---------
def enc_hello(nonce: bytes, namespace: str, fp: bytes, mac: int) -> bytes:
    ns = validate_namespace(namespace)
    if len(fp) != 16:
        raise CodecError("a key fingerprint is 16 bytes")
    return nonce + U16.pack(len(ns)) + ns + fp + U8.pack(mac)


def dec_hello(data: bytes | memoryview, nonce_len: int = 32) -> tuple[bytes, str, bytes, int]:
    """(nonce, namespace, key fingerprint, MAC algorithm)."""
    r = Reader(data)
    nonce = bytes(r.take(nonce_len))
    raw = bytes(r.take(r.u16()))
    fp = bytes(r.take(16))
    mac = r.u8()
    r.end()
    try:
        ns = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CodecError("namespace is not valid UTF-8") from e
    validate_namespace(ns)
    return nonce, ns, fp, mac
