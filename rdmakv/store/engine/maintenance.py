"""Background upkeep, once a second: a thread that runs the engine's ``upkeep`` (TTL expiry, holds
that ran out of time, empty slab regions past their grace period, memory and disk pressure, the
reserve, waking the compactor) and reports what went wrong without stopping."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ...errors import RdmakvError

PERIOD_S = 1.0


class Maintenance:
    def __init__(self, upkeep: Callable[[], None], say: Callable[[str], None]) -> None:
        self.upkeep = upkeep
        self.say = say
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
            self.run_once()

    def run_once(self) -> None:
        try:
            self.upkeep()
        except RdmakvError as e:
            self.say(f"rdmakv: maintenance: {e}")
        except Exception as e:  # noqa: BLE001 - a bug here must not end the server
            self.say(f"rdmakv: maintenance failed: {e!r}")
