"""Where things live in a cluster: rendezvous (highest random weight) hashing over the live
members, so a member joining or leaving moves only the keys it gains or loses."""

from __future__ import annotations

from collections.abc import Sequence

import xxhash


def _key_bytes(key: int | bytes | str) -> bytes:
    if isinstance(key, str):
        return b"n" + key.encode()
    if isinstance(key, bytes):
        return b"k" + key
    return b"k" + int(key).to_bytes(8, "little")


def owners(key: int | bytes | str, members: Sequence[str], replicas: int) -> list[str]:
    """The ``replicas`` members that hold ``key`` (a chunk key or a session name), best first."""
    kb = _key_bytes(key)
    ranked = sorted(members, key=lambda m: xxhash.xxh3_64_intdigest(m.encode() + b"\0" + kb), reverse=True)
    return ranked[: max(1, min(replicas, len(ranked)))]
