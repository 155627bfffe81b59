"""Repair: bring sessions back to R copies of every chunk and of their manifest on the live
members, after a node is lost or joins, and drop the parts placement no longer gives a node.

A session is committed again over the live list with no chunk bytes in hand. A node that holds
everything its part lists answers in one round trip and nothing moves; a node that lacks chunks
(a replacement owner after a loss, a new member after a join) names them, and only those are
fetched from a node that has them and sent. So a repair moves what placement moved, and no more.

A repair never brings back a session deleted after it read it: every node it commits to checks,
in the same step as the commit, that it holds no deletion marker of that version (see
``rdmakv.wire.cluster_part``), and a repair gives a session up once it read it longer ago than
half a marker's lifetime.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..errors import NotFoundError, RdmakvError, SessionChangedError
from ..progress import track
from ..wire import manifest as mf
from .client import DELETE_MARK_TTL_S, NODE_FAILURES, ClusterReport, ClusterStore
from .placement import by_member


def repair_session(cs: ClusterStore, name: str, whole: bytes, members: list[str], read_at: float | None = None) -> dict:
    """Commit ``name`` (its whole manifest ``whole``, read at ``read_at``, monotonic) again over
    ``members``; returns what moved."""
    read_at = time.monotonic() if read_at is None else read_at
    m = mf.decode(whole)
    lengths = m.lengths.tolist()
    moved = {"bytes": 0}

    def fill(idx: list[int]) -> dict[int, memoryview]:
        sizes = [lengths[i] for i in idx]
        offsets = np.zeros(len(m.keys), dtype=np.uint64)
        pos = np.cumsum([0, *sizes[:-1]], dtype=np.uint64)
        offsets[idx] = pos
        buf = np.empty(sum(sizes), dtype=np.uint8)
        cs.fetch_into(name, m, offsets, buf, ClusterReport(), want=idx, ranks=len(cs.live()))
        moved["bytes"] += len(buf)
        view = buf.data
        return {i: view[int(o) : int(o) + n] for i, o, n in zip(idx, pos.tolist(), sizes)}

    rep = cs.save_placed(name, m, [None] * m.n_chunks, members, fill=fill, not_after=read_at + DELETE_MARK_TTL_S / 2)
    dropped = 0
    for node in members:
        if node not in rep.per_node:
            try:
                cs._store(node).delete_manifest(name)
                dropped += 1
            except NotFoundError:
                pass
    return {"chunks_sent": sum(p["sent"] for p in rep.per_node.values()), "bytes_sent": moved["bytes"],
            "parts_dropped": dropped}  # fmt: skip


def repair(cs: ClusterStore, names: Iterable[str] | None = None, quiet: bool = True,
           whole_of: Callable[[str], bytes] | None = None) -> dict:  # fmt: skip
    """Repair ``names`` (default: every session any live member holds a part of); ``quiet=False``
    shows a progress line on a terminal (`rdmakv cluster repair`). ``whole_of(name)``: the
    session's whole manifest (default: read from its name nodes; a node repairing passes its own,
    read locally, so its node key never reads a session through the client API)."""
    t0 = time.monotonic()
    cs.refresh()
    names = sorted(cs.list() if names is None else names)
    live = cs.live()
    whole_of = whole_of or (lambda n: cs.whole_manifest(n)[0])
    out: dict[str, Any] = {"members": live, "sessions": 0, "under_replicated": 0, "chunks_sent": 0, "bytes_sent": 0,
           "parts_dropped": 0, "changed": 0, "deleted": 0, "lost": [], "failed": [],
           "still_under_replicated": 0}  # fmt: skip
    for name in track(names, f"repairing over {len(live)} members", unit="session", quiet=quiet):
        try:
            read_at = time.monotonic()
            whole = whole_of(name)
        except NotFoundError as e:
            if getattr(e, "deleted", False):
                out["deleted"] += 1  # deleted meanwhile: nothing to repair
            else:
                out["lost"].append(name)  # no live node holds its whole manifest
            continue
        try:
            r = repair_session(cs, name, whole, live, read_at)
        except SessionChangedError:
            out["changed"] += 1  # saved again meanwhile: that save placed it over the live list itself
            continue
        except (RdmakvError, *NODE_FAILURES) as e:
            out["failed"].append(f"{name}: {type(e).__name__}: {e}")
            continue
        out["sessions"] += 1
        out["under_replicated"] += bool(r["chunks_sent"] or r["parts_dropped"])
        for k in ("chunks_sent", "bytes_sent", "parts_dropped"):
            out[k] += r[k]
    if len(live) < cs.replicas:  # fewer members than copies: nothing can bring them back to R
        out["still_under_replicated"] = out["sessions"]
    out["seconds"] = round(time.monotonic() - t0, 3)
    out["bytes_per_s"] = round(out["bytes_sent"] / out["seconds"]) if out["seconds"] else 0
    return out


def check(cs: ClusterStore, names: Iterable[str] | None = None) -> dict:
    """Count what is under-replicated without changing anything: for each session, the chunks
    with fewer than R copies on the live members. (Whether each of its name nodes holds the
    whole manifest is not counted: a session counts as found when one of them has it.)"""
    cs.refresh()
    live = cs.live()
    names = sorted(cs.list() if names is None else names)
    out: dict[str, Any] = {"members": live, "sessions": 0, "under_replicated_sessions": 0, "under_replicated_chunks": 0,
           "lost": []}  # fmt: skip
    for name in names:
        try:
            whole, _ = cs.whole_manifest(name)
        except NotFoundError as e:
            if not getattr(e, "deleted", False):
                out["lost"].append(name)
            continue
        m = mf.decode(whole)
        keys = m.keys.tolist()
        copies = np.zeros(len(keys), dtype=np.int64)
        want = min(cs.replicas, len(live))
        by_node = by_member(m.keys, live, cs.replicas)
        for node, idx in by_node.items():
            try:
                have = cs._store(node).exists([keys[i] for i in idx])
            except NODE_FAILURES:
                continue
            copies[np.asarray(idx)[np.asarray(have, dtype=bool)]] += 1
        short = int((copies < want).sum())
        out["sessions"] += 1
        out["under_replicated_chunks"] += short
        out["under_replicated_sessions"] += bool(short) or len(live) < cs.replicas
    return out
