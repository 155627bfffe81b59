"""A bounded pool of store connections for the proxy's worker threads.

One connection behind one lock serialized every slot of every client; here each call takes an
idle connection (or opens one, up to ``size``), so saves and restores of different slots
overlap. A connection that failed mid-call is closed, never reused: a timeout or reset can
leave half a frame on its socket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import CodecError, ConnectionLost, NotFoundError, RdmakvError

T = TypeVar("T")

DEFAULT_POOL_SIZE = 4
DEFAULT_POOL_WAIT_S = 30.0


class PoolBusyError(RdmakvError):
    """Every connection stayed busy for the whole wait."""

    code = 26


class StorePool:
    def __init__(self, url: str, transport: str, window: int, size: int = DEFAULT_POOL_SIZE,
                 wait_s: float = DEFAULT_POOL_WAIT_S) -> None:  # fmt: skip
        if size < 1:
            raise ValueError(f"store pool size must be at least 1, got {size}")
        self.url, self.transport, self.window = url, transport, window
        self.size, self.wait_s = size, wait_s
        self._idle: list[Any] = []
        self._open = 0  # idle + in use
        self._cv = threading.Condition()
        self._closed = False

    def _take(self) -> Any | None:
        """An idle connection, or None with a slot reserved for a new one."""
        deadline = time.monotonic() + self.wait_s
        with self._cv:
            while not self._idle and self._open >= self.size:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise PoolBusyError(f"all {self.size} store connections stayed busy for {self.wait_s:g} s "
                                        "(raise --store-connections)")  # fmt: skip
                self._cv.wait(left)
            if self._idle:
                return self._idle.pop()
            self._open += 1
            return None

    def _give_back(self, store: Any | None) -> None:
        with self._cv:
            if store is not None and not self._closed:
                self._idle.append(store)
            else:
                self._open -= 1
                if store is not None:
                    store.close()
            self._cv.notify()

    def _connect(self) -> Any:
        from ..client.store import connect

        return connect(self.url, transport=self.transport, window=self.window, timeout=30)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(store, *args)`` on a pooled connection; one retry on a fresh one if it was lost."""
        store = self._take()
        try:
            for attempt in range(2):
                if store is None:
                    store = self._connect()
                try:
                    return fn(store, *args)
                except (NotFoundError, CodecError):
                    raise  # answers, not failures: the connection is still in step
                except Exception as e:
                    store.close()
                    store = None
                    if attempt or not isinstance(e, (ConnectionLost, OSError)):
                        raise
            raise AssertionError("unreachable")
        finally:
            self._give_back(store)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cv.notify_all()
        for s in idle:
            s.close()
