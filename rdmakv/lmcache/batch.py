"""Many sessions saved or fetched at once, on one Store, into and out of caller memory.

This is what LMCache's batched calls become, without LMCache (testable on any buffer):

- ``save_many``: one PUT_MANIFESTS commits every value whose chunks the store has (a warm
  batch is one round trip). The rest send what they lack: by RDMA WRITE (the native save, one
  reservation per value) when the connection has RDMA, else every missing chunk of the batch in
  one pipelined PUT_CHUNKS and a second PUT_MANIFESTS.
- ``lookup_many``: each name's manifest and chunk locations, by READ from the server's one-sided
  index when the connection has RDMA (no request to the server), and one GET_MANIFESTS for the
  names the index did not have (those versions are then held by the server while they are read).
- ``read_many``: every chunk of every value lands in its place in the destination memory: one
  READ plan into the caller's registered buffer, or one batched GET over TCP. Every chunk is
  verified against its key either way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..client.reports import RestoreReport
from ..client.restore import charged
from ..client.store import Store
from ..client.transport import Dest, Fallback
from ..errors import ConnectionLost, RdmakvError
from ..wire import batches
from ..wire import manifest as mf
from ..wire.messages import Locations

MAX_SAVE_ROUNDS = 3  # PUT_MANIFESTS rounds of one batch before what is still missing counts as failed


@dataclass
class SaveSummary:
    committed: int = 0
    warm: int = 0  # committed by the first PUT_MANIFESTS: nothing had to be sent
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    chunks_sent: int = 0
    sent_by: Counter[str] = field(default_factory=Counter)  # values whose missing chunks went by "rdma" or "tcp"


def save_many(store: Store, items: Sequence[tuple[str, mf.Manifest, Sequence[memoryview]]]) -> SaveSummary:
    """Commit every (name, manifest, its chunks' bytes); errors of single values are collected
    in ``failed``, a lost connection raises (the caller drops the batch)."""
    out = SaveSummary()
    todo = list(items)
    for round_no in range(MAX_SAVE_ROUNDS):
        outcomes = store.put_manifests([(name, m) for name, m, _ in todo])
        cold: list[tuple[int, np.ndarray]] = []
        for i, o in enumerate(outcomes):
            if o.status == batches.COMMITTED:
                out.committed += 1
                out.warm += round_no == 0
            elif o.status == batches.MISSING:
                cold.append((i, o.missing))
            else:
                out.failed.append((todo[i][0], f"{o.message} (code {o.code})"))
        if not cold:
            return out
        if store.active_transport == "rdma" and store.rdma_writes:
            for i, _ in cold:  # the native save: reservation, WRITE, COMMIT
                name, m, chunks = todo[i]
                try:
                    rep = store.save_manifest(name, m, chunks)
                except ConnectionLost:
                    raise
                except RdmakvError as e:  # this value's own trouble (the store is full, ...)
                    out.failed.append((name, f"{type(e).__name__}: {e}"))
                    continue
                out.committed += 1
                out.chunks_sent += rep.chunks_sent
                out.sent_by[rep.transport] += 1  # "tcp" when the server could not reserve (see its STATS)
            return out
        want: dict = {}
        for i, missing in cold:
            by_key = dict(zip(todo[i][1].keys.tolist(), todo[i][2]))
            for k in missing.tolist():
                if k not in want and k in by_key:
                    want[k] = by_key[k]
        if want:
            store.channel.put_chunks(list(want), list(want.values()))
            out.chunks_sent += len(want)
        todo = [todo[i] for i, _ in cold]
        out.sent_by["tcp"] += len(todo)
    out.failed += [(name, "chunks were still missing after the upload (the store dropped them)") for name, _, _ in todo]
    return out


@dataclass
class Located:
    manifest: bytes
    loc: Locations | None  # chunk locations (RDMA); None over TCP
    one_sided: bool  # found by READ in the index: nothing holds this version on the server


def lookup_many(store: Store, names: Sequence[str], rep: RestoreReport, *, one_sided: bool = True
                ) -> list[Located | None]:  # fmt: skip
    """Each name's manifest (and locations when the connection reads by RDMA), or None when it
    is not stored. One-sided first (unless ``one_sided`` is False); one GET_MANIFESTS for the rest."""
    out: list[Located | None] = [None] * len(names)
    rdma = store.rdma if store.active_transport == "rdma" else None
    if one_sided and rdma is not None and rdma.index is not None and rdma.one_sided:
        from ..rdma.errors import RdmaError

        try:
            for i, found in enumerate(rdma.index.lookup_many(list(names), rep)):
                if found is not None:
                    out[i] = Located(found[0], found[1], True)
        except RdmaError as e:
            rdma.latch(f"RDMA READ of the lookup index failed ({e}); this connection now uses TCP")
            rep.fallback_reason = rdma.latched_reason
            out = [None] * len(names)
    rest = [i for i, got in enumerate(out) if got is None]
    if rest:
        _lookup_tcp(store, names, rest, out, rep)
    return out


def _lookup_tcp(store: Store, names: Sequence[str], idx: list[int], out: list[Located | None],
                rep: RestoreReport) -> None:  # fmt: skip
    want = store.active_transport == "rdma"
    with charged(store.channel, rep):
        for start in range(0, len(idx), batches.MAX_BATCH):
            part = idx[start : start + batches.MAX_BATCH]
            found, regions = store.get_manifests([names[i] for i in part], want_locations=want)
            for i, f in zip(part, found):
                if f.status == batches.FOUND:  # NOT_SERVED (a reply past the frame budget) counts as a miss
                    loc = None
                    if regions is not None and f.slots is not None:
                        loc = Locations(regions, f.slots, f.checks, f.check_alg)
                    out[i] = Located(f.manifest, loc, False)


def read_many(store: Store, values: Sequence[tuple[mf.Manifest, Locations | None, int]], dest: Dest,
              rep: RestoreReport, *, strict: bool = False) -> str:  # fmt: skip
    """Every chunk of each (manifest, locations, offset of the value in ``dest``) into place,
    laid back to back from that offset. "ok", or "moved" (``strict`` READ plan found a chunk
    moved: look the values up again over TCP and read them without ``strict``)."""
    if not values:
        return "ok"
    keys = np.concatenate([m.keys for m, _, _ in values])
    lengths = np.concatenate([m.lengths for m, _, _ in values])
    offsets = np.concatenate([m.packed_offsets() + np.uint64(at) for m, _, at in values])
    rdma = store.rdma if store.active_transport == "rdma" else None
    locs = [loc for _, loc, _ in values if loc is not None]
    loc = merge_locations(locs) if rdma is not None and dest.lkey is not None and len(locs) == len(values) else None
    if rdma is not None and loc is not None:
        with charged(store.channel, rep):
            got = rdma.fill(keys, lengths, offsets, loc, dest, rep, strict=strict)
        if not isinstance(got, Fallback):
            return got
        rep.fallback_reason = rep.fallback_reason or got.reason
    with charged(store.channel, rep):
        store.tcp.fill(keys, lengths, offsets, None, dest, rep)
    return "ok"


def merge_locations(locs: Sequence[Locations]) -> Locations | None:
    """One Locations for the chunks of several values: their region tables joined by region id
    (a region's id names one registration; a stale one fails verification and is re-read).
    None when the values' chunks carry different kinds of checks (they are then read over TCP)."""
    tables = [loc.regions for loc in locs]
    joined = np.concatenate(tables) if tables else locs[0].regions
    _, first = np.unique(joined["id"], return_index=True)
    slots = np.concatenate([loc.slots for loc in locs])
    algs = {loc.check_alg for loc in locs}
    if algs == {0}:
        return Locations(joined[np.sort(first)], slots)
    if len(algs) != 1:  # opaque keys beside content keys: not from one engine, but never a wrong read
        return None
    checks = np.concatenate([loc.checks for loc in locs if loc.checks is not None])
    return Locations(joined[np.sort(first)], slots, checks, algs.pop())
