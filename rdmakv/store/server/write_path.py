"""One connection's saves by RDMA WRITE: at most one reservation at a time.

PUT_MANIFEST (with ``reserve``) finds chunks missing: slots are reserved for them as a run, and
memory windows with REMOTE_WRITE are bound over exactly that run on this client's QP. COMMIT
invalidates the windows before anything else (the client can write nothing more), checks every
slot against its key, logs the chunks from slab memory and commits the manifest. A reservation
not committed within ``reservation_timeout`` (or replaced, or whose connection closes) has its
windows invalidated and its slots freed.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from slab import Slot

from ...errors import NotFoundError, RdmakvError
from ...hashing import Key
from ...wire import manifest as mf
from ...wire import messages as msg
from ...wire import writes as wr
from ...wire.runs import contiguous_runs
from .context import WriteContext

_ids = itertools.count(1)


class WriteReservation:
    def __init__(self, rid: int, keys: list[Key], slots: list[Slot], deadline: float) -> None:
        self.id = rid
        self.keys = keys
        self.slots = slots
        self.deadline = deadline
        self.windows: list[tuple[int, object]] = []  # (rkey, the exporter's handle to close it)


class WritePath:
    def __init__(self, handlers: WriteContext) -> None:
        self.h = handlers
        self.res: WriteReservation | None = None
        self.refused = ""  # why the last reservation could not be made (for the operator)

    def reserve(self, data: bytes, missing: np.ndarray) -> bytes | None:
        """A status-2 reply reserving the missing chunks, or None (the client sends them by TCP)."""
        h = self.h
        exporter = h.server.rdma
        if exporter is None or h.rdma_session is None or not len(missing) or missing.dtype != np.uint64:
            return None
        self.cancel()
        m = mf.decode(data)
        length_of = dict(zip(m.keys.tolist(), m.lengths.tolist()))
        keys = missing.tolist()
        lengths = [int(length_of[k]) for k in keys]
        limits = h.server.limits
        if sum(lengths) > limits.max_reserved_bytes:
            self.refused = f"save of {sum(lengths)} missing bytes exceeds max_reserved_bytes"
            return None
        slots, addrs = h.engine.reserve_run(h.ns, lengths, h.holder)
        res = WriteReservation(next(_ids), keys, slots, time.monotonic() + limits.reservation_timeout)
        try:
            runs = _runs(slots, addrs)
            if len(runs) > wr.MAX_WINDOWS:
                raise RdmakvError(f"the slab gave {len(runs)} separate runs (at most {wr.MAX_WINDOWS} windows)")
            rows = []
            for region_id, addr, length in runs:
                rkey, handle = exporter.open_window(h.rdma_session, h.ns, region_id, addr, length)
                res.windows.append((rkey, handle))
                rows.append((addr, length, rkey))
        except RdmakvError as e:
            self.refused = str(e)
            self._drop(res)
            return None
        self.res = res
        windows = np.array(rows, dtype=wr.WINDOW_DTYPE)
        expires_ms = round(limits.reservation_timeout * 1000)
        return wr.enc_reserved_result(missing, wr.Reservation(res.id, expires_ms, windows, np.array(addrs, "<u8")))

    def commit(self, payload: memoryview) -> list:
        rid, rest = wr.dec_commit(payload)
        name, data, opts = msg.dec_put_manifest(rest)
        res = self.res
        if res is None or res.id != rid:
            timeout = self.h.server.limits.reservation_timeout
            raise NotFoundError(f"no write reservation {rid} on this connection (it expired after {timeout:g} s, "
                                "or a later save replaced it)")  # fmt: skip
        self.res = None
        self._close_windows(res)  # first: from here the client can change nothing
        h = self.h
        h.engine.install_written(h.ns, res.keys, res.slots, h.holder)  # frees the slots if any lies
        missing = h.engine.commit_manifest(h.ns, name, bytes(data), h.holder, pin=opts.pin, ttl=opts.ttl,
                                           transport="rdma")  # fmt: skip
        if not len(missing):
            h.engine.publish(h.ns, name)
        return [msg.enc_manifest_result(missing)]

    def expire(self, now: float) -> None:
        if self.res is not None and now > self.res.deadline:
            self.cancel()

    def cancel(self) -> None:
        res, self.res = self.res, None
        if res is not None:
            self._drop(res)

    def _drop(self, res: WriteReservation) -> None:
        self._close_windows(res)
        self.h.engine.cancel_run(self.h.ns, res.slots)

    def _close_windows(self, res: WriteReservation) -> None:
        exporter = self.h.server.rdma
        windows, res.windows = res.windows, []
        for rkey, handle in windows:
            try:
                exporter.close_window(self.h.rdma_session, rkey, handle)
            except RdmakvError as e:
                # the QP is gone or broken: nothing can be written through it any more either
                self.h.server.say(f"rdmakv: closing a write window failed ({e})")


def _runs(slots: list, addrs: list[int]) -> list[tuple[int, int, int]]:
    """(region, address, length) of each contiguous stretch of the reserved slots."""
    return contiguous_runs([s.region for s in slots], addrs, [s.size for s in slots])
