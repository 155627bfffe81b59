"""A store connection that survives the server: one worker thread, reconnecting by itself.

LMCache must never see an exception from the store. A ``Lane`` owns one ``Store`` and runs
every call on its own thread (a Store is used by one caller at a time). When the server is down
or unreachable, a call fails fast with ``Unavailable`` (the connector turns that into a miss or
a dropped put) and the lane tries to reconnect at most once per ``retry_s`` (doubling up to
``MAX_RETRY_S`` while it keeps failing). A wrong key is reported the same way, and logged: keys
can be rotated under a running engine. The backlog is bounded: past ``max_pending`` queued calls
a new one fails at once instead of piling up behind a slow server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ..client.store import Store
from ..errors import BusyError, ConnectionLost, RdmakvError

log = logging.getLogger("rdmakv.lmcache")
T = TypeVar("T")

MAX_RETRY_S = 5.0
DEFAULT_MAX_PENDING = 256
# what means "the server is not there (now)": drop the connection and reconnect later
DOWN_ERRORS = (ConnectionLost, ConnectionError, TimeoutError, OSError, BusyError)


class Unavailable(Exception):
    """The store cannot be reached now (or the lane is closed or full); nothing was done."""


class Lane:
    def __init__(self, name: str, connect: Callable[[], Store], *, retry_s: float = 1.0,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:  # fmt: skip
        self.name = name
        self._connect = connect
        self.retry_s = retry_s
        self.max_pending = max_pending
        self.store: Store | None = None
        self.counters: Counter[str] = Counter()
        self.down_reason = ""  # why the last connect or call failed ("" while up)
        self.last_error: BaseException | None = None  # what the last failed connect raised
        self._next_try = 0.0
        self._backoff = retry_s
        self._pending = 0
        self._closed = False
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"rdmakv-lmcache-{name}")
        self.on_connect: Callable[[Store], None] | None = None  # e.g. register LMCache's buffer
        self.on_drop: Callable[[Store], None] | None = None

    # -- calls -----------------------------------------------------------------------------
    def submit(self, fn: Callable[[Store], T]) -> Future[T]:
        """Run ``fn(store)`` on the lane's thread; the future raises Unavailable when the store
        is down, the lane is closed or its backlog is full, and whatever ``fn`` raised otherwise."""
        with self._lock:
            if self._closed:
                return _failed(Unavailable(f"the {self.name} connection is closed"))
            if self._pending >= self.max_pending:
                self.counters["refused_backlog"] += 1
                return _failed(Unavailable(f"{self._pending} calls already wait on the {self.name} connection"))
            self._pending += 1
        try:
            return self._pool.submit(self._run, fn)
        except RuntimeError as e:  # the pool shut down under us
            with self._lock:
                self._pending -= 1
            return _failed(Unavailable(str(e)))

    def call(self, fn: Callable[[Store], T], timeout: float | None) -> T:
        """``submit`` and wait; Unavailable also when ``timeout`` passes first."""
        fut = self.submit(fn)
        try:
            return fut.result(timeout)
        except TimeoutError as e:
            fut.cancel()
            raise Unavailable(f"the {self.name} connection did not answer within {timeout} s") from e

    def _run(self, fn: Callable[[Store], T]) -> T:
        try:
            store = self._ensure()
            try:
                return fn(store)
            except DOWN_ERRORS as e:
                self._drop(f"{type(e).__name__}: {e}")
                raise Unavailable(self.down_reason) from e
        finally:
            with self._lock:
                self._pending -= 1

    # -- the connection --------------------------------------------------------------------
    @property
    def up(self) -> bool:
        return self.store is not None

    def _ensure(self) -> Store:
        if self.store is not None:
            return self.store
        if self._closed:
            raise Unavailable(f"the {self.name} connection is closed")
        now = time.monotonic()
        if now < self._next_try:
            raise Unavailable(self.down_reason or "reconnecting")
        try:
            store = self._connect()
        except (RdmakvError, *DOWN_ERRORS) as e:  # a wrong key too: keys can be rotated under us
            self.last_error = e
            self._failed_connect(f"{type(e).__name__}: {e}")
            raise Unavailable(self.down_reason) from e
        if self.on_connect is not None:
            try:
                self.on_connect(store)
            except Exception as e:
                store.close()
                self._failed_connect(f"setting the connection up failed: {e}")
                raise Unavailable(self.down_reason) from e
        if self.counters["disconnects"] or self.counters["connect_failures"]:
            log.warning("rdmakv: the %s connection is back (%s)", self.name, store.active_transport)
            self.counters["reconnects"] += 1
        self.store, self.down_reason, self._backoff, self.last_error = store, "", self.retry_s, None
        return store

    def _failed_connect(self, reason: str) -> None:
        self.counters["connect_failures"] += 1
        if reason != self.down_reason:  # once per distinct reason, not once per retry
            log.warning("rdmakv: the %s connection is down (%s); retrying every %g s at most",
                        self.name, reason, self._backoff)  # fmt: skip
        self.down_reason = reason
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_RETRY_S)

    def _drop(self, reason: str) -> None:
        store, self.store = self.store, None
        self.counters["disconnects"] += 1
        log.warning("rdmakv: the %s connection was lost (%s); it reconnects by itself", self.name, reason)
        self.down_reason = reason
        self._next_try = time.monotonic() + self.retry_s * 0.5  # the first retry comes soon
        if store is not None:
            self._close_store(store)

    def _close_store(self, store: Store) -> None:
        try:
            if self.on_drop is not None:
                self.on_drop(store)
        except Exception:  # noqa: BLE001 - it is being thrown away
            pass
        try:
            store.close()
        except Exception:  # noqa: BLE001 - it is being thrown away
            pass

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
        done = threading.Event()

        def last() -> None:
            store, self.store = self.store, None
            if store is not None:
                self._close_store(store)
            done.set()

        try:
            self._pool.submit(last)
        except RuntimeError:
            return
        done.wait(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _failed(e: BaseException) -> Future:
    f: Future = Future()
    f.set_exception(e)
    return f
