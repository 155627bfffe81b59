"""Chunk keys: content hashes (xxh3-64 by default, BLAKE3-256 where an adversary could forge xxh3
collisions), or an engine's own opaque keys.

- **Content keys** verify themselves: a chunk is whatever hashes to its key. A key is a Python
  ``int`` for xxh3-64 (8 bytes, little-endian on the wire) and 32 ``bytes`` for BLAKE3-256; in
  numpy arrays the dtypes are ``<u8`` and ``V32``.
- **Opaque keys** are whatever an engine passes (1 to 64 bytes, compared as bytes: a chain hash of
  token ids, say). They say nothing about the bytes, so the store keeps a *check* beside each one,
  a checksum of the bytes (xxh3-64, or BLAKE3-256 for collision resistance), and every read is
  verified against it. An opaque key is held as 65 bytes: a length byte (with 0x80 set when the
  check is BLAKE3) and the key, zero-padded; in numpy ``V65``.

The three kinds can sit in one dict without ever colliding (int, 32 bytes, 65 bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import xxhash

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typing-only (collections.abc.Buffer is 3.12+)

HASH_XXH3_64 = 1
HASH_BLAKE3_256 = 2
KEY_OPAQUE_XXH3 = 3  # an engine's key; the store checks the bytes with xxh3-64
KEY_OPAQUE_BLAKE3 = 4  # an engine's key; the store checks the bytes with BLAKE3-256
HASH_NAMES = {HASH_XXH3_64: "xxh3-64", HASH_BLAKE3_256: "blake3-256", KEY_OPAQUE_XXH3: "opaque/xxh3-64",
              KEY_OPAQUE_BLAKE3: "opaque/blake3-256"}  # fmt: skip
HASH_BY_NAME = {"xxh3": HASH_XXH3_64, "xxh3-64": HASH_XXH3_64, "blake3": HASH_BLAKE3_256, "blake3-256": HASH_BLAKE3_256}
OPAQUE_ALGS = (KEY_OPAQUE_XXH3, KEY_OPAQUE_BLAKE3)
OPAQUE_MAX = 64  # bytes of an engine key
OPAQUE_WIDTH = OPAQUE_MAX + 1  # a length byte, then the key zero-padded
_BLAKE3_CHECK = 0x80  # in the length byte: the check is BLAKE3-256
KEY_BYTES = {HASH_XXH3_64: 8, HASH_BLAKE3_256: 32, KEY_OPAQUE_XXH3: OPAQUE_WIDTH, KEY_OPAQUE_BLAKE3: OPAQUE_WIDTH}
_OPAQUE_DTYPE = np.dtype(f"V{OPAQUE_WIDTH}")
KEY_DTYPES = {HASH_XXH3_64: np.dtype("<u8"), HASH_BLAKE3_256: np.dtype("V32"), KEY_OPAQUE_XXH3: _OPAQUE_DTYPE,
              KEY_OPAQUE_BLAKE3: _OPAQUE_DTYPE}  # fmt: skip
CHECK_DTYPES = {KEY_OPAQUE_XXH3: np.dtype("<u8"), KEY_OPAQUE_BLAKE3: np.dtype("V32")}  # the check column

Key = int | bytes
Check = int | bytes  # an opaque key's checksum of its bytes

# C-level function; accepts any buffer (memoryview, numpy array) without a copy.
chunk_key = xxhash.xxh3_64_intdigest


def _blake3_key(data: Buffer) -> bytes:
    import blake3

    return blake3.blake3(data).digest()


def key_function(alg: int) -> Callable[[Buffer], Key]:
    if alg == HASH_XXH3_64:
        return chunk_key
    if alg == HASH_BLAKE3_256:
        return _blake3_key
    raise ValueError(f"unknown hash_alg {alg} (known: {HASH_NAMES})")


def hash_alg(name_or_id: str | int) -> int:
    """A hash_alg id from ``"xxh3"``, ``"blake3"`` or an id; ValueError for anything else."""
    if isinstance(name_or_id, int) and name_or_id in (HASH_XXH3_64, HASH_BLAKE3_256):
        return name_or_id  # content keys: a connection computes them (opaque keys come from an engine)
    alg = HASH_BY_NAME.get(str(name_or_id).lower())
    if alg is None:
        raise ValueError(f"hash_alg must be one of {sorted(HASH_BY_NAME)}, got {name_or_id!r}")
    return alg


def key_dtype(alg: int) -> np.dtype:
    return KEY_DTYPES[alg]


def key_hex(key: Key) -> str:
    if isinstance(key, bytes) and len(key) == OPAQUE_WIDTH:
        return key[1 : 1 + (key[0] & 0x7F)].hex()
    return key.hex() if isinstance(key, bytes) else f"{key:016x}"


def opaque_key(engine_key: bytes | memoryview, alg: int = KEY_OPAQUE_XXH3) -> bytes:
    """An engine's key (1..64 bytes) as the store holds it; ValueError for any other length."""
    n = len(engine_key)
    if not 0 < n <= OPAQUE_MAX:
        raise ValueError(f"an engine key is 1..{OPAQUE_MAX} bytes, got {n}")
    flag = _BLAKE3_CHECK if alg == KEY_OPAQUE_BLAKE3 else 0
    return bytes((n | flag,)) + bytes(engine_key) + bytes(OPAQUE_MAX - n)


