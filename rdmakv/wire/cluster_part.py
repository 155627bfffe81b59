"""The body of a cluster part manifest (kind ``part``), and the member-list digest it carries.

A part is what one node holds of a cluster session: its chunk table lists the chunks placed on
that node. Its body says which member list the client placed the save by (a digest, so a node
whose own list differs can refuse the save as stale), which version of the session it belongs to
(the xxh3-64 of the session's whole manifest), whether it comes from a repair (then a node keeps
a part of another version rather than replace it: the session was saved again meanwhile) and, on
the name's nodes only, the session's whole manifest.

A *deletion marker* is a part with no chunks and FLAG_DELETED, naming the version that was
deleted (ANY_VERSION when the deleting client could not read it): a cluster delete commits one on
every live node, replacing whatever part was there, with a TTL. While it lives, a node refuses a
repair's part of that version: a repair that read the session before the delete cannot bring it
back.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import xxhash

from ..errors import CodecError

MAGIC = b"RKP2"
HEADER = struct.Struct("<4sQQB")  # magic, member-list digest, session version, flags
UNKNOWN = 0  # "placed without a member list" (no check)
FLAG_REPAIR = 0x1  # a repair's commit: never replaces a part of another version
FLAG_DELETED = 0x2  # a deletion marker: the session (of ``version``) was deleted here
_FLAGS = FLAG_REPAIR | FLAG_DELETED
ANY_VERSION = 0  # a marker's version when the deleted one is not known: it stops every repair of the name


@dataclass(frozen=True)
class PartBody:
    members: int  # digest of the member list the save was placed by (UNKNOWN: none)
    version: int  # xxh3-64 of the session's whole manifest
    flags: int
    whole: bytes  # the whole manifest on the name's nodes, else b""

    @property
    def repair(self) -> bool:
        return bool(self.flags & FLAG_REPAIR)

    @property
    def deleted(self) -> bool:
        return bool(self.flags & FLAG_DELETED)

    def stops_repair_of(self, version: int) -> bool:
        """A deletion marker that a repair's part of ``version`` must not replace."""
        return self.deleted and self.version in (version, ANY_VERSION)


def members_digest(addrs: Iterable[str]) -> int:
    """Order-free digest of a member list (never UNKNOWN)."""
    d = xxhash.xxh3_64_intdigest("\n".join(sorted(set(addrs))).encode())
    return d or 1


def session_version(whole: bytes) -> int:
    return xxhash.xxh3_64_intdigest(whole)


def enc_part_body(members: int, version: int, whole: bytes = b"", flags: int = 0) -> bytes:
    if flags & ~_FLAGS:
        raise ValueError(f"unknown part flags {flags:#x}")
    return HEADER.pack(MAGIC, members, version, flags) + whole


def dec_part_body(body: bytes | memoryview) -> PartBody:
    if len(body) < HEADER.size or bytes(body[:4]) != MAGIC:
        raise CodecError(f"part body of {len(body)} B does not start with {MAGIC!r}")
    _, members, version, flags = HEADER.unpack_from(body)
    if flags & ~_FLAGS:
        raise CodecError(f"part body has unknown flags {flags:#x}")
    return PartBody(members, version, flags, bytes(body[HEADER.size :]))
