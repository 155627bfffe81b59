"""The one restore: look a session up and fill its chunks, by the first transport that can.

Read top-down: ``fetch`` tries each transport in turn (RDMA first when the connection has it,
TCP last, which never falls back); a transport either serves both steps or says why it could
not (a Fallback, kept in the report), and the next one starts over. A one-sided lookup whose
chunks moved before they were read is looked up again by request on the same transport.
``fill_located`` is the same for chunks whose locations the caller already has (a prefetch by
key, one node's share of a cluster session). Nothing here calls back into ``Store``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from fallback_tcp.transport import TcpChannel

from ..wire import chunking
from ..wire import manifest as mf
from ..wire.messages import Locations
from .reports import RestoreReport
from .transport import Dest, Fallback, Found, Transport

# what a manifest means to the caller: (manifest, its KV layout or None, each chunk's offset in
# the restore buffer, the buffer's size)
Target = tuple[mf.Manifest, "chunking.KVLayout | None", np.ndarray, int]
Fetched = tuple[mf.Manifest, "chunking.KVLayout | None", np.ndarray, np.ndarray]  # (manifest, layout, buffer, offsets)


def fetch(transports: Sequence[Transport], name: str, rep: RestoreReport, target: Callable[[bytes], Target],
          after_locate: Callable[..., object] | None = None) -> Fetched:  # fmt: skip
    """Session ``name``'s chunks in one buffer, by the first of ``transports`` that serves it.
    ``after_locate``: called between the lookup and the fill (tests race an overwrite there)."""
    for t in transports:
        got = _fetch_by(t, name, rep, target, after_locate)
        if not isinstance(got, Fallback):
            return got
        rep.fallback_reason = rep.fallback_reason or got.reason
    raise AssertionError("the last transport of a restore (TCP) never falls back")


@contextmanager
def charged(channel: TcpChannel, rep: RestoreReport) -> Iterator[None]:
    """What the block costs on the connection's channel (bytes, round trips) goes in ``rep``."""
    mark = channel.mark()
    try:
        yield
    finally:
        nbytes, rts = channel.usage_since(mark)
        rep.bytes += nbytes
        rep.round_trips += rts


def _fetch_by(t: Transport, name: str, rep: RestoreReport, target: Callable[[bytes], Target],
              after_locate: Callable[..., object] | None) -> Fetched | Fallback:  # fmt: skip
    with charged(t.channel, rep):
        found = t.lookup(name, rep, one_sided=after_locate is None)
        if isinstance(found, Fallback):
            return found
        m, layout, offsets, total = target(found.manifest)
        dest = t.buffer(total)
        if after_locate is not None:
            after_locate()
        got = t.fill(m.keys, m.lengths, offsets, found.locations, dest, rep, strict=found.one_sided)
        if got == "moved":  # the index's version lost a chunk since: look it up by request instead
            rep.index_fallbacks += 1
            again = t.lookup(name, rep, one_sided=False)
            if isinstance(again, Fallback):
                return again
            found = again
            m, layout, offsets, total = target(found.manifest)
            dest = t.buffer(total)
            got = t.fill(m.keys, m.lengths, offsets, found.locations, dest, rep)
        if isinstance(got, Fallback):
            return got
        if found.one_sided:
            rep.lookup = "one-sided"
        return m, layout, dest.view, offsets


def fill_located(transports: Sequence[Transport], keys: np.ndarray, lengths: np.ndarray, offsets: np.ndarray,
                 locations: Locations | None, rep: RestoreReport, *, total: int = 0,
                 into: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Chunks whose lookup is done (``locations``: where they lie, for RDMA) into ``into`` (a
    caller's uint8 array: each chunk lands in place) or a new buffer of ``total`` bytes, at
    ``offsets``, by the first transport that can; returns the buffer."""
    for t in transports:
        dest = t.adopt(into) if into is not None else t.buffer(total)
        try:
            with charged(t.channel, rep):
                got = t.fill(keys, lengths, offsets, locations, dest, rep)
        finally:
            t.release(dest)
        if not isinstance(got, Fallback):
            return dest.view
        rep.fallback_reason = rep.fallback_reason or got.reason
    raise AssertionError("the last transport of a fill (TCP) never falls back")


def packed(lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """(offsets, total) of chunks laid back to back."""
    return mf.packed_offsets(lengths), int(lengths.sum(dtype=np.uint64))


__all__ = ["Dest", "Fallback", "Fetched", "Found", "charged", "fetch", "fill_located", "packed"]
