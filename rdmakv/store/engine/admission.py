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
reservation and its uncommitted chunks after ``save_stall_s`` (Engine.expire_stalled_saves).

Everything here runs with the engine lock held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slab import class_size

from ...errors import BusyError, RdmakvError, StoreFullError
from ...units import fmt_bytes
from .index import Holder, Namespace

if TYPE_CHECKING:
    from .core import Engine

SAVE_STALL_S = 10.0  # a connection that sends nothing this long loses its save's reservation and chunks


class SaveMustWait(BusyError):
    """Room for this save is held by other saves in flight: wait for them (the server retries the
    request as room frees, and answers BUSY with this reason once its wait is over)."""


# Its methods take ``self: Engine``; mypy accepts an explicit self-type only when it is a supertype
# of the class or a Protocol (python/mypy#7191), so each such def carries ``type: ignore[misc]`` for
# that one check. The bodies are checked against Engine; the ignores go when the parts are composed.
class Admission:
    """Mixin of Engine: reservations of saves in flight."""

    def _others_reserved(self: Engine, holder: Holder | None) -> int:  # type: ignore[misc]
        return self.inflight - (holder.reserved if holder is not None else 0)

    def _admit(self: Engine, ns: Namespace, holder: Holder, lengths: list[int]) -> None:  # type: ignore[misc]
        """Reserve room for a save's missing chunks (their slab sizes), making it by demotion;
        SaveMustWait when other saves in flight hold what is missing, StoreFullError when what is
        left is pinned or held by restores."""
        need = sum(class_size(n) for n in lengths)
        want = need - holder.reserved
        if want <= 0:
            return
        limit = int(self.high_watermark * self.capacity)
        if need > limit:
            raise StoreFullError(
                f"store full: a save of {fmt_bytes(need)} does not fit in the memory tier "
                f"({fmt_bytes(limit)} under the high watermark of {fmt_bytes(self.capacity)})"
            )
        over = self.mem_used() + self.inflight + want - limit
        if over > 0:
            self._release_regions(None)
            over = self.mem_used() + self.inflight + want - limit
        if over > 0:
            self._demote_until(over, ns, None)
            over = self.mem_used() + self.inflight + want - limit
        if over > 0:
            raise self._no_room(ns, want, holder, f"memory capacity of {fmt_bytes(self.capacity)}")
        holder.reserved += want
        self.inflight += want

    def _consume_reservation(self: Engine, holder: Holder, nbytes: int) -> None:  # type: ignore[misc]
        """A save's slots came out of its reservation."""
        take = min(holder.reserved, nbytes)
        holder.reserved -= take
        self.inflight -= take

    def _end_reservation(self: Engine, holder: Holder) -> None:  # type: ignore[misc]
        """The save committed, gave up, or its connection went: what it had not used is free."""
        if holder.reserved:
            self.inflight -= holder.reserved
            holder.reserved = 0
            self._room_freed()

    def _room_freed(self: Engine) -> None:  # type: ignore[misc]
        """Memory may have come free (a commit, a release): let parked saves try again."""
        if self.on_room is not None:
            self.on_room()

    def _no_room(self: Engine, ns: Namespace, need: int, holder: Holder | None, limit: str) -> RdmakvError:  # type: ignore[misc]
        """Why ``need`` bytes do not fit: other saves in flight (wait) or pinned and restored
        sessions (full)."""
        others = self._others_reserved(holder)
        pending = sum(len(h.pending) for h in self.holders if h is not holder)
        if others or pending:
            return SaveMustWait(
                f"store busy: no room for {fmt_bytes(need)} in namespace {ns.name!r} under the {limit} until "
                f"saves in flight commit ({fmt_bytes(others)} reserved by other saves, {pending} of their chunks "
                "uncommitted); retry"
            )
        return self._full(ns, need, limit)

    def pending_bytes(self: Engine) -> int:  # type: ignore[misc]
        """Slab bytes of uncommitted chunks and of reservations: saves in flight."""
        return self.inflight + sum(
            ns.chunks[k].length for h in self.holders for (n, k) in h.pending if (ns := self.namespaces.get(n))
            and k in ns.chunks
        )  # fmt: skip

    def expire_stalled_saves(self: Engine, now: float, stall_s: float = SAVE_STALL_S) -> int:  # type: ignore[misc]
        """Connections that have sent nothing for ``stall_s`` lose their save's reservation and
        uncommitted chunks (the save is over: its client stalled or went). Returns how many."""
        n = 0
        for h in list(self.holders):
            if h is self.local or not (h.pending or h.reserved) or now - h.active_at <= stall_s:
                continue
            for ns_name, key in list(h.pending):
                self._drop_pending(h, ns_name, key)
            self._end_reservation(h)
            n += 1
        if n:
            self._room_freed()
        return n
