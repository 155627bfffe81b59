"""Chunk locations in a server's registered slab (pure): what a one-sided READ needs, and for opaque
keys the store's check of each chunk's bytes, which the READ is verified against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import CodecError
from ..hashing import CHECK_DTYPES, Check
from .codec import U8, U32, Reader

REGION_DTYPE = np.dtype([("id", "<u4"), ("addr", "<u8"), ("length", "<u8"), ("rkey", "<u4")])
LOCATION_DTYPE = np.dtype([("region", "<u4"), ("offset", "<u8"), ("gen", "<u4"), ("size", "<u4")])
NO_REGION = 0xFFFFFFFF


@dataclass
class Locations:
    """Where chunks live in the server's registered slab (for one-sided READs), and for opaque
    keys the store's check of each chunk's bytes (what a READ is verified against)."""

    regions: np.ndarray  # REGION_DTYPE records: id, addr, length, rkey
    slots: np.ndarray  # LOCATION_DTYPE per requested key; region NO_REGION = not stored
    checks: np.ndarray | None = None  # per requested key, CHECK_DTYPES[check_alg]; None for content keys
    check_alg: int = 0  # KEY_OPAQUE_XXH3 or KEY_OPAQUE_BLAKE3 when there are checks
    lengths: np.ndarray | None = None  # per requested key, the chunk's length (LOCATE: keys of no manifest)

    def encode(self) -> bytes:
        parts = [
            U32.pack(len(self.regions)),
            np.ascontiguousarray(self.regions, dtype=REGION_DTYPE).tobytes(),
            U32.pack(len(self.slots)),
            np.ascontiguousarray(self.slots, dtype=LOCATION_DTYPE).tobytes(),
        ]
        if self.checks is None:
            parts.append(U8.pack(0))
        else:
            checks = np.ascontiguousarray(self.checks, CHECK_DTYPES[self.check_alg])
            parts += [U8.pack(self.check_alg), checks.tobytes()]
        if self.lengths is None:
            parts.append(U8.pack(0))
        else:
            parts += [U8.pack(1), np.ascontiguousarray(self.lengths, dtype="<u4").tobytes()]
        return b"".join(parts)

    @classmethod
    def decode(cls, r: Reader) -> Locations:
        regions = r.array(REGION_DTYPE, r.u32())
        slots = r.array(LOCATION_DTYPE, r.u32())
        known = set(regions["id"].tolist()) | {NO_REGION}
        if not set(np.unique(slots["region"]).tolist()) <= known:
            raise CodecError("location refers to a region not in the region table")
        check_alg = r.u8()
        checks = None
        if check_alg:
            if check_alg not in CHECK_DTYPES:
                raise CodecError(f"unknown check kind {check_alg} in a location table")
            checks = r.array(CHECK_DTYPES[check_alg], len(slots))
        has_lengths = r.u8()
        if has_lengths > 1:
            raise CodecError(f"bad lengths flag {has_lengths} in a location table")
        lengths = r.array(np.dtype("<u4"), len(slots)) if has_lengths else None
        return cls(regions, slots, checks, check_alg, lengths)

    def copy(self) -> Locations:
        """Owned arrays (a decoded table views the frame it came in)."""
        return Locations(self.regions.copy(), self.slots.copy(), _copy(self.checks), self.check_alg,
                         _copy(self.lengths))  # fmt: skip

    def subset(self, idx: np.ndarray) -> Locations:
        return Locations(self.regions, self.slots[idx], _pick(self.checks, idx), self.check_alg,
                         _pick(self.lengths, idx))  # fmt: skip

    def check_list(self) -> list[Check | None]:
        """Each chunk's check (None where the keys verify themselves)."""
        if self.checks is None:
            return [None] * len(self.slots)
        checks: list[Check | None] = self.checks.tolist()
        return checks


def _copy(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else a.copy()


def _pick(a: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if a is None else a[idx]


def make_regions(rows: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    out = np.zeros(len(rows), dtype=REGION_DTYPE)
    for i, row in enumerate(rows):
        out[i] = row
    return out


def dec_locations(data: bytes | memoryview) -> Locations:
    r = Reader(data)
    loc = Locations.decode(r)
    r.end()
    return loc
