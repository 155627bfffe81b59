"""Wire layout of the one-sided lookup index and its blobs (the server writes them into
registered memory, clients READ them): entries, the name hash, checksums, the blob codec."""

from __future__ import annotations

import struct

import numpy as np
import xxhash

INDEX_ENTRIES = 4096  # names per namespace that can be looked up one-sidedly; the rest use TCP
PROBE = 8  # entries a lookup READs (one READ of 512 bytes)
ENTRY = np.dtype([
    ("version", "<u8"), ("hash", "V16"), ("addr", "<u8"), ("length", "<u4"), ("rkey", "<u4"),
    ("blob_xxh3", "<u8"), ("reserved", "<u8"), ("check", "<u8"),
])  # fmt: skip
assert ENTRY.itemsize == 64
_BLOB_HEAD = struct.Struct("<HI")  # name length, manifest length


def name_hash(name: str) -> bytes:
    return xxhash.xxh3_128_digest(name.encode())


def home(h: bytes, entries: int = INDEX_ENTRIES) -> int:
    return int.from_bytes(h[:8], "little") % entries


def entry_check(raw: bytes | memoryview) -> int:
    """Checksum of an entry's first 56 bytes (version included)."""
    return xxhash.xxh3_64_intdigest(bytes(raw)[:56])


def enc_blob(name: str, manifest: bytes, locations: bytes) -> bytes:
    n = name.encode()
    return _BLOB_HEAD.pack(len(n), len(manifest)) + n + manifest + locations


def dec_blob(blob: bytes | memoryview) -> tuple[str, memoryview, memoryview]:
    """(name, manifest, encoded locations); ValueError when the blob does not parse."""
    view = memoryview(blob)
    if len(view) < _BLOB_HEAD.size:
        raise ValueError("blob shorter than its header")
    n, m = _BLOB_HEAD.unpack_from(view)
    at = _BLOB_HEAD.size
    if at + n + m > len(view):
        raise ValueError("blob shorter than its name and manifest")
    return bytes(view[at : at + n]).decode(), view[at + n : at + n + m], view[at + n + m :]
