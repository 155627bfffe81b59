"""Chunk keys (DESIGN §1): xxh3-64 of the chunk bytes by default, BLAKE3-256 where an adversary
could forge xxh3 collisions.

A key is a Python ``int`` for xxh3-64 (8 bytes, little-endian on the wire) and 32 ``bytes``
for BLAKE3-256; in numpy arrays the dtypes are ``<u8`` and ``V32``. Both kinds can sit in one
dict without ever colliding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import xxhash

HASH_XXH3_64 = 1
HASH_BLAKE3_256 = 2
HASH_NAMES = {HASH_XXH3_64: "xxh3-64", HASH_BLAKE3_256: "blake3-256"}
HASH_BY_NAME = {"xxh3": HASH_XXH3_64, "xxh3-64": HASH_XXH3_64, "blake3": HASH_BLAKE3_256, "blake3-256": HASH_BLAKE3_256}
KEY_BYTES = {HASH_XXH3_64: 8, HASH_BLAKE3_256: 32}
KEY_DTYPES = {HASH_XXH3_64: np.dtype("<u8"), HASH_BLAKE3_256: np.dtype("V32")}

Key = int | bytes

# C-level function; accepts any buffer (memoryview, numpy array) without a copy.
chunk_key = xxhash.xxh3_64_intdigest


def _blake3_key(data) -> bytes:
    import blake3

    return blake3.blake3(data).digest()


def key_function(alg: int) -> Callable[[object], Key]:
    if alg == HASH_XXH3_64:
        return chunk_key
    if alg == HASH_BLAKE3_256:
        return _blake3_key
    raise ValueError(f"unknown hash_alg {alg} (known: {HASH_NAMES})")


def hash_alg(name_or_id: str | int) -> int:
    """A hash_alg id from ``"xxh3"``, ``"blake3"`` or an id; ValueError for anything else."""
    if isinstance(name_or_id, int) and name_or_id in HASH_NAMES:
        return name_or_id
    alg = HASH_BY_NAME.get(str(name_or_id).lower())
    if alg is None:
        raise ValueError(f"hash_alg must be one of {sorted(HASH_BY_NAME)}, got {name_or_id!r}")
    return alg


def key_dtype(alg: int) -> np.dtype:
    return KEY_DTYPES[alg]


def key_hex(key: Key) -> str:
    return key.hex() if isinstance(key, bytes) else f"{key:016x}"


def keys_array(keys, alg: int) -> np.ndarray:
    """Keys (ints or 32-byte strings, a list or an array) as the alg's numpy dtype."""
    dt = KEY_DTYPES[alg]
    if isinstance(keys, np.ndarray) and keys.dtype == dt:
        return np.ascontiguousarray(keys)
    if alg == HASH_XXH3_64:
        return np.ascontiguousarray(keys, dtype=dt)
    keys = list(keys)
    if any(not isinstance(k, bytes | bytearray) or len(k) != 32 for k in keys):
        raise ValueError("BLAKE3-256 keys are 32 bytes each")
    return np.frombuffer(b"".join(keys), dtype=dt).copy() if keys else np.zeros(0, dt)


def key_alg(key: Key) -> int:
    return HASH_BLAKE3_256 if isinstance(key, bytes) else HASH_XXH3_64


def matches(key: Key, data) -> bool:
    """Whether ``data`` hashes to ``key`` (with the algorithm the key's type names)."""
    return key_function(key_alg(key))(data) == key
