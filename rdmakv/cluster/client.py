"""A store over the cluster's members: every chunk on R nodes (by rendezvous hashing of its
key), every session's whole manifest on R nodes (by its name).

Each node keeps, per session, a part: a manifest of kind ``part`` whose chunk table is the
chunks it holds, so each node refcounts and evicts its own chunks as for a local session. On
the name's R nodes the part's body is the session's whole manifest. A save commits the parts
on every other node first, the name's nodes last, so a session is visible (its whole manifest
readable) only when every chunk it names has its R copies. A restore reads the manifest from
the first of the name's nodes that answers and fetches each node's chunks at once (one batched
GET per node, in parallel); a node that fails is replaced by the next replica for its chunks.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..client import Store, connect
from ..errors import ConnectionLost, NotFoundError, RdmakvError
from ..kvstate import KVState
from ..wire import chunking
from ..wire import manifest as mf
from .membership import members
from .placement import owners

DEFAULT_REPLICAS = 2


@dataclass
class ClusterReport:
    nodes: int = 0
    chunks: int = 0
    failovers: int = 0  # nodes that failed during the operation and were replaced by replicas
    wall_s: float = 0.0
    per_node: dict = field(default_factory=dict)


class ClusterStore:
    def __init__(self, cluster_url: str, namespace: str, key: str | None = None, replicas: int = DEFAULT_REPLICAS,
                 window: int = 64) -> None:  # fmt: skip
        self.cluster_url, self.ns, self.key = cluster_url, namespace, key
        self.replicas, self.window = replicas, window
        self.members = sorted(members(cluster_url))
        if not self.members:
            raise RdmakvError(f"cluster {cluster_url} has no live members")
        self._stores: dict[str, Store] = {}
        self.down: set[str] = set()

    def refresh(self) -> None:
        self.members = sorted(members(self.cluster_url))

    def _store(self, node: str) -> Store:
        st = self._stores.get(node)
        if st is None:
            st = self._stores[node] = connect(f"rdmakv://{node}/{self.ns}", key=self.key, transport="tcp",
                                              window=self.window, timeout=10)  # fmt: skip
        return st

    def _drop(self, node: str) -> None:
        self.down.add(node)
        st = self._stores.pop(node, None)
        if st is not None:
            try:
                st.close()
            except Exception:  # noqa: BLE001 - it failed already
                pass

    def save(self, name: str, kv: KVState) -> ClusterReport:
        t0 = time.perf_counter()
        m, chunks = chunking.split(kv, self.window)
        whole = m.encode()
        keys = m.keys.tolist()
        placed: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            for node in owners(k, self.members, self.replicas):
                placed.setdefault(node, []).append(i)
        name_nodes = owners(name, self.members, self.replicas)
        for node in name_nodes:
            placed.setdefault(node, [])
        rep = ClusterReport(nodes=len(placed), chunks=len(keys))

        def commit(node: str) -> None:
            idx = list(dict.fromkeys(placed[node]))
            part = mf.Manifest(mf.KIND_PART, whole if node in name_nodes else b"", m.keys[idx], m.lengths[idx],
                               np.arange(len(idx), dtype=np.uint64), m.hash_alg)  # fmt: skip
            r = self._store(node).save_manifest(name, part, [chunks[i] for i in idx])
            rep.per_node[node] = {"chunks": len(idx), "sent": r.chunks_sent, "round_trips": r.round_trips}

        # the name's nodes last: the session is visible once its whole manifest is
        with ThreadPoolExecutor(max(1, len(placed))) as pool:
            list(pool.map(commit, [n for n in placed if n not in name_nodes]))
            list(pool.map(commit, name_nodes))
        rep.wall_s = time.perf_counter() - t0
        return rep

    def restore(self, name: str, report: bool = False):
        t0 = time.perf_counter()
        rep = ClusterReport()
        whole = None
        for node in owners(name, self.members, self.replicas):
            try:
                whole = self._store(node).get_manifest(name)
                break
            except NotFoundError:
                continue  # not there (yet): the next replica
            except (ConnectionLost, OSError, RdmakvError):
                self._drop(node)
                rep.failovers += 1
        if whole is None or not whole.body:
            raise NotFoundError(f"session {name!r} is not in cluster {self.cluster_url} namespace {self.ns!r}")
        m = mf.decode(whole.body)
        layout = chunking.decode_layout(m)
        offsets = layout.chunk_table()[2]
        buf = bytearray(layout.total_bytes)
        keys = m.keys.tolist()
        todo = list(range(len(keys)))
        tries = {i: owners(k, self.members, self.replicas) for i, k in enumerate(keys)}
        while todo:
            by_node: dict[str, list[int]] = {}
            for i in todo:
                live = [n for n in tries[i] if n not in self.down]
                if not live:
                    raise RdmakvError(f"every replica of chunk #{i} of {name!r} is down")
                by_node.setdefault(live[0], []).append(i)

            def fetch(node: str, idx: list[int]) -> list[int]:
                try:
                    got = self._store(node).get_chunks([keys[i] for i in idx])
                except (ConnectionLost, OSError, RdmakvError):
                    self._drop(node)
                    rep.failovers += 1
                    return idx
                missing = []
                for i, data in zip(idx, got):
                    if data is None:
                        tries[i] = [n for n in tries[i] if n != node]
                        missing.append(i)
                    else:
                        o = int(offsets[i])
                        buf[o : o + len(data)] = data
                return missing

            with ThreadPoolExecutor(max(1, len(by_node))) as pool:
                todo = [i for lst in pool.map(lambda kv_: fetch(*kv_), by_node.items()) for i in lst]
            rep.nodes = max(rep.nodes, len(by_node))
        rep.chunks = len(keys)
        rep.wall_s = time.perf_counter() - t0
        kv = chunking.assemble(layout, buf)
        return (kv, rep) if report else kv

    def repair(self) -> dict:
        """Bring every session back to R copies of each chunk and of its manifest on the live
        members, and drop the parts that placement no longer gives a node (after a loss or a
        join). A session is read whole and saved again: nodes that already hold a chunk are
        sent nothing (commit-if-all-present), new owners get it."""
        self.refresh()
        self.down.clear()
        names: set[str] = set()
        for node in self.members:
            try:
                names.update(r["name"] for r in self._store(node).list())
            except (ConnectionLost, OSError, RdmakvError):
                self._drop(node)
        live = [n for n in self.members if n not in self.down]
        out = {"members": live, "sessions": 0, "chunks_sent": 0, "parts_dropped": 0, "lost": []}
        for name in sorted(names):
            try:
                kv = self.restore(name)
            except RdmakvError:
                out["lost"].append(name)  # every copy of something it needs is gone
                continue
            self.members = live
            rep = self.save(name, kv)
            out["sessions"] += 1
            out["chunks_sent"] += sum(p["sent"] for p in rep.per_node.values())
            for node in live:
                if node not in rep.per_node:
                    try:
                        self._store(node).delete_manifest(name)
                        out["parts_dropped"] += 1
                    except NotFoundError:
                        pass
        return out

    def close(self) -> None:
        for node in list(self._stores):
            self._drop(node)
        self.down.clear()
