"""Manifest container codec (pure: bytes in, objects out).

A manifest is the small, name-addressed description of a stored object: a
kind-specific *body* plus the ordered *chunk table* (key, length, tag). The
server only needs the container (it checks that every key is present); the
client interprets the body. Kinds: KV sessions (``rdmakv.wire.chunking``), opaque
blobs, llama.cpp slot files (``rdmakv.llama.slotfile``) and engine manifests (kv_store_v1).

Layout, little-endian, no padding::

    magic "RKVM" | u8 version | u8 kind | u8 hash_alg | u8 flags(0)
    u32 body_len | u32 n_chunks | body | n_chunks x (key, u32 length, u64 tag)
    u64 xxh3-64 of everything before it

A key is 8 bytes (xxh3-64, little-endian), 32 (BLAKE3-256), or 65 for an engine's opaque key (a
length byte and up to 64 bytes, zero-padded; ``rdmakv.hashing``), as ``hash_alg`` says. A body may
be empty.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import xxhash

from ..errors import CodecError, ManifestError
from ..hashing import HASH_NAMES, HASH_XXH3_64, key_dtype, keys_array
from .chunk_messages import check_opaque

MAGIC = b"RKVM"
VERSION = 1
KIND_KV = 1
KIND_OPAQUE = 2
KIND_SLOTFILE = 3
KIND_ENGINE = 4  # an engine's own manifest (kv_store_v1), opaque to rdmakv, over the chunks put with it
KIND_PART = 5  # one node's part of a cluster session: its chunks; on the name's nodes the whole manifest as body
KIND_NAMES = {KIND_KV: "kv", KIND_OPAQUE: "opaque", KIND_SLOTFILE: "slotfile", KIND_ENGINE: "engine",
              KIND_PART: "part"}  # fmt: skip

MAX_CHUNKS = 1 << 20  # a 16k-token session at W=8 has ~100k; each entry costs the server memory
MAX_BODY = 64 << 20
MAX_CHUNK_LEN = 1 << 31

_HEADER = struct.Struct("<4sBBBBII")
_TRAILER = struct.Struct("<Q")
CHUNK_DTYPE = np.dtype([("key", "<u8"), ("length", "<u4"), ("tag", "<u8")])


def chunk_dtype(hash_alg: int) -> np.dtype:
    """The chunk table's record for a hash_alg (its key width)."""
    if hash_alg == HASH_XXH3_64:
        return CHUNK_DTYPE
    return np.dtype([("key", key_dtype(hash_alg)), ("length", "<u4"), ("tag", "<u8")])


def packed_offsets(lengths: np.ndarray) -> np.ndarray:
    """Offset of each chunk of ``lengths`` when they are laid back to back."""
    offsets = np.zeros(len(lengths), dtype=np.uint64)
    if len(lengths):
        offsets[1:] = np.cumsum(lengths[:-1], dtype=np.uint64)
    return offsets


@dataclass(eq=False)
class Manifest:
    kind: int
    body: bytes
    keys: np.ndarray  # uint64
    lengths: np.ndarray  # uint32
    tags: np.ndarray  # uint64
    hash_alg: int = HASH_XXH3_64
    _encoded: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.hash_alg not in HASH_NAMES:
            raise ManifestError(f"unsupported hash_alg {self.hash_alg} (supported: {HASH_NAMES})")
        self.keys = keys_array(self.keys, self.hash_alg)
        self.lengths = np.ascontiguousarray(self.lengths, dtype=np.uint32)
        self.tags = np.ascontiguousarray(self.tags, dtype=np.uint64)
        if not (len(self.keys) == len(self.lengths) == len(self.tags)):
            raise ManifestError("chunk table columns differ in length")

    @property
    def n_chunks(self) -> int:
        return len(self.keys)

    @property
    def total_bytes(self) -> int:
        return int(self.lengths.sum(dtype=np.uint64))

    def packed_offsets(self) -> np.ndarray:
        """Offset of each chunk when the chunks are laid back to back in manifest order."""
        return packed_offsets(self.lengths)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return encode(self) == encode(other)

    def encode(self) -> bytes:
        return encode(self)


