"""Which tokens each llama-server slot holds, and leases so that requests never share a slot.

The table remembers, per slot, a prefix of the tokens it holds (what the proxy sent there, or
the token list of the slot's last save) together with what llama-server's ``GET /slots`` showed
for that slot at the time (its last task id and cached-token count). Before each choice the
proxy shows the table a fresh ``/slots`` listing: a slot whose task or count changed (another
client used it, it was erased or restored behind the proxy, llama-server restarted and it is
empty) loses its record. So the proxy's memory only ever narrows what llama-server says.

Choosing (``choose``) is pure; ``acquire`` waits for a free slot, bounded in waiters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

MAX_WAITERS = 256  # requests waiting for a free slot; past this a request is refused (503)
POLL_S = 0.5  # a waiting request asks /slots again at least this often
MIN_RESTORE_GAIN = 16  # tokens a restore must add over the best slot's prefix to be worth a file


class SlotsBusyError(RuntimeError):
    """Too many requests already wait for a slot."""


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if not n:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def signature(listing: dict) -> tuple:
    """What identifies a slot's content in llama-server's /slots entry."""
    return listing.get("id_task"), listing.get("n_prompt_tokens")


_EMPTY = np.zeros(0, np.int32)


@dataclass
class Slot:
    id: int
    tokens: np.ndarray = field(default_factory=lambda: _EMPTY)  # a prefix of what it holds, as far as known
    signature: tuple | None = None  # the /slots signature when ``tokens`` was recorded
    leased: bool = False
    upstream_busy: bool = False  # processing a request that is not ours
    last_used: float = 0.0

    def forget(self) -> None:
        self.tokens, self.signature = _EMPTY, None


@dataclass(frozen=True)
class Choice:
    slot: int
    slot_prefix: int  # tokens of the prompt the slot already holds (as far as the table knows)
    restore: bool  # restore the stored prefix into it first


class SlotTable:
    def __init__(self, max_waiters: int = MAX_WAITERS, min_gain: int = MIN_RESTORE_GAIN) -> None:
        self.slots: list[Slot] = []
        self.max_waiters, self.min_gain = max_waiters, min_gain
        self.waiting = 0
        self._cv: asyncio.Condition | None = None

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def resize(self, n: int) -> None:
        """llama-server has ``n`` slots (a restart may change it): a new count forgets everything."""
        if n != len(self.slots):
            leased = {s.id for s in self.slots if s.leased}
            self.slots = [Slot(i, leased=i in leased) for i in range(n)]

    def reconcile(self, listing: list[dict]) -> int:
        """Apply llama-server's ``GET /slots``; returns how many records it contradicted."""
        self.resize(len(listing))
        dropped = 0
        for s, entry in zip(self.slots, listing):
            s.upstream_busy = bool(entry.get("is_processing")) and not s.leased
            if s.leased:
                continue
            if s.upstream_busy or s.signature != signature(entry):
                dropped += int(len(s.tokens) > 0)
                s.forget()
        return dropped

    def forget_all(self) -> None:
        for s in self.slots:
            s.forget()

    def choose(self, tokens: np.ndarray, stored: int, pinned: int | None = None) -> Choice | None:
        """The slot for a prompt whose longest stored prefix is ``stored`` tokens, or None when
        none is free. A slot holding a prefix is reused; a stored prefix longer by at least
        ``min_gain`` is restored into an empty slot, else the least recently used one."""
        free = [s for s in self.slots if not s.leased and not s.upstream_busy]
        if pinned is not None and self.slots:
            free = [s for s in free if s.id == pinned % len(self.slots)]
        if not free:
            return None
        usable = {s.id: common_prefix(s.tokens, tokens) for s in free}
        best = max(free, key=lambda s: (usable[s.id], s.last_used))
        spare = min(free, key=lambda s: (len(s.tokens) > 0, s.last_used))
        if stored >= usable[best.id] + self.min_gain:
            target = best if pinned is not None else spare
            return Choice(target.id, usable[target.id], True)
        if usable[best.id] > 0:
            return Choice(best.id, usable[best.id], False)
        return Choice(spare.id, 0, False)

    async def acquire(
        self, tokens: np.ndarray, stored: int, pinned: int | None, refresh: Callable[[], Awaitable[None]]
    ) -> Choice:
        """Lease a slot (``choose``); while none is free, wait for a release and ``refresh``."""
        if self._cv is None:
            self._cv = asyncio.Condition()
        async with self._cv:
            while (choice := self.choose(tokens, stored, pinned)) is None:
                if self.waiting >= self.max_waiters:
                    raise SlotsBusyError(f"{self.waiting} requests already wait for one of {self.n_slots} slots")
                self.waiting += 1
                try:  # slots busy with other clients' requests free up without a release: look again
                    await asyncio.wait_for(self._cv.wait(), POLL_S)
                except TimeoutError:
                    pass
                finally:
                    self.waiting -= 1
                await refresh()
            slot = self.slots[choice.slot]
            slot.leased, slot.last_used = True, time.monotonic()
            return choice

    def record(self, slot_id: int, tokens: np.ndarray, sig: tuple | None) -> None:
        """The slot holds ``tokens`` (at least), and /slots showed ``sig`` for it."""
        if 0 <= slot_id < len(self.slots):
            s = self.slots[slot_id]
            s.tokens, s.signature = tokens, sig

    async def release(self, slot_id: int) -> None:
        if 0 <= slot_id < len(self.slots):
            self.slots[slot_id].leased = False
            self.slots[slot_id].last_used = time.monotonic()
        if self._cv is not None:
            async with self._cv:
                self._cv.notify_all()
