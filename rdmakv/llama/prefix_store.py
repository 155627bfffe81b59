"""The auto-cache's prefix entries in a store: find the longest, fetch one, register a slot's.

Each call runs on one pooled store connection (``StorePool.run``) in a worker thread.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..client.reports import RestoreReport
from ..client.store import Store
from ..errors import MissingChunksError, StoreFullError
from ..hashing import key_function, keys_array
from ..wire import manifest as mf
from . import prefix_entry as pe
from . import prefix_names as pn
from .mapped_scratch import MappedScratch
from .slot_format import Buffer


@dataclass
class Found:
    """The longest stored prefix of a prompt: its length in tokens and its entry's name."""

    length: int = 0
    name: str = ""
    round_trips: int = 0


def longest_prefix(store: Store, h0: bytes, tokens: np.ndarray, window: int) -> Found:
    """The longest prefix of ``tokens`` the namespace holds an entry for: the window-aligned ones
    in one round trip, then (when some window matched, or none) the exact states ending inside
    the next window in a second."""
    chain = pn.window_chain(h0, tokens, window)
    found = Found()
    if chain:
        present = store.has_manifests(pn.window_names(chain))
        found.round_trips += 1
        hits = np.flatnonzero(present)
        if len(hits):
            k = int(hits[-1]) + 1
            found.length, found.name = k * window, pn.entry_name(chain[k - 1])
    k = found.length // window
    lengths = pn.tail_lengths(k, len(tokens), window)
    if len(lengths):
        names = [pn.entry_name(pn.prefix_digest(h0, chain, tokens, n, window)) for n in lengths]
        present = store.has_manifests(names)
        found.round_trips += 1
        hits = np.flatnonzero(present)
        if len(hits):
            found.length, found.name = lengths[int(hits[-1])], names[int(hits[-1])]
    return found


def fetch_entry(store: Store, name: str, report: RestoreReport | None = None) -> tuple[pe.Entry, list[memoryview]]:
    """An entry and its chunks (views of the connection's restore buffer: use them before the
    connection's next restore). NotFoundError when it was evicted since it was found."""
    manifest, pieces = store.load_object(name, report)
    if manifest.kind != mf.KIND_SLOTFILE or not pe.is_entry_body(manifest.body):
        raise pe.PrefixEntryError(f"{name!r} is not a prefix entry")
    return pe.decode_body(manifest.body), pieces


def fetch_into_map(store: Store, name: str, mapped: MappedScratch, path: Path, n_stream: int | None,
                   report: RestoreReport) -> tuple[pe.Entry, np.ndarray, mmap.mmap] | None:  # fmt: skip
    """Over TCP, receive the entry's chunks straight into the slot file they make, a kept mapped
    file taken from ``mapped`` at ``path``: (entry, the token ids the file holds, its map: give
    it back when done). None when the chunks have no place of their own in the file (transposed
    V): the caller writes it from ``fetch_entry`` instead."""
    mark = store.channel.mark()
    data, _, report.tier = store.channel.get_manifest(name)
    manifest = mf.decode(data)
    if manifest.kind != mf.KIND_SLOTFILE or not pe.is_entry_body(manifest.body):
        raise pe.PrefixEntryError(f"{name!r} is not a prefix entry")
    entry = pe.decode_body(manifest.body)
    layout = pe.file_layout(entry, n_stream)
    if layout is None:
        return None
    size, fixed, offsets = layout
    if not np.array_equal(manifest.lengths, pe.chunk_lengths(entry)):
        raise pe.PrefixEntryError(f"{name!r}: its chunk lengths do not fit its {entry.n_tokens} tokens")
    m = mapped.take(path, size)
    try:
        view = memoryview(m)
        try:
            for at, raw in fixed:
                view[at : at + len(raw)] = raw
            store.tcp.fill_view(manifest.keys, manifest.lengths, offsets, view)  # every chunk checked by its key
            tokens = np.frombuffer(view, "<i4", entry.n_tokens, 12).copy()  # the token chunks come first
        finally:
            view.release()
    except BaseException:
        mapped.give_back(path, m)
        raise
    nbytes, rts = store.channel.usage_since(mark)
    report.transport, report.chunks, report.bytes, report.round_trips = "tcp", manifest.n_chunks, nbytes, rts
    return entry, tokens, m


@dataclass
class Registered:
    """What registering one slot's prefixes cost."""

    wanted: int = 0  # entries the slot's state gives
    stored: int = 0  # of those, already in the store
    committed: int = 0
    chunks_sent: int = 0
    bytes_on_wire: int = 0
    round_trips: int = 0
    wall_s: float = 0.0
    skipped_reason: str = ""


def wanted_entries(cut: pe.Cut, h0: bytes, also: tuple[int, ...] = (), limit: int = pn.MAX_PREFIX_WINDOWS
                   ) -> list[tuple[int, str]]:  # fmt: skip
    """(length, name) of every entry a slot's state gives: each whole window, the exact state when
    it ends inside a window, and the lengths in ``also`` (where the prompt ended, before the answer:
    what a regenerated or edited next message shares)."""
    chain = pn.window_chain(h0, cut.tokens, cut.window, limit)
    out = [((k + 1) * cut.window, pn.entry_name(h)) for k, h in enumerate(chain)]
    n = cut.n_tokens
    for length in sorted({n, *also}):
        if 0 < length <= n and length % cut.window and length // cut.window <= len(chain):
            out.append((length, pn.entry_name(pn.prefix_digest(h0, chain, cut.tokens, length, cut.window))))
    return out


def register(store: Store, cut: pe.Cut, h0: bytes, also: tuple[int, ...] = (),
             stop: Callable[[], bool] = lambda: False) -> Registered:  # fmt: skip
    """Commit the entries of ``cut`` the namespace lacks. The longest goes first and sends the
    chunks the store does not hold; every shorter one then names chunks it has (one round trip)."""
    t0 = time.perf_counter()
    rep = Registered()
    wanted = wanted_entries(cut, h0, also)
    rep.wanted = len(wanted)
    if not wanted:
        return rep
    mark = store.channel.mark()
    present = store.has_manifests([name for _, name in wanted])
    todo = sorted(((n, name) for (n, name), have in zip(wanted, present.tolist()) if not have), reverse=True)
    rep.stored = len(wanted) - len(todo)
    key = key_function(store.hash_alg)
    keys: dict[tuple, object] = {}  # chunk identity -> key: each distinct chunk hashed once
    for length, name in todo:
        if stop():
            rep.skipped_reason = "proxy closing"
            break
        body, chunks, tags, ids = cut.entry(length)
        ks = [keys[i] if i in keys else keys.setdefault(i, key(c)) for i, c in zip(ids, chunks)]
        manifest = _manifest(store, body, chunks, tags, ks)
        try:
            saved = store.save_manifest(name, manifest, chunks)
        except MissingChunksError:  # evicted between two commits: the next save registers it
            continue
        except StoreFullError as e:
            rep.skipped_reason = f"store full: {e}"
            break
        rep.committed += 1
        rep.chunks_sent += saved.chunks_sent
    rep.bytes_on_wire, rep.round_trips = store.channel.usage_since(mark)
    rep.wall_s = time.perf_counter() - t0
    return rep


def _manifest(store: Store, body: bytes, chunks: list[Buffer], tags: list[int], ks: list) -> mf.Manifest:
    lengths = np.fromiter((memoryview(c).nbytes for c in chunks), np.uint32, len(chunks))
    return mf.Manifest(mf.KIND_SLOTFILE, body, keys_array(ks, store.hash_alg), lengths,
                       np.asarray(tags, np.uint64), store.hash_alg)  # fmt: skip
