"""The body of a cluster part manifest (kind ``part``), and the member-list digest it carries.

A part is what one node holds of a cluster session: its chunk table lists the chunks placed on
that node. Its body says which member list the client placed the save by (a digest, so a node
whose own list differs can refuse the save as stale) and, on the name's nodes only, carries the
session's whole manifest.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import xxhash

from ..errors import CodecError

MAGIC = b"RKP1"
HEADER = struct.Struct("<4sQ")  # magic, digest of the member list the save was placed by
UNKNOWN = 0  # "placed without a member list" (no check)


def members_digest(addrs: Iterable[str]) -> int:
    """Order-free digest of a member list (never UNKNOWN)."""
    d = xxhash.xxh3_64_intdigest("\n".join(sorted(set(addrs))).encode())
    return d or 1


def enc_part_body(digest: int, whole: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, digest) + whole


def dec_part_body(body: bytes | memoryview) -> tuple[int, bytes]:
    """(member-list digest, whole manifest or b"")."""
    if len(body) < HEADER.size or bytes(body[:4]) != MAGIC:
        raise CodecError(f"part body of {len(body)} B does not start with {MAGIC!r}")
    _, digest = HEADER.unpack_from(body)
    return digest, bytes(body[HEADER.size :])
