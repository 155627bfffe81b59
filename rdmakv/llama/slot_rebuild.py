"""Decode a slot-file manifest body and rebuild the exact original file from its chunks."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from .slot_chunks import (
    BODY_HEAD,
    BODY_MAGIC,
    BODY_VERSION,
    MODE_OPAQUE,
    MODE_PARSED,
    REGION_DTYPE,
    WIN_DTYPE,
    SlotPlan,
)
from .slot_format import MAX_BODY_PAYLOAD, MAX_ROW_BYTES, Buffer, SlotFileError, SlotFormatFail, SlotReader


@dataclass
class _Body:
    mode: int
    file_size: int
    file_hash: int
    error: str = ""
    window: int = 0
    layout: str = ""
    skeleton: bytes = b""
    plans: list[SlotPlan] = field(default_factory=list)
    regions: np.ndarray | None = None


def describe_body(body: bytes) -> dict[str, Any]:
    """What a manifest body says (for operators): opaque or parsed, sizes, layout."""
    b = _decode_body(body)
    out: dict[str, Any] = {"file_size": b.file_size, "file_xxh3": f"{b.file_hash:016x}"}
    if b.mode == MODE_OPAQUE:
        return out | {"opaque": True, "error": b.error}
    assert b.regions is not None  # (a parsed body has its regions)
    n_chunks = sum(len(b.plans[int(s)].windows) for s in b.regions["stream"])
    return out | {"opaque": False, "layout": b.layout, "window": b.window, "n_chunks": n_chunks}


def _decode_body(body: Buffer) -> _Body:
    body = bytes(body)
    if len(body) < BODY_HEAD.size:
        raise SlotFileError(f"slot-file manifest body too short ({len(body)} bytes)")
    magic, version, mode, _, size, fhash = BODY_HEAD.unpack_from(body)
    if magic != BODY_MAGIC or version != BODY_VERSION:
        raise SlotFileError(f"not a slot-file manifest body (magic {magic!r}, version {version})")
    if mode == MODE_OPAQUE:
        return _Body(mode, size, fhash, error=body[BODY_HEAD.size :].decode("utf-8", "replace"))
    if mode != MODE_PARSED:
        raise SlotFileError(f"slot-file manifest body has unknown mode {mode}")
    try:
        # the payload is the file's non-KV bytes plus small tables: never more than the file,
        # and never more than MAX_BODY_PAYLOAD whatever the body claims
        limit = min(size + (1 << 20), MAX_BODY_PAYLOAD)
        z = zlib.decompressobj()
        payload = z.decompress(body[BODY_HEAD.size :], limit)
        if z.unconsumed_tail:
            raise SlotFileError(f"slot-file manifest body inflates past its declared {size}-byte file")
        if not z.eof:
            raise zlib.error("incomplete or truncated stream")
        return _decode_payload(_Body(mode, size, fhash), memoryview(payload))
    except (zlib.error, SlotFormatFail, ValueError) as e:
        raise SlotFileError(f"corrupt slot-file manifest body: {e}") from None


def _decode_payload(b: _Body, p: memoryview) -> _Body:
    r = SlotReader(p, 0)
    b.window = r.u32("window")
    (n,) = struct.unpack_from("<H", p, r.skip(2, "layout length"))
    at = r.skip(n, "layout")
    b.layout = bytes(p[at : at + n]).decode()
    sk = r.u64("skeleton length")
    at = r.skip(sk, "skeleton")
    b.skeleton = bytes(p[at : at + sk])
    for _ in range(r.u32("stream count")):
        n = r.u32("cells")
        ordered = p[r.skip(1, "order flag")]
        nwin = r.u32("window count")
        order = None
        if not ordered:
            order = np.frombuffer(p, "<u4", n, r.skip(4 * n, "order")).astype(np.int64)
        wins = np.frombuffer(p, WIN_DTYPE, nwin, r.skip(nwin * WIN_DTYPE.itemsize, "windows"))
        if int(wins["count"].sum(dtype=np.int64)) != n:
            raise ValueError(f"window counts do not add up to {n} cells")
        b.plans.append(SlotPlan(n, order, wins))
    nreg = r.u32("region count")
    b.regions = np.frombuffer(p, REGION_DTYPE, nreg, r.skip(nreg * REGION_DTYPE.itemsize, "regions"))
    if r.left:
        raise ValueError(f"{r.left} trailing bytes")
    _check_regions(b.regions, len(b.plans))
    return b


def _check_regions(regions: np.ndarray, n_plans: int) -> None:
    trans = regions["transposed"] != 0
    if len(regions) and int(regions["stream"].max()) >= n_plans:
        raise ValueError("a region refers to a stream that is not there")
    if (regions["row"] == 0).any() or (regions["row"] > MAX_ROW_BYTES).any():
        raise ValueError("a region has an invalid row size")
    shape = regions["n_embd"].astype(np.uint64) * regions["el"]
    if (trans & ((regions["el"] == 0) | (shape != regions["row"]))).any():
        raise ValueError("a transposed region's n_embd x element size is not its row size")


def rebuild(body: Buffer, chunks: list[Buffer]) -> bytes:
    """The exact original file bytes from a body made by split/split_opaque and its chunks."""
    return b"".join(rebuild_parts(body, chunks))


def rebuild_parts(body: Buffer, chunks: Sequence[Buffer]) -> list[Buffer]:
    """The original file as consecutive parts (views of the body and chunks where the layout
    allows), checked against the recorded size and xxh3: a writer needs no joined copy."""
    b = _decode_body(body)
    if b.mode == MODE_OPAQUE:
        want = 1 if b.file_size else 0
        if len(chunks) != want:
            raise SlotFileError(f"opaque slot file needs {want} chunk(s), got {len(chunks)}")
        parts: list[Buffer] = list(chunks[:want])
    else:
        try:
            parts = _assemble(b, chunks)
        except SlotFileError:
            raise
        except (ValueError, IndexError) as e:  # a body that passed the checks but does not fit
            raise SlotFileError(f"slot-file manifest body does not fit its chunks: {e}") from None
    h = xxhash.xxh3_64()
    size = 0
    for part in parts:
        h.update(part)
        size += memoryview(part).nbytes
    if size != b.file_size or h.intdigest() != b.file_hash:
        raise SlotFileError(
            f"rebuilt slot file ({size} bytes) does not match the recorded "
            f"{b.file_size} bytes / xxh3 {b.file_hash:016x}"
        )
    return parts


def _assemble(b: _Body, chunks: Sequence[Buffer]) -> list[Buffer]:
    assert b.regions is not None
    counts = [len(b.plans[int(s)].windows) for s in b.regions["stream"]]
    if len(chunks) != sum(counts):
        raise SlotFileError(f"slot-file manifest needs {sum(counts)} chunks, got {len(chunks)}")
    out: list[Buffer] = []
    ci = cursor = 0
    for reg, nwin in zip(b.regions, counts, strict=True):
        at = int(reg["skel_offset"])
        if not cursor <= at <= len(b.skeleton):
            raise SlotFileError(f"slot-file manifest body: region offset {at} out of order")
        out.append(b.skeleton[cursor:at])
        out.extend(_region_bytes(reg, b.plans[int(reg["stream"])], chunks[ci : ci + nwin], ci))
        ci += nwin
        cursor = at
    out.append(b.skeleton[cursor:])
    return [p for p in out if memoryview(p).nbytes]


def _region_bytes(reg: np.void, plan: SlotPlan, parts: Sequence[Buffer], first: int) -> list[Buffer]:
    row = int(reg["row"])
    for i, (part, count) in enumerate(zip(parts, plan.windows["count"], strict=True)):
        if len(memoryview(part).cast("B")) != int(count) * row:
            raise SlotFileError(
                f"chunk {first + i} has {len(memoryview(part).cast('B'))} bytes, expected "
                f"{int(count) * row} ({int(count)} cells x {row} B)"
            )
    if reg["transposed"]:
        n_embd, el = int(reg["n_embd"]), int(reg["el"])
        mats = [np.frombuffer(p, np.uint8).reshape(n_embd, -1, el) for p in parts]
        mat = np.concatenate(mats, axis=1)
        if plan.order is not None:
            mat = _unsort(mat, plan.order, axis=1)
        return [mat.tobytes()]
    if plan.order is None:
        return list(parts)
    rows = np.frombuffer(b"".join(parts), np.uint8).reshape(plan.n, row)
    return [_unsort(rows, plan.order, axis=0).tobytes()]


def _unsort(sorted_arr: np.ndarray, order: np.ndarray, axis: int) -> np.ndarray:
    if len(order) != sorted_arr.shape[axis] or (len(order) and int(order.max()) >= len(order)):
        raise SlotFileError("slot-file manifest body: cell order is not a permutation")
    out = np.empty_like(sorted_arr)
    if axis == 0:
        out[order] = sorted_arr
    else:
        out[:, order, :] = sorted_arr
    return out
