"""Background upkeep, once a second: TTL expiry, holds that ran out of time, empty slab regions
past their grace period, memory and disk pressure, the reserve, and waking the compactor."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from ...errors import RdmakvError
from .datadir import fs_free_bytes

if TYPE_CHECKING:
    from .core import Engine

PERIOD_S = 1.0


class Maintenance:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="rdmakv-maintenance")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(PERIOD_S):
            try:
                self.run_once()
            except RdmakvError as e:
                self.engine.say(f"rdmakv: maintenance: {e}")
            except Exception as e:  # noqa: BLE001 - a bug here must not end the server
                self.engine.say(f"rdmakv: maintenance failed: {e!r}")

    def run_once(self) -> None:
        from .core import REGION_GRACE_S, RESTORE_HOLD_S, SAVE_HOLD_S

        e = self.engine
        now = time.monotonic()
        try:
            e.fs_free = fs_free_bytes(e.dir)
        except OSError:
            pass
        with e.lock:
            e._expire_due()
            e.expire_stalled_saves(now)
            for h in list(e.holders):
                if (h.restore is not None or h.batch) and now - h.restore_at > RESTORE_HOLD_S:
                    e._drop_restore_hold(h)
                for (ns_name, key), at in list(h.pending.items()):
                    if now - at > SAVE_HOLD_S:
                        e._drop_pending(h, ns_name, key)
            e._release_regions(now - REGION_GRACE_S)
            limit = int(e.high_watermark * e.capacity)
            used = e.mem_used()
            if used > limit:
                any_ns = next(iter(e.namespaces.values()), None)
                if any_ns is not None:
                    e._demote_until(used - limit, any_ns, None)
            if e.disk_live > e.disk_limit() and e.namespaces:
                try:
                    e._disk_room(next(iter(e.namespaces.values())), 0)
                except RdmakvError:
                    pass  # everything left is pinned or busy; saves will say so
            garbage = e.log.disk_bytes() - e.disk_live
        if garbage > e.log.segment_bytes // 2:
            e.compactor.wake()
        if e.reserve.held < e.reserve.size:
            e.reserve.refill()
