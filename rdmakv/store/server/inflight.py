"""One budget for the bytes of requests in flight, across every connection of a server.

A request's bytes are charged from the moment its frame header is read until the request has
been served: the frame being received (its whole announced length, before a byte of its payload
is buffered) and, for a message that continues over several frames, the parts joined so far.
Frames of at most ``SMALL_FRAME`` bytes that are not part of a continued message are not
charged: they fit the buffer every connection keeps anyway (counted in the per-connection
overhead, docs/operations.md).

When a frame does not fit, the request is refused with BUSY: its bytes are read and dropped as
they arrive (the connection stays usable), and a continued message it belonged to is dropped
whole. A message that could not fit even in an empty budget is refused as too large.
"""

from __future__ import annotations

import threading

from ...errors import BusyError, TooLargeError
from ...wire.frames import SMALL_BUFFER

SMALL_FRAME = SMALL_BUFFER  # a frame this small is never charged (unless it continues a message)
MIN_INFLIGHT = 96 << 20  # the default budget, or max_frame and a half when frames are larger


def default_inflight(max_frame: int) -> int:
    return max(MIN_INFLIGHT, max_frame + max_frame // 2)


class InflightBudget:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the in-flight budget must be positive")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.refused = 0  # requests answered BUSY (or too large) because of it
        self._lock = threading.Lock()

    def take(self, n: int, held: int) -> None:
        """Charge ``n`` more bytes to a request already holding ``held``; raise BusyError when
        they do not fit now, TooLargeError when they never could."""
        if held + n > self.limit:
            with self._lock:
                self.refused += 1
            raise TooLargeError(f"a request of more than {held + n} bytes exceeds the server's budget for requests "
                                f"in flight ({self.limit} bytes, --max-inflight)")  # fmt: skip
        with self._lock:
            if self.used + n > self.limit:
                self.refused += 1
                raise BusyError(f"server busy: {self.used} bytes of requests in flight (limit {self.limit}, "
                                "--max-inflight); try again")  # fmt: skip
            self.used += n
            self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        if n:
            with self._lock:
                self.used -= n

    def stats(self) -> dict:
        with self._lock:
            return {"inflight_bytes": self.used, "inflight_peak_bytes": self.peak, "inflight_limit_bytes": self.limit,
                    "inflight_refused": self.refused}  # fmt: skip
