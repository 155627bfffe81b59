"""Payload codecs for each operation (pure: bytes in, objects out).

Every decoder checks lengths against the buffer before slicing, so a
malformed payload raises ``CodecError`` and never an IndexError or a huge
allocation. Bulk data (chunk bytes) is returned as memoryviews of the frame.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import CodecError, IntegrityError
from ..hashing import HASH_BLAKE3_256, HASH_XXH3_64, KEY_BYTES, Key, key_dtype, key_hex, keys_array, matches

MAX_NAME = 255
MAX_KEYS = 1 << 22
MAX_ERROR_KEYS = 1 << 12  # an error frame lists at most this many missing keys
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_REGION = np.dtype([("id", "<u4"), ("addr", "<u8"), ("length", "<u8"), ("rkey", "<u4")])
LOCATION_DTYPE = np.dtype([("region", "<u4"), ("offset", "<u8"), ("gen", "<u4"), ("size", "<u4")])
NO_REGION = 0xFFFFFFFF


class Reader:
    """Bounds-checked cursor over a payload."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            have = len(self.data) - self.pos
            raise CodecError(f"payload truncated: need {n} bytes at offset {self.pos}, have {have}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return _U8.unpack(self.take(1))[0]

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def array(self, dtype: np.dtype, count: int) -> np.ndarray:
        return np.frombuffer(self.take(count * np.dtype(dtype).itemsize), dtype=dtype, count=count)

    def rest(self) -> memoryview:
        return self.take(len(self.data) - self.pos)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise CodecError(f"{len(self.data) - self.pos} unexpected trailing bytes in payload")


def validate_name(name: str, what: str = "manifest name") -> bytes:
    """Names and namespaces: 1..255 bytes of UTF-8, printable (no control characters: they would
    let a client inject lines into the server's log)."""
    raw = name.encode("utf-8") if isinstance(name, str) else b""
    if not 0 < len(raw) <= MAX_NAME:
        raise CodecError(f"{what} must be 1..{MAX_NAME} UTF-8 bytes, got {len(raw)}")
    if not name.isprintable():
        raise CodecError(f"{what} contains control or other unprintable characters")
    return raw


def validate_namespace(ns: str) -> bytes:
    raw = validate_name(ns, "namespace")
    if "/" in ns:
        raise CodecError("namespace must not contain '/'")
    return raw


def _name(r: Reader) -> str:
    raw = bytes(r.take(r.u8()))
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CodecError("manifest name is not valid UTF-8") from e
    validate_name(name)
    return name


def enc_name(name: str) -> bytes:
    raw = validate_name(name)
    return _U8.pack(len(raw)) + raw


def verify_chunk(key: Key, data: bytes | memoryview, length: int | None = None) -> None:
    """Raise IntegrityError unless ``data`` (of ``length`` bytes, when given) hashes to ``key``
    (xxh3-64 for an int key, BLAKE3-256 for a 32-byte one)."""
    if (length is not None and memoryview(data).nbytes != length) or not matches(key, data):
        raise IntegrityError(f"chunk {key_hex(key)} failed verification: bytes do not match its key")


def alg_of(keys: np.ndarray | Sequence[Key]) -> int:
    if isinstance(keys, np.ndarray):
        return HASH_BLAKE3_256 if keys.dtype == key_dtype(HASH_BLAKE3_256) else HASH_XXH3_64
    return HASH_BLAKE3_256 if keys and isinstance(next(iter(keys)), bytes) else HASH_XXH3_64


def _alg(r: Reader) -> int:
    alg = r.u8()
    if alg not in KEY_BYTES:
        raise CodecError(f"unknown hash_alg {alg} in a key list")
    return alg


# -- key lists: u8 hash_alg | u32 n | n keys (8 or 32 bytes each) -------------------
def enc_keys(keys: np.ndarray | Sequence[Key], alg: int | None = None) -> bytes:
    alg = alg or alg_of(keys)
    arr = keys_array(keys, alg)
    return _U8.pack(alg) + _U32.pack(len(arr)) + arr.tobytes()


def _keys(r: Reader, max_keys: int) -> np.ndarray:
    alg = _alg(r)
    n = r.u32()
    if n > max_keys:
        raise CodecError(f"{n} keys in one request exceeds {max_keys}")
    return r.array(key_dtype(alg), n)


def dec_keys(data: bytes | memoryview, max_keys: int = MAX_KEYS) -> np.ndarray:
    r = Reader(data)
    keys = _keys(r, max_keys)
    r.end()
    return keys


def enc_bitmap(flags: np.ndarray) -> bytes:
    return _U32.pack(len(flags)) + np.packbits(flags.astype(bool)).tobytes()


def dec_bitmap(data: bytes | memoryview) -> np.ndarray:
    r = Reader(data)
    n = r.u32()
    bits = r.array(np.dtype("u1"), (n + 7) // 8)
    r.end()
    return np.unpackbits(bits, count=n).astype(bool)


def _entry_dtype(alg: int) -> np.dtype:
    return np.dtype([("key", key_dtype(alg)), ("length", "<u4")])


# -- PUT_CHUNKS: u8 alg | u32 n | (key, u32 length)[n] | chunk bytes -----------------
def enc_put_chunks(keys: Sequence[Key], chunks: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    alg = alg_of(keys)
    table = np.empty(len(keys), dtype=_entry_dtype(alg))
    table["key"] = keys_array(keys, alg)
    table["length"] = [memoryview(c).nbytes for c in chunks]
    return [_U8.pack(alg) + _U32.pack(len(keys)) + table.tobytes(), *chunks]


def dec_put_chunks(data: bytes | memoryview) -> list[tuple[Key, memoryview]]:
    r = Reader(data)
    alg = _alg(r)
    n = r.u32()
    if n > MAX_KEYS:
        raise CodecError(f"{n} chunks in one PUT_CHUNKS exceeds {MAX_KEYS}")
    table = r.array(_entry_dtype(alg), n)
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
    return _U32.pack(stored) + _U32.pack(existed)


def dec_put_result(data: bytes | memoryview) -> tuple[int, int]:
    r = Reader(data)
    out = (r.u32(), r.u32())
    r.end()
    return out


# -- GET_CHUNKS response: the served keys (each once), the absent ones, then the bytes ---
# A reply carries as many chunks as fit in the frame limit (at least one, which may then travel
# in continuation frames); keys it neither serves nor reports absent are asked for again.
def enc_chunks(
    served: Sequence[tuple[Key, bytes | memoryview]],
    absent: Sequence[Key],
    alg: int,
    payload: Sequence[bytes | memoryview] | None = None,
) -> list[bytes | memoryview]:
    """``payload``: the served chunks' bytes in order, in as few pieces as the caller has them."""
    table = np.empty(len(served), dtype=_entry_dtype(alg))
    table["key"] = keys_array([k for k, _ in served], alg)
    table["length"] = [memoryview(c).nbytes for _, c in served]
    head = _U8.pack(alg) + _U32.pack(len(served)) + _U32.pack(len(absent)) + table.tobytes()
    body = payload if payload is not None else [c for _, c in served]
    return [head, keys_array(absent, alg).tobytes(), *body]


def struct_u32x2(data: bytes | memoryview) -> tuple[int, int]:
    return struct.unpack("<II", data)


def dec_chunk_table(alg: int, n: int, m: int, table: bytes | memoryview) -> tuple[list[tuple[Key, int]], list[Key]]:
    """The (key, length) entries and absent keys of a GET_CHUNKS reply whose table was read apart."""
    if alg not in KEY_BYTES or n > MAX_KEYS or m > MAX_KEYS:
        raise CodecError("GET_CHUNKS reply table out of range")
    r = Reader(table)
    entries = r.array(_entry_dtype(alg), n)
    absent = r.array(key_dtype(alg), m).tolist()
    r.end()
    return list(zip(entries["key"].tolist(), entries["length"].tolist())), absent


def dec_chunks(data: bytes | memoryview) -> tuple[list[tuple[Key, memoryview]], list[Key]]:
    """(served (key, bytes) pairs, absent keys)."""
    r = Reader(data)
    alg = _alg(r)
    n, m = r.u32(), r.u32()
    if n > MAX_KEYS or m > MAX_KEYS:
        raise CodecError("GET_CHUNKS reply lists too many keys")
    table = r.array(_entry_dtype(alg), n)
    absent = r.array(key_dtype(alg), m).tolist()
    if int(table["length"].sum(dtype=np.uint64)) != len(r.data) - r.pos:
        raise CodecError("GET_CHUNKS reply lengths do not add up to its size")
    served = [(k, r.take(ln)) for k, ln in zip(table["key"].tolist(), table["length"].tolist())]
    r.end()
    return served, absent


# -- manifests -------------------------------------------------------------------------
PUT_PIN = 1
PUT_RESERVE = 2  # missing chunks: reserve slots the client then WRITEs by RDMA (wire.writes)
_PUT_OPTIONS = struct.Struct("<BQ")  # flags (PUT_PIN, PUT_RESERVE), TTL in milliseconds (0 = none)
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
    return [enc_name(name) + _PUT_OPTIONS.pack(flags, ttl_ms), manifest]


def dec_put_manifest(data: bytes | memoryview) -> tuple[str, memoryview, SaveOptions]:
    r = Reader(data)
    name = _name(r)
    flags, ttl_ms = _PUT_OPTIONS.unpack(r.take(_PUT_OPTIONS.size))
    if flags & ~(PUT_PIN | PUT_RESERVE):
        raise CodecError(f"unknown PUT_MANIFEST flags 0x{flags:02x}")
    if ttl_ms > MAX_TTL_MS:
        raise CodecError(f"ttl of {ttl_ms} ms exceeds {MAX_TTL_MS} ms")
    return name, r.rest(), SaveOptions(bool(flags & PUT_PIN), ttl_ms / 1000, bool(flags & PUT_RESERVE))


def enc_manifest_result(missing: np.ndarray) -> bytes:
    return _U8.pack(0 if len(missing) == 0 else 1) + enc_keys(missing)


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


def enc_get_manifest(name: str, flags: int = 0) -> bytes:
    return _U8.pack(flags) + enc_name(name)


def dec_get_manifest(data: bytes | memoryview) -> tuple[str, int]:
    r = Reader(data)
    flags = r.u8()
    name = _name(r)
    r.end()
    return name, flags


@dataclass
class Locations:
    """Where chunks live in the server's registered slab (for one-sided READs)."""

    regions: np.ndarray  # _REGION records: id, addr, length, rkey
    slots: np.ndarray  # LOCATION_DTYPE per requested key; region NO_REGION = not stored

    def encode(self) -> bytes:
        return (
            _U32.pack(len(self.regions))
            + np.ascontiguousarray(self.regions, dtype=_REGION).tobytes()
            + _U32.pack(len(self.slots))
            + np.ascontiguousarray(self.slots, dtype=LOCATION_DTYPE).tobytes()
        )

    @classmethod
    def decode(cls, r: Reader) -> Locations:
        regions = r.array(_REGION, r.u32())
        slots = r.array(LOCATION_DTYPE, r.u32())
        known = set(regions["id"].tolist()) | {NO_REGION}
        if not set(np.unique(slots["region"]).tolist()) <= known:
            raise CodecError("location refers to a region not in the region table")
        return cls(regions, slots)


def make_regions(rows: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    out = np.zeros(len(rows), dtype=_REGION)
    for i, row in enumerate(rows):
        out[i] = row
    return out


TIERS = ("memory", "disk")  # where a restore found the session: in the slab, or only in the log


def enc_manifest_reply(
    manifest: bytes, locations: Locations | bytes | None, tier: str = "memory"
) -> list[bytes | memoryview]:
    parts: list[bytes | memoryview] = [_U32.pack(len(manifest)), manifest, _U8.pack(TIERS.index(tier))]
    if locations is not None:
        parts.append(locations if isinstance(locations, bytes) else locations.encode())
    return parts


def dec_manifest_reply(data: bytes | memoryview) -> tuple[memoryview, Locations | None, str]:
    r = Reader(data)
    manifest = r.take(r.u32())
    tier = r.u8()
    if tier >= len(TIERS):
        raise CodecError(f"unknown tier {tier} in a GET_MANIFEST reply")
    locations = None if r.pos == len(r.data) else Locations.decode(r)
    r.end()
    return manifest, locations, TIERS[tier]


def enc_pin(name: str, pinned: bool) -> bytes:
    return _U8.pack(int(pinned)) + enc_name(name)


def dec_pin(data: bytes | memoryview) -> tuple[str, bool]:
    r = Reader(data)
    pinned = r.u8()
    if pinned > 1:
        raise CodecError(f"PIN flag must be 0 or 1, got {pinned}")
    name = _name(r)
    r.end()
    return name, bool(pinned)


def dec_locations(data: bytes | memoryview) -> Locations:
    r = Reader(data)
    loc = Locations.decode(r)
    r.end()
    return loc


def enc_name_only(name: str) -> bytes:
    return enc_name(name)


def dec_name_only(data: bytes | memoryview) -> str:
    r = Reader(data)
    name = _name(r)
    r.end()
    return name


# -- HAS_MANIFESTS: u32 n | n x (u8 len | name) -> bitmap ------------------------------
MAX_NAMES = 1 << 16  # names in one HAS_MANIFESTS (a 64 KiB-name request stays well inside a frame)


def enc_names(names: Sequence[str]) -> bytes:
    if len(names) > MAX_NAMES:
        raise CodecError(f"{len(names)} names in one request exceeds {MAX_NAMES}")
    return _U32.pack(len(names)) + b"".join(enc_name(n) for n in names)


def dec_names(data: bytes | memoryview, max_names: int = MAX_NAMES) -> list[str]:
    r = Reader(data)
    n = r.u32()
    if n > max_names:
        raise CodecError(f"{n} names in one request exceeds {max_names}")
    names = [_name(r) for _ in range(n)]
    r.end()
    return names


# -- LIST: u8 prefix_len | prefix | u8 after_len | after (the last name of the previous page) ---
LIST_PAGE = 1000


def enc_list(prefix: str, after: str = "") -> bytes:
    p, a = prefix.encode("utf-8"), after.encode("utf-8")
    if len(p) > MAX_NAME or len(a) > MAX_NAME:
        raise CodecError("LIST prefix and cursor are at most 255 bytes")
    return _U8.pack(len(p)) + p + _U8.pack(len(a)) + a


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
    return _U16.pack(code) + _U16.pack(len(msg)) + msg + enc_keys(missing[:MAX_ERROR_KEYS])


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
    return nonce + _U16.pack(len(ns)) + ns + fp + _U8.pack(mac)


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
