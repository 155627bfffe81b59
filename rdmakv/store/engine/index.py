"""The store's in-memory index: chunks, sessions, namespaces and the holds on them.

Counts that decide when bytes may go (docs/data-model.md §4):

- ``Chunk.refs``: committed sessions naming the chunk. At 0 (and no holds) the chunk is gone:
  its slot is freed (zeroed) and its log record becomes garbage for the compactor. Unless it is
  an *orphan*: a chunk whose last session was replaced by a newer version of its name (not
  deleted, evicted or expired) stays stored and readable by key, as evictable cache: the first
  thing to go under memory pressure (its slot) and disk pressure (its record). A delete of that
  name frees them too ("delete" means every version is gone). Orphans do not survive a restart
  (replay cannot tell them from a deleted session's chunks).
- ``Chunk.rrefs``: *resident* sessions naming it. At 0 (and no holds) its slot is freed but
  it stays on disk: the memory tier let it go, the disk tier still has it.
- ``Chunk.holds``: in-flight work that needs the bytes where they are: a save that put the
  chunk and has not committed yet, a commit between its check and its install, a promotion
  filling the slot, a GET_CHUNKS copying it out.
- ``Session.holds``: restores that looked the session up (one per connection, until its next
  lookup or a timeout). A held session that is deleted or replaced becomes a *zombie*: gone
  from the namespace, but its chunks stay until the last restore of it lets go, so a restore
  racing an overwrite returns the version it looked up, whole.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from slab import Slab, Slot

from ...hashing import Key
from .segment_log import Location

COUNTERS = (
    "bytes_received", "bytes_sent", "chunks_received", "chunks_stored", "chunks_deduped", "chunks_referenced",
    "manifests_committed", "restores", "memory_hits", "disk_hits", "promotions", "promoted_chunks",
    "demotions", "evictions", "expirations", "deletes", "orphans_dropped",
    "orphans_kept", "orphans_shed", "orphans_evicted", "orphans_reused",
    # by transport (seen by the request path; a one-sided RDMA lookup never reaches the server)
    "saves_tcp", "saves_rdma", "lookups_tcp_memory", "lookups_tcp_disk", "lookups_rdma_memory", "lookups_rdma_disk",
)  # fmt: skip


@dataclass(slots=True, eq=False)
class Chunk:
    key: Key
    length: int
    loc: Location  # its log record
    slot: Slot | None = None  # resident in the slab
    ready: bool = True  # False while a promotion is still filling the slot
    refs: int = 0
    rrefs: int = 0
    holds: int = 0
    check: int | bytes | None = None  # an opaque key's checksum of the bytes (content keys are their own)
    orphan: bool = False  # no session names it, kept as evictable cache (Engine.orphans)
    orphan_of: str = ""  # the session name whose replacement left it (a delete of that name frees it)


@dataclass(eq=False)
class Session:
    """A committed manifest."""

    ns: str
    name: str
    seq: int
    loc: Location
    n_chunks: int  # entries of its chunk table (the keys themselves are read from ``data`` when resident)
    unique: np.ndarray  # distinct keys, first-appearance order (a save's slab order): 8, 32 or 65 bytes each
    total_bytes: int
    manifest_len: int
    committed_at: float
    expires_at: float = 0.0  # wall clock; 0 = never
    pinned: bool = False
    pin_loc: Location | None = None
    data: bytes | None = None  # the manifest bytes while resident (else read from the log)
    resident: bool = False  # claims slab memory for its chunks (Chunk.rrefs)
    complete: bool = False  # resident and every chunk's slot filled: a restore is a memory hit
    holds: int = 0
    dead: bool = False  # deleted or replaced while held (a zombie)
    replaced: bool = False  # retired by a newer version of its name: its chunks become orphans, not garbage
    encoded_locations: tuple[int, bytes] | None = None  # (region version, Locations bytes), charged as memory

    def unique_keys(self) -> list[Key]:
        """The distinct keys as Python values (ints or bytes), for the chunk index."""
        keys: list[Key] = self.unique.tolist()
        return keys

    def expired(self, now: float) -> bool:
        return bool(self.expires_at) and self.expires_at <= now


@dataclass
class Tombstone:
    seq: int
    loc: Location


@dataclass
class Namespace:
    name: str
    slab: Slab
    quota: int | None = None
    chunks: dict[Key, Chunk] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    zombies: set[Session] = field(default_factory=set)
    tombstones: dict[str, Tombstone] = field(default_factory=dict)
    last_seq: dict[str, int] = field(default_factory=dict)  # newest manifest/tombstone seq per name
    disk_records: Counter[str] = field(default_factory=Counter)  # manifest records on disk per name
    rkeys: dict[int, int] = field(default_factory=dict)  # region id -> rkey
    region_version: int = 0  # bumped when a region comes or goes (cached location tables)
    manifest_bytes: int = 0  # resident manifest bytes (charged to the memory budget)
    orphan_chunks: int = 0  # chunks kept as cache with no session naming them
    orphan_bytes: int = 0
    orphans_by_name: dict[str, set[Key]] = field(default_factory=dict)  # session name -> keys of the orphans it left
    disk_live: int = 0  # live log bytes of this namespace
    counters: Counter[str] = field(default_factory=Counter)

    @property
    def used(self) -> int:
        """Memory this namespace holds: slab slots plus resident manifests."""
        return self.slab.used_bytes + self.manifest_bytes


class Holder:
    """What one connection (or in-process caller) holds: chunks it put for a save that has not
    committed yet, and the session(s) its last restore lookup found."""

    def __init__(self) -> None:
        self.pending: dict[tuple[str, Key], float] = {}  # (ns, key) -> monotonic time of the put
        self.restore: tuple[Namespace, Session] | None = None
        self.batch: list[tuple[Namespace, Session]] = []  # the versions of its last GET_MANIFESTS
        self.restore_at = 0.0
        self.reserved = 0  # slab bytes promised to its save in flight (Engine admission)
        self.active_at = time.monotonic()  # its connection's last request: a stalled save loses its room

    def touch(self) -> float:
        return time.monotonic()