def encode(m: Manifest) -> bytes:
    if m._encoded is not None:
        return m._encoded
    _check_header_fields(m.kind, m.hash_alg, len(m.body), m.n_chunks)
    table = np.empty(m.n_chunks, dtype=chunk_dtype(m.hash_alg))
    table["key"] = m.keys
    table["length"] = m.lengths
    table["tag"] = m.tags
    head = _HEADER.pack(MAGIC, VERSION, m.kind, m.hash_alg, 0, len(m.body), m.n_chunks)
    out = b"".join((head, m.body, table.tobytes()))
    out += _TRAILER.pack(xxhash.xxh3_64_intdigest(out))
    m._encoded = out
    return out


def decode(data: bytes | memoryview) -> Manifest:
    """Decode and validate the container; raises ManifestError on any defect."""
    data = bytes(data)
    if len(data) < _HEADER.size + _TRAILER.size:
        raise ManifestError(f"manifest too short ({len(data)} bytes)")
    magic, version, kind, hash_alg, flags, body_len, n_chunks = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ManifestError(f"not a manifest (magic {magic!r})")
    if version != VERSION:
        raise ManifestError(f"unsupported manifest version {version} (this build reads {VERSION})")
    if flags != 0:
        raise ManifestError(f"unknown manifest flags 0x{flags:02x}")
    _check_header_fields(kind, hash_alg, body_len, n_chunks)
    dtype = chunk_dtype(hash_alg)
    expected = _HEADER.size + body_len + n_chunks * dtype.itemsize + _TRAILER.size
    if len(data) != expected:
        raise ManifestError(f"manifest length {len(data)} != {expected} declared by its header")
    (check,) = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    if xxhash.xxh3_64_intdigest(memoryview(data)[: -_TRAILER.size]) != check:
        raise ManifestError("manifest checksum mismatch (corrupted or truncated)")
    body = data[_HEADER.size : _HEADER.size + body_len]
    table = np.frombuffer(data, dtype=dtype, count=n_chunks, offset=_HEADER.size + body_len)
    lengths = table["length"].copy()
    try:
        check_opaque(table["key"], hash_alg)
    except CodecError as e:
        raise ManifestError(f"manifest chunk table: {e}") from None
    if n_chunks and int(lengths.min()) == 0:
        raise ManifestError("manifest has a zero-length chunk")
    m = Manifest(kind, body, table["key"].copy(), lengths, table["tag"].copy(), hash_alg)
    m._encoded = data
    return m


def keys_view(data: bytes | memoryview) -> np.ndarray:
    """The chunk table's keys of an encoded manifest, as a view of ``data`` (no copy): for bytes
    that were decoded once already (a committed manifest the store keeps)."""
    _, _, _, hash_alg, _, body_len, n_chunks = _HEADER.unpack_from(data)
    table = np.frombuffer(data, dtype=chunk_dtype(hash_alg), count=n_chunks, offset=_HEADER.size + body_len)
    return table["key"]


def distinct_keys(m: Manifest) -> tuple[np.ndarray, list[int]]:
    """A manifest's distinct keys in first-appearance order and each one's length; ManifestError
    when one key appears with two lengths. Vectorised: a manifest may name 2^20 chunks."""
    if m.n_chunks == 0:
        return m.keys, []
    _, first, inverse = np.unique(m.keys, return_index=True, return_inverse=True)
    if not np.array_equal(m.lengths, m.lengths[first][inverse.ravel()]):
        raise ManifestError("manifest names one chunk key with two different lengths")
    order = np.sort(first)
    return np.ascontiguousarray(m.keys[order]), m.lengths[order].tolist()


def unique_in_order(keys: np.ndarray) -> np.ndarray:
    """The distinct keys, in the order each first appears (a save's slab order)."""
    if len(keys) < 2:
        return np.ascontiguousarray(keys)
    _, first = np.unique(keys, return_index=True)
    return np.ascontiguousarray(keys[np.sort(first)])


def _check_header_fields(kind: int, hash_alg: int, body_len: int, n_chunks: int) -> None:
    if kind not in KIND_NAMES:
        raise ManifestError(f"unknown manifest kind {kind}")
    if hash_alg not in HASH_NAMES:
        raise ManifestError(f"unsupported hash_alg {hash_alg} (supported: {HASH_NAMES})")
    if body_len > MAX_BODY:
        raise ManifestError(f"manifest body of {body_len} bytes exceeds {MAX_BODY}")
    if n_chunks > MAX_CHUNKS:
        raise ManifestError(f"manifest has {n_chunks} chunks, limit {MAX_CHUNKS}")
