"""Log record codec (pure: bytes in, objects out).

A record is a 24-byte header and a payload::

    magic "RKL2" | u8 type | u8 0 | u16 0 | u32 payload length | u64 xxh3-64(payload)
    | u32 xxh32(the 20 header bytes before it)

The header has a checksum of its own, so after a damaged stretch replay can find the next
intact record (magic + header checksum + sane length) instead of giving up on the rest of
the log. Manifest, tombstone and pin records carry a commit sequence number: replay keeps,
per name, the record with the highest one, so records may sit anywhere in any segment and
the compactor can move them freely.

Payloads (little-endian; ns and name are u16-length-prefixed UTF-8):

- CHUNK     ns | u8 hash_alg | key (8, 32 or 65 bytes) | [check (8 or 32 bytes): opaque keys] | chunk bytes
- MANIFEST  ns | name | u64 seq | u8 flags (1 = pinned) | u64 expires_at_ms (0 = never)
            | u64 committed_at_ms | manifest bytes
- DELETE    ns | name | u64 seq                       (a tombstone)
- PIN       ns | name | u64 seq | u64 manifest seq | u8 pinned

Format 1 (magic "RKLG", rdmakv 0.1) is still read: chunk records are the same, manifest and
delete records had no sequence number (replay numbers them in log order).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import xxhash

from ...errors import CodecError
from ...hashing import (
    HASH_BLAKE3_256,
    HASH_XXH3_64,
    KEY_OPAQUE_BLAKE3,
    KEY_OPAQUE_XXH3,
    OPAQUE_WIDTH,
    key_alg,
    opaque_valid,
)

REC_CHUNK = 1
REC_MANIFEST = 2
REC_DELETE = 3
REC_PIN = 4
TYPES = {REC_CHUNK: "chunk", REC_MANIFEST: "manifest", REC_DELETE: "delete", REC_PIN: "pin"}

MAGIC = b"RKL2"
HEADER = struct.Struct("<4sBBHIQI")
HEADER_SIZE = HEADER.size  # 24
_HEADER_CHECKED = struct.Struct("<4sBBHIQ")  # the first 20 bytes, which the last 4 (xxh32) check
_U32 = struct.Struct("<I")
MAGIC_V1 = b"RKLG"
HEADER_V1 = struct.Struct("<4sBxxxIQ")  # magic, type, payload length, xxh3 of type+length+payload
MAX_PAYLOAD = (1 << 31) - 1
FLAG_PINNED = 1

_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_MANIFEST_META = struct.Struct("<QBQQ")
_PIN_META = struct.Struct("<QQB")


def payload_checksum(parts: list[bytes | memoryview]) -> int:
    h = xxhash.xxh3_64()
    for p in parts:
        h.update(p)
    return h.intdigest()


def encode_header(rtype: int, length: int, checksum: int) -> bytes:
    if not 0 <= length <= MAX_PAYLOAD:
        raise CodecError(f"log record payload of {length} bytes exceeds {MAX_PAYLOAD}")
    head = _HEADER_CHECKED.pack(MAGIC, rtype, 0, 0, length, checksum)
    return head + _U32.pack(xxhash.xxh32_intdigest(head))


@dataclass(frozen=True, slots=True)
class Header:
    rtype: int
    length: int
    checksum: int
    size: int  # header bytes (24, or 20 for format 1)
    v1: bool = False


def decode_header(data: bytes | bytearray | memoryview) -> Header | None:
    """The header at the start of ``data``, or None when these bytes are not an intact header."""
    if len(data) >= HEADER_SIZE and bytes(data[:4]) == MAGIC:
        magic, rtype, z1, z2, length, check, hcheck = HEADER.unpack_from(data)
        if xxhash.xxh32_intdigest(bytes(data[:20])) != hcheck or z1 or z2 or rtype not in TYPES:
            return None
        return Header(rtype, length, check, HEADER_SIZE)
    if len(data) >= HEADER_V1.size and bytes(data[:4]) == MAGIC_V1:
        _, rtype, length, check = HEADER_V1.unpack_from(data)
        if rtype not in (REC_CHUNK, REC_MANIFEST, REC_DELETE) or length > MAX_PAYLOAD:
            return None
        return Header(rtype, length, check, HEADER_V1.size, v1=True)
    return None


def payload_ok(h: Header, payload: bytes | memoryview) -> bool:
    if h.v1:
        x = xxhash.xxh3_64()
        x.update(bytes((h.rtype,)))
        x.update(_U64.pack(len(payload)))
        x.update(payload)
        return x.intdigest() == h.checksum
    return xxhash.xxh3_64_intdigest(payload) == h.checksum


def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def _key(key: int | bytes, check: int | bytes | None) -> bytes:
    if not isinstance(key, bytes):
        return bytes((HASH_XXH3_64,)) + _U64.pack(key)
    if len(key) == 32:
        return bytes((HASH_BLAKE3_256,)) + key
    if len(key) != OPAQUE_WIDTH or not opaque_valid(key):
        raise CodecError("a chunk key is 8, 32 or 65 (opaque) bytes")
    alg = key_alg(key)
    if alg == KEY_OPAQUE_XXH3 and isinstance(check, int):
        return bytes((alg,)) + key + _U64.pack(check)
    if alg == KEY_OPAQUE_BLAKE3 and isinstance(check, bytes) and len(check) == 32:
        return bytes((alg,)) + key + check
    raise CodecError("an opaque key's chunk record needs its check (xxh3-64 or BLAKE3-256 of the bytes)")


def chunk_parts(
    ns: str, key: int | bytes, data: bytes | memoryview, check: int | bytes | None = None
) -> list[bytes | memoryview]:
    return [_str(ns) + _key(key, check), data]


def chunk_records(
    ns: str, keys: Sequence[int | bytes], bodies: Sequence[bytes | memoryview],
    checks: Mapping[int | bytes, int | bytes] | None = None,
) -> list[list[bytes | memoryview]]:  # fmt: skip
    """``chunk_parts`` of a batch in one namespace (its name encoded once)."""
    prefix = _str(ns)
    if checks:
        return [[prefix + _key(k, checks.get(k)), b] for k, b in zip(keys, bodies)]
    return [[prefix + _key(k, None), b] for k, b in zip(keys, bodies)]


def manifest_parts(
    ns: str, name: str, seq: int, manifest: bytes | memoryview, *, pinned: bool, expires_ms: int, committed_ms: int
) -> list[bytes | memoryview]:
    meta = _MANIFEST_META.pack(seq, FLAG_PINNED if pinned else 0, expires_ms, committed_ms)
    return [_str(ns) + _str(name) + meta, manifest]


def delete_parts(ns: str, name: str, seq: int) -> list[bytes | memoryview]:
    return [_str(ns) + _str(name) + _U64.pack(seq)]


def pin_parts(ns: str, name: str, seq: int, manifest_seq: int, pinned: bool) -> list[bytes | memoryview]:
    return [_str(ns) + _str(name) + _PIN_META.pack(seq, manifest_seq, int(pinned))]


@dataclass(slots=True)
class Record:
    """A decoded record. ``body`` is the chunk or manifest bytes, at ``body_offset`` in the payload."""

    rtype: int
    ns: str
    key: int | bytes = 0  # chunks
    check: int | bytes | None = None  # chunks with an opaque key: the check of their bytes
    name: str = ""  # manifests, tombstones, pins
    seq: int = 0  # manifests, tombstones, pins (0 in format 1: numbered by replay)
    pinned: bool = False
    expires_ms: int = 0
    committed_ms: int = 0
    manifest_seq: int = 0  # pins
    body: memoryview | None = None
    body_offset: int = 0


class _Cursor:
    __slots__ = ("data", "pos")

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CodecError("log record payload truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def text(self) -> str:
        raw = bytes(self.take(_U16.unpack(self.take(2))[0]))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CodecError("log record holds a name that is not UTF-8") from e


def decode_payload(h: Header, payload: memoryview) -> Record:
    """Decode a payload whose checksum held; raises CodecError for anything malformed."""
    c = _Cursor(payload)
    ns = c.text()
    if h.rtype == REC_CHUNK:
        if h.v1:
            key: int | bytes = _U64.unpack(c.take(8))[0]
        else:
            alg = c.take(1)[0]
            if alg == HASH_XXH3_64:
                key = _U64.unpack(c.take(8))[0]
            elif alg == HASH_BLAKE3_256:
                key = bytes(c.take(32))
            elif alg in (KEY_OPAQUE_XXH3, KEY_OPAQUE_BLAKE3):
                key = bytes(c.take(OPAQUE_WIDTH))
                if not opaque_valid(key) or key_alg(key) != alg:
                    raise CodecError("chunk record with a malformed opaque key")
                check = _U64.unpack(c.take(8))[0] if alg == KEY_OPAQUE_XXH3 else bytes(c.take(32))
                return Record(REC_CHUNK, ns, key=key, check=check, body=payload[c.pos :], body_offset=c.pos)
            else:
                raise CodecError(f"chunk record with unknown hash_alg {alg}")
        return Record(REC_CHUNK, ns, key=key, body=payload[c.pos :], body_offset=c.pos)
    name = c.text()
    if h.rtype == REC_MANIFEST:
        if h.v1:
            return Record(REC_MANIFEST, ns, name=name, body=payload[c.pos :], body_offset=c.pos)
        seq, flags, expires, committed = _MANIFEST_META.unpack(c.take(_MANIFEST_META.size))
        return Record(
            REC_MANIFEST, ns, name=name, seq=seq, pinned=bool(flags & FLAG_PINNED), expires_ms=expires,
            committed_ms=committed, body=payload[c.pos :], body_offset=c.pos,
        )  # fmt: skip
    if h.rtype == REC_DELETE:
        seq = 0 if h.v1 else _U64.unpack(c.take(8))[0]
        if c.pos != len(payload):
            raise CodecError("trailing bytes in a delete record")
        return Record(REC_DELETE, ns, name=name, seq=seq)
    if h.rtype == REC_PIN:
        seq, mseq, pinned = _PIN_META.unpack(c.take(_PIN_META.size))
        if c.pos != len(payload):
            raise CodecError("trailing bytes in a pin record")
        return Record(REC_PIN, ns, name=name, seq=seq, manifest_seq=mseq, pinned=bool(pinned))
    raise CodecError(f"unknown log record type {h.rtype}")
