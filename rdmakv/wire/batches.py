"""Codecs of the batched manifest operations (pure: bytes in, objects out).

PUT_MANIFESTS commits many manifests in one round trip, each by the same commit-if-all-present
rule as PUT_MANIFEST, and answers one outcome per manifest: committed, missing (the keys it
lacks), or failed (an error code and message for that manifest alone). GET_MANIFESTS looks many
names up in one round trip; with locations asked, the namespace's region table travels once
for the whole reply. Both are bounded: at most ``MAX_BATCH`` items a request, at most
``MAX_BATCH_MISSING`` missing keys listed in one reply (a manifest past that budget says
"missing" with a shorter list, and the client asks again), and a GET_MANIFESTS reply stops at the
server's frame budget (the rest say "not served": ask again, after fetching what was found:
the next lookup lets go of this one's versions).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import CodecError
from ..hashing import CHECK_DTYPES
from .chunk_messages import MAX_KEYS, alg_of, enc_keys, read_keys
from .codec import Reader, enc_name, read_name
from .locations import LOCATION_DTYPE, NO_REGION, REGION_DTYPE
from .messages import MAX_TTL_MS, PUT_OPTIONS, PUT_PIN, SaveOptions

MAX_BATCH = 4096  # manifests (or names) in one PUT_MANIFESTS / GET_MANIFESTS request
MAX_BATCH_MISSING = 1 << 20  # missing keys listed in one PUT_MANIFESTS reply, over all its manifests
MAX_ERROR_TEXT = 1000  # bytes of one manifest's error message

COMMITTED = 0
MISSING = 1
FAILED = 2

FOUND = 0
NOT_FOUND = 1
NOT_SERVED = 2  # the reply was full: ask for this name again
TIERS = ("memory", "disk")
REGION_BYTES = REGION_DTYPE.itemsize  # one row of the region table a GET_MANIFESTS reply ends with

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_ERR = struct.Struct("<HH")


def _count(r: Reader, what: str) -> int:
    n = r.u32()
    if n > MAX_BATCH:
        raise CodecError(f"{n} {what} in one request exceeds {MAX_BATCH}")
    return n


# -- PUT_MANIFESTS: u32 n | n x (name | u8 flags | u64 ttl_ms | u32 len | manifest) ----------
def enc_put_manifests(items: Sequence[tuple[str, bytes | memoryview, SaveOptions]]) -> list[bytes | memoryview]:
    if len(items) > MAX_BATCH:
        raise CodecError(f"{len(items)} manifests in one request exceeds {MAX_BATCH}")
    parts: list[bytes | memoryview] = [_U32.pack(len(items))]
    for name, manifest, opts in items:
        if opts.reserve:
            raise CodecError("PUT_MANIFESTS takes no write reservations (save by PUT_MANIFEST for that)")
        ttl_ms = round(opts.ttl * 1000)
        if not 0 <= ttl_ms <= MAX_TTL_MS:
            raise CodecError(f"ttl must be between 0 and {MAX_TTL_MS // 1000} seconds, got {opts.ttl}")
        head = enc_name(name) + PUT_OPTIONS.pack(PUT_PIN if opts.pin else 0, ttl_ms)
        parts += [head + _U32.pack(memoryview(manifest).nbytes), manifest]
    return parts


def dec_put_manifests(data: bytes | memoryview) -> list[tuple[str, memoryview, SaveOptions]]:
    r = Reader(data)
    out = []
    for _ in range(_count(r, "manifests")):
        name = read_name(r)
        flags, ttl_ms = PUT_OPTIONS.unpack(r.take(PUT_OPTIONS.size))
        if flags & ~PUT_PIN:
            raise CodecError(f"unknown PUT_MANIFESTS flags 0x{flags:02x}")
        if ttl_ms > MAX_TTL_MS:
            raise CodecError(f"ttl of {ttl_ms} ms exceeds {MAX_TTL_MS} ms")
        out.append((name, r.take(r.u32()), SaveOptions(bool(flags & PUT_PIN), ttl_ms / 1000)))
    r.end()
    return out


@dataclass
class Outcome:
    """What PUT_MANIFESTS did with one manifest."""

    status: int  # COMMITTED, MISSING or FAILED
    missing: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    code: int = 0  # FAILED: the error code (docs/protocol.md)
    message: str = ""


def enc_outcomes(outcomes: Sequence[Outcome]) -> list[bytes]:
    """The reply; missing lists past ``MAX_BATCH_MISSING`` keys in all are cut short."""
    budget = MAX_BATCH_MISSING
    parts = [_U32.pack(len(outcomes))]
    for o in outcomes:
        if o.status == COMMITTED:
            parts.append(_U8.pack(COMMITTED))
        elif o.status == MISSING:
            listed = o.missing[:budget]
            budget -= len(listed)
            parts.append(_U8.pack(MISSING) + enc_keys(listed, alg_of(o.missing)))
        elif o.status == FAILED:
            text = o.message.encode("utf-8")[:MAX_ERROR_TEXT]
            parts.append(_U8.pack(FAILED) + _ERR.pack(o.code, len(text)) + text)
        else:
            raise CodecError(f"unknown PUT_MANIFESTS outcome {o.status}")
    return parts


def dec_outcomes(data: bytes | memoryview, expected: int) -> list[Outcome]:
    r = Reader(data)
    n = r.u32()
    if n != expected:
        raise CodecError(f"PUT_MANIFESTS answered {n} manifests of {expected}")
    out = []
    listed = 0
    for _ in range(n):
        status = r.u8()
        if status == COMMITTED:
            out.append(Outcome(COMMITTED))
        elif status == MISSING:
            keys = read_keys(r, MAX_KEYS).copy()
            listed += len(keys)
            if listed > MAX_BATCH_MISSING:
                raise CodecError(f"PUT_MANIFESTS reply lists more than {MAX_BATCH_MISSING} missing keys")
            out.append(Outcome(MISSING, keys))
        elif status == FAILED:
            code, length = _ERR.unpack(r.take(_ERR.size))
            out.append(Outcome(FAILED, code=code, message=bytes(r.take(length)).decode("utf-8", "replace")))
        else:
            raise CodecError(f"unknown PUT_MANIFESTS outcome {status}")
    r.end()
    return out


# -- GET_MANIFESTS: u8 flags | u32 n | names -> per name an entry, then the region table ------
GET_LOCATIONS = 1


def enc_get_manifests(names: Sequence[str], want_locations: bool) -> bytes:
    if len(names) > MAX_BATCH:
        raise CodecError(f"{len(names)} names in one request exceeds {MAX_BATCH}")
    flags = GET_LOCATIONS if want_locations else 0
    return _U8.pack(flags) + _U32.pack(len(names)) + b"".join(enc_name(n) for n in names)


def dec_get_manifests(data: bytes | memoryview) -> tuple[list[str], bool]:
    r = Reader(data)
    flags = r.u8()
    if flags & ~GET_LOCATIONS:
        raise CodecError(f"unknown GET_MANIFESTS flags 0x{flags:02x}")
    names = [read_name(r) for _ in range(_count(r, "names"))]
    r.end()
    return names, bool(flags & GET_LOCATIONS)


@dataclass
class Found:
    """One name of a GET_MANIFESTS reply."""

    status: int  # FOUND, NOT_FOUND or NOT_SERVED
    manifest: bytes = b""
    tier: str = "memory"
    slots: np.ndarray | None = None  # LOCATION_DTYPE per chunk, when locations were asked
    checks: np.ndarray | None = None  # with slots, for opaque keys: the store's check of each chunk
    check_alg: int = 0  # KEY_OPAQUE_XXH3 or KEY_OPAQUE_BLAKE3 when there are checks


def found_size(f: Found) -> int:
    """Bytes ``f`` takes in a reply, its locations apart (for the server's frame budget)."""
    if f.status != FOUND:
        return 1
    located = 0
    if f.slots is not None:
        located = 4 + len(f.slots) * LOCATION_DTYPE.itemsize + 1
        located += len(f.slots) * CHECK_DTYPES[f.check_alg].itemsize if f.check_alg else 0
    return 1 + 4 + len(f.manifest) + 1 + located


def enc_found(items: Sequence[Found], regions: np.ndarray | None) -> list[bytes | memoryview]:
    """The reply; ``regions`` (the namespace's region table) when it carries locations."""
    flags = GET_LOCATIONS if regions is not None else 0
    parts: list[bytes | memoryview] = [_U8.pack(flags) + _U32.pack(len(items))]
    for f in items:
        if f.status != FOUND:
            parts.append(_U8.pack(f.status))
            continue
        if (f.slots is None) != (regions is None):
            raise CodecError("GET_MANIFESTS reply: locations for some names and not others")
        parts += [_U8.pack(FOUND) + _U32.pack(len(f.manifest)), f.manifest, _U8.pack(TIERS.index(f.tier))]
        if f.slots is not None:
            parts += [_U32.pack(len(f.slots)), np.ascontiguousarray(f.slots, dtype=LOCATION_DTYPE).tobytes()]
            if f.check_alg and (f.checks is None or len(f.checks) != len(f.slots)):
                raise CodecError("GET_MANIFESTS reply: opaque keys' checks do not match their locations")
            parts.append(_U8.pack(f.check_alg))
            if f.check_alg:
                parts.append(np.ascontiguousarray(f.checks, CHECK_DTYPES[f.check_alg]).tobytes())
    if regions is not None:
        parts += [_U32.pack(len(regions)), np.ascontiguousarray(regions, dtype=REGION_DTYPE).tobytes()]
    return parts


def dec_found(data: bytes | memoryview, expected: int) -> tuple[list[Found], np.ndarray | None]:
    """(one entry per name asked, the region table or None: a server without RDMA for this
    connection sends no locations, whatever was asked)."""
    r = Reader(data)
    flags = r.u8()
    if flags & ~GET_LOCATIONS:
        raise CodecError(f"unknown GET_MANIFESTS reply flags 0x{flags:02x}")
    with_locations = bool(flags & GET_LOCATIONS)
    n = r.u32()
    if n != expected:
        raise CodecError(f"GET_MANIFESTS answered {n} names of {expected}")
    out = []
    for _ in range(n):
        status = r.u8()
        if status in (NOT_FOUND, NOT_SERVED):
            out.append(Found(status))
            continue
        if status != FOUND:
            raise CodecError(f"unknown GET_MANIFESTS status {status}")
        manifest = bytes(r.take(r.u32()))
        tier = r.u8()
        if tier >= len(TIERS):
            raise CodecError(f"unknown tier {tier} in a GET_MANIFESTS reply")
        slots, checks, check_alg = None, None, 0
        if with_locations:
            slots = r.array(LOCATION_DTYPE, r.u32()).copy()
            check_alg = r.u8()
            if check_alg:
                if check_alg not in CHECK_DTYPES:
                    raise CodecError(f"unknown check algorithm {check_alg} in a GET_MANIFESTS reply")
                checks = r.array(CHECK_DTYPES[check_alg], len(slots)).copy()
        out.append(Found(FOUND, manifest, TIERS[tier], slots, checks, check_alg))
    regions = r.array(REGION_DTYPE, r.u32()).copy() if with_locations else None
    r.end()
    if regions is not None:
        known = set(regions["id"].tolist()) | {NO_REGION}
        for f in out:
            if f.slots is not None and not set(np.unique(f.slots["region"]).tolist()) <= known:
                raise CodecError("location refers to a region not in the region table")
    return out, regions