def engine_key(key: bytes) -> bytes:
    """The engine's own bytes of an opaque key (what ``opaque_key`` was given)."""
    return key[1 : 1 + (key[0] & 0x7F)]


def opaque_valid(key: bytes) -> bool:
    """Whether 65 bytes are a well-formed opaque key (a length 1..64, zero padding)."""
    n = key[0] & 0x7F
    return 0 < n <= OPAQUE_MAX and not any(key[1 + n :])


def is_opaque(alg: int) -> bool:
    return alg in OPAQUE_ALGS


def check_function(alg: int) -> Callable[[Buffer], Check]:
    """The checksum the store keeps beside an opaque key of ``alg``."""
    if alg == KEY_OPAQUE_XXH3:
        return chunk_key
    if alg == KEY_OPAQUE_BLAKE3:
        return _blake3_key
    raise ValueError(f"hash_alg {alg} keys verify themselves; they have no separate check")


def check_of(key: Key, data) -> Check | None:
    """The check to keep beside ``key`` for ``data``: None for content keys (the key is the check)."""
    alg = key_alg(key)
    return check_function(alg)(data) if is_opaque(alg) else None


def verified(key: Key, data, check: Check | None = None) -> bool:
    """Whether ``data`` is the chunk ``key`` names: it hashes to a content key, or to an opaque
    key's ``check`` (an opaque key without a check verifies nothing and is refused)."""
    alg = key_alg(key)
    if not is_opaque(alg):
        return key_function(alg)(data) == key
    return check is not None and check_function(alg)(data) == check


def keys_array(keys, alg: int) -> np.ndarray:
    """Keys (ints or 32-byte strings, a list or an array) as the alg's numpy dtype."""
    dt = KEY_DTYPES[alg]
    if isinstance(keys, np.ndarray) and keys.dtype == dt:
        return np.ascontiguousarray(keys)
    if alg == HASH_XXH3_64:
        return np.ascontiguousarray(keys, dtype=dt)
    keys = list(keys)
    if any(not isinstance(k, bytes | bytearray) or len(k) != dt.itemsize for k in keys):
        raise ValueError(f"{HASH_NAMES[alg]} keys are {dt.itemsize} bytes each")
    return np.frombuffer(b"".join(keys), dtype=dt).copy() if keys else np.zeros(0, dt)


def key_alg(key: Key) -> int:
    if not isinstance(key, bytes):
        return HASH_XXH3_64
    if len(key) == OPAQUE_WIDTH:
        return KEY_OPAQUE_BLAKE3 if key[0] & _BLAKE3_CHECK else KEY_OPAQUE_XXH3
    return HASH_BLAKE3_256


def matches(key: Key, data) -> bool:
    """Whether ``data`` hashes to the content key ``key`` (with the algorithm the key's type names)."""
    return key_function(key_alg(key))(data) == key
