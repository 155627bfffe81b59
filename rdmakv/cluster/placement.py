"""Where things live in a cluster: rendezvous (highest random weight) hashing over the live
members, so a member joining or leaving moves only the keys it gains or loses.

A key's score on a member is ``mix64(key64 ^ seed)``: ``seed`` is the xxh3-64 of the member's
address, ``key64`` the chunk key (xxh3-64 already; the first 8 bytes of a BLAKE3 key) or the
xxh3-64 of a session name, and ``mix64`` the splitmix64 finaliser, a bijection with full
avalanche. Unlike hashing the pair's bytes, this is a few numpy operations over a whole chunk
table times the member list, so a save places all its chunks at once, and ``bench.placement``
simulates 10M chunks over 1,000 members with the very function the client uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping multiplies)."""
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


def seeds(members: Sequence[str]) -> np.ndarray:
    return np.array([xxhash.xxh3_64_intdigest(m.encode()) for m in members], dtype=np.uint64)


def key64(key: int | bytes | str) -> int:
    if isinstance(key, str):
        return xxhash.xxh3_64_intdigest(b"name\0" + key.encode())
    if isinstance(key, bytes):
        if len(key) == 32:  # a BLAKE3 key: already uniform
            return int.from_bytes(key[:8], "little")
        return xxhash.xxh3_64_intdigest(key)  # an engine's opaque key: any bytes, so hashed
    return int(key) & 0xFFFFFFFFFFFFFFFF


def keys64(keys: np.ndarray) -> np.ndarray:
    """A chunk table's keys as uint64 (xxh3 keys as they are; 32-byte keys by their first 8;
    an engine's opaque keys by their xxh3)."""
    a = np.asarray(keys)
    if a.dtype == np.uint64:
        return a
    if a.dtype.kind == "V" and a.dtype.itemsize == 32:  # BLAKE3 keys
        head = np.ascontiguousarray(a).view(np.uint8).reshape(len(a), -1)[:, :8].copy()
        return head.view("<u8").ravel().astype(np.uint64)
    return np.array([key64(k) for k in a.tolist()], dtype=np.uint64)


def place(keys: np.ndarray, members: Sequence[str], replicas: int) -> np.ndarray:
    """(n_keys, R) member indices, best first, for uint64 ``keys``."""
    r = max(1, min(replicas, len(members)))
    with np.errstate(over="ignore"):
        score = mix64(np.asarray(keys, dtype=np.uint64)[:, None] ^ seeds(members)[None, :])
    if r == 1:
        return score.argmax(axis=1)[:, None]
    top = np.argpartition(score, -r, axis=1)[:, -r:]
    order = np.argsort(np.take_along_axis(score, top, axis=1), axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def by_member(keys: np.ndarray, members: Sequence[str], replicas: int) -> dict[str, list[int]]:
    """Member -> the indices of the chunk-table ``keys`` it holds (each index once, in order),
    for the members that hold any."""
    where = place(keys64(keys), members, replicas)
    return {members[j]: np.nonzero((where == j).any(axis=1))[0].tolist() for j in np.unique(where).tolist()}


def owners(key: int | bytes | str, members: Sequence[str], replicas: int) -> list[str]:
    """The ``replicas`` members that hold ``key`` (a chunk key or a session name), best first."""
    if not members:
        return []
    idx = place(np.array([key64(key)], dtype=np.uint64), members, replicas)[0]
    return [members[i] for i in idx.tolist()]
