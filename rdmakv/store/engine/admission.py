"""Admission of saves in flight: memory promised to a save before its chunks arrive.

Without it, concurrent saves into a small store starve each other: each holds the slots of the
chunks it has put so far (uncommitted, so nothing can demote them) and waits for room the others
hold, and every one of them is refused. So a save's first commit (the one that lists what is
missing) reserves room for all of its missing chunks at once, making it by demoting or evicting
committed, unpinned, unheld sessions (orphans first); its puts then take their slots out of that
reservation, and other saves count it as used. When what is left is reserved or held by other
saves in flight, the save must wait (``SaveMustWait``: the server parks the request and retries it
as room frees, up to a bounded wait, then answers BUSY with the reason). STORE_FULL only when what
is left is pinned or held by restores, however long one waited.

Bounds: a connection's reservation is at most the memory tier under its high watermark (a save
larger than that can never fit: STORE_FULL at once); reservations in all are at most the same,
since each is granted only with room for it; a connection that stops sending requests loses its
reservation and its uncommitted chunks after ``save_stall_s`` (``Admission.expire_stalled``).

A part of the engine that owns the reservations (``inflight``); it asks the memory tier for room
through the ``Room`` Protocol. Everything here runs with the engine lock held.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from slab import class_size

from ...errors import BusyError, RdmakvError, StoreFullError
from ...hashing import Key
from ...units import fmt_bytes
from .index import Holder, Namespace, Session

SAVE_STALL_S = 10.0  # a connection that sends nothing this long loses its save's reservation and chunks


class SaveMustWait(BusyError):
    """Room for this save is held by other saves in flight: wait for them (the server retries the
    request as room frees, and answers BUSY with this reason once its wait is over)."""


class Room(Protocol):
    """What admission needs of the memory tier (the engine)."""

    capacity: int

    @property
    def watermark_bytes(self) -> int: ...
    holders: set[Holder]

    def mem_used(self) -> int: ...

    def release_regions(self, older_than: float | None) -> int: ...

    def demote_until(self, amount: int, requester: Namespace, protect: Session | None,
                     only: Namespace | None = None) -> int: ...  # fmt: skip

    def full(self, ns: Namespace, need: int, limit: str) -> StoreFullError: ...

    def drop_pending(self, holder: Holder, ns_name: str, key: Key) -> None: ...


class Admission:
    def __init__(self, room: Room) -> None:
        self.room = room
        self.inflight = 0  # slab bytes reserved by saves in flight, not yet allocated
        self.on_room: Callable[[], None] | None = None  # memory may have come free: parked saves retry

    def others_reserved(self, holder: Holder | None) -> int:
        return self.inflight - (holder.reserved if holder is not None else 0)

    def admit(self, ns: Namespace, holder: Holder, lengths: list[int]) -> None:
        """Reserve room for a save's missing chunks (their slab sizes), making it by demotion;
        SaveMustWait when other saves in flight hold what is missing, StoreFullError when what is
        left is pinned or held by restores."""
        room = self.room
        need = sum(class_size(n) for n in lengths)
        want = need - holder.reserved
        if want <= 0:
            return
        limit = room.watermark_bytes
        if need > limit:
            raise StoreFullError(
                f"store full: a save of {fmt_bytes(need)} does not fit in the memory tier "
                f"({fmt_bytes(limit)} under the high watermark of {fmt_bytes(room.capacity)})"
            )
        over = room.mem_used() + self.inflight + want - limit
        if over > 0:
            room.release_regions(None)
            over = room.mem_used() + self.inflight + want - limit
        if over > 0:
            room.demote_until(over, ns, None)
            over = room.mem_used() + self.inflight + want - limit
        if over > 0:
            raise self.no_room(ns, want, holder, f"memory capacity of {fmt_bytes(room.capacity)}")
        holder.reserved += want
        self.inflight += want

    def consume(self, holder: Holder, nbytes: int) -> None:
        """A save's slots came out of its reservation."""
        take = min(holder.reserved, nbytes)
        holder.reserved -= take
        self.inflight -= take

    def end(self, holder: Holder) -> None:
        """The save committed, gave up, or its connection went: what it had not used is free."""
        if holder.reserved:
            self.inflight -= holder.reserved
            holder.reserved = 0
            self.room_freed()

    def room_freed(self) -> None:
        """Memory may have come free (a commit, a release): let parked saves try again."""
        if self.on_room is not None:
            self.on_room()

    def no_room(self, ns: Namespace, need: int, holder: Holder | None, limit: str) -> RdmakvError:
        """Why ``need`` bytes do not fit: other saves in flight (wait) or pinned and restored
        sessions (full)."""
        others = self.others_reserved(holder)
        pending = sum(len(h.pending) for h in self.room.holders if h is not holder)
        if others or pending:
            return SaveMustWait(
                f"store busy: no room for {fmt_bytes(need)} in namespace {ns.name!r} under the {limit} until "
                f"saves in flight commit ({fmt_bytes(others)} reserved by other saves, {pending} of their chunks "
                "uncommitted); retry"
            )
        return self.room.full(ns, need, limit)

    def expire_stalled(self, now: float, local: Holder, stall_s: float = SAVE_STALL_S) -> int:
        """Connections that have sent nothing for ``stall_s`` lose their save's reservation and
        uncommitted chunks (the save is over: its client stalled or went). Returns how many."""
        n = 0
        for h in list(self.room.holders):
            if h is local or not (h.pending or h.reserved) or now - h.active_at <= stall_s:
                continue
            for ns_name, key in list(h.pending):
                self.room.drop_pending(h, ns_name, key)
            self.end(h)
            n += 1
        if n:
            self.room_freed()
        return n
