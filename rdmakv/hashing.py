"""Chunk keys: xxh3-64 of the chunk bytes (DESIGN §1)."""

from __future__ import annotations

import xxhash

HASH_XXH3_64 = 1
HASH_NAMES = {HASH_XXH3_64: "xxh3-64"}

# C-level function; accepts any buffer (memoryview, numpy array) without a copy.
chunk_key = xxhash.xxh3_64_intdigest


def key_hex(key: int) -> str:
    return f"{key:016x}"
