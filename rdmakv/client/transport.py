"""How a restore moves bytes: one small interface, two implementations.

A transport answers the two questions of a restore. ``lookup``: where is session NAME (its
manifest, and over RDMA where each chunk lies in the server's slab). ``fill``: put these chunks
there (into a destination buffer at given offsets, every chunk verified against its key or the
store's check). TCP does both over the connection's channel (:class:`TcpTransport`, here); RDMA
looks up by a READ of the published index or over TCP with locations, and fills by one READ plan
(``rdmakv.rdma.restore.RdmaRestorer``). A transport that cannot serve a step says so with a
:class:`Fallback` and its reason, never with None; the caller then goes on over TCP.
``rdmakv.client.restore`` is the one restore built on this, for the single-node and the cluster
clients alike.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from fallback_tcp.transport import TcpChannel

from ..hashing import Key
from ..wire.messages import Locations
from .bufpool import BufferPool
from .reports import RestoreReport

PREFETCH_LIMIT = 256 << 20  # bytes of chunks prefetched by key and kept for the next restore


@dataclass(frozen=True)
class Fallback:
    """A transport could not serve this step; ``reason`` says why (it goes in the report)."""

    reason: str


@dataclass
class Found:
    """What a lookup found: the manifest, and where its chunks lie when the transport reads them
    from the server's memory itself."""

    manifest: bytes
    locations: Locations | None = None
    tier: str = "memory"  # where the server had the session: "memory" or "disk"
    one_sided: bool = False  # looked up by READ: stale locations mean "look up again", not "fix up"


@dataclass
class Dest:
    """Where fetched chunks go: ``view`` (uint8), whose first byte is at ``addr``; ``lkey`` is its
    registration on the transport that fills it (None: not registered, TCP only)."""

    view: np.ndarray
    addr: int = 0
    lkey: int | None = None
    registration: object | None = None  # a registration made for this Dest alone (see ``release``)


Filled = Literal["ok", "moved"]  # "moved": a strict fill found a chunk gone from where it was looked up


class Transport(Protocol):
    name: str  # "tcp" or "rdma", as reports say
    channel: TcpChannel  # the connection's TCP channel (lookups, and what a restore counts)

    def lookup(self, name: str, rep: RestoreReport, *, one_sided: bool = True) -> Found | Fallback: ...

    def buffer(self, nbytes: int) -> Dest: ...

    def adopt(self, view: np.ndarray) -> Dest: ...

    def release(self, dest: Dest) -> None: ...

    def fill(self, keys: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, locations: Locations | None,
             dest: Dest, rep: RestoreReport, *, strict: bool = False) -> Filled | Fallback: ...  # fmt: skip


class PrefetchCache:
    """Chunks fetched by key ahead of a restore (``Store.prefetch``), used once by the next fill."""

    def __init__(self, limit: int = PREFETCH_LIMIT) -> None:
        self.limit = limit
        self._chunks: OrderedDict[Key, bytes] = OrderedDict()
        self._bytes = 0

    def add(self, keys: Sequence[Key], fetch: Callable[[list[Key]], list[bytes | None]]) -> int:
        """Fetch and keep the chunks of ``keys`` not kept yet; returns the bytes added."""
        want = [k for k in keys if k not in self._chunks]
        got = 0
        for k, data in zip(want, fetch(want) if want else []):
            if data is not None and k not in self._chunks:
                self._chunks[k] = data
                self._bytes += len(data)
                got += len(data)
        while self._bytes > self.limit and self._chunks:
            _, old = self._chunks.popitem(last=False)
            self._bytes -= len(old)
        return got

    def take(self, key: Key) -> bytes | None:
        data = self._chunks.pop(key, None)
        if data is not None:
            self._bytes -= len(data)
        return data

    def __len__(self) -> int:
        return len(self._chunks)


class TcpTransport:
    """Lookups by GET_MANIFEST, fills by pipelined GET_CHUNKS received straight into place."""

    name = "tcp"

    def __init__(self, channel: TcpChannel) -> None:
        self.channel = channel
        self.cache = PrefetchCache()
        self.pool: BufferPool | None = None  # restore buffers; the RDMA path lends its registered pool

    def lookup(self, name: str, rep: RestoreReport, *, one_sided: bool = True) -> Found:
        """The manifest, with the session's first chunks following it for ``fill`` to take."""
        data, rep.tier = self.channel.get_manifest_with_chunks(name)
        return Found(data, None, rep.tier)

    def buffer(self, nbytes: int) -> Dest:
        if self.pool is None:
            self.pool = BufferPool(None)
        view, addr, _ = self.pool.alloc(nbytes)
        return Dest(view, addr)

    def adopt(self, view: np.ndarray) -> Dest:
        return Dest(view, int(view.ctypes.data))

    def release(self, dest: Dest) -> None:
        pass

    def fill(self, keys: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, locations: Locations | None,
             dest: Dest, rep: RestoreReport, *, strict: bool = False) -> Filled:  # fmt: skip
        self.fill_view(keys, lengths, offsets, dest.view.data)
        rep.transport = "tcp"
        rep.chunks += len(keys)
        return "ok"

    def fill_view(self, keys: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, dest: memoryview) -> None:
        """Chunks into ``dest`` at ``offsets``: each distinct chunk received straight into its first
        place (or taken from the prefetch cache), then copied to any other place it has."""
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        order = np.argsort(first)  # fetch in manifest order: sequential slab reads
        ukeys = uniq[order].tolist()
        ulens = lengths[first[order]].tolist()
        home = offsets[first[order]].tolist()
        # (the chunks that followed this restore's manifest: they are this fill's first keys)
        came = self.channel.take_following(ukeys, ulens, dest, home)
        todo = []
        for i, k in enumerate(ukeys):
            if i in came:
                continue
            cached = self.cache.take(k) if len(self.cache) else None
            if cached is not None:
                dest[home[i] : home[i] + ulens[i]] = cached
            else:
                todo.append(i)
        if todo:
            self.channel.fetch_chunks([ukeys[i] for i in todo], [ulens[i] for i in todo], dest, [home[i] for i in todo])
        if len(ukeys) != len(keys):  # the same chunk at several places: copy from where it landed
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            src = np.asarray(home, dtype=np.int64)[rank[inverse]]
            for pos, s, n in zip(offsets.tolist(), src.tolist(), lengths.tolist()):
                if pos != s:
                    dest[pos : pos + n] = dest[s : s + n]
