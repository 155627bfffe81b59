"""A store over the cluster's members: every chunk on R nodes (by rendezvous hashing of its
key), every session's whole manifest on R nodes (by its name).

Each node keeps, per session, a part: a manifest of kind ``part`` whose chunk table is the
chunks it holds, so each node refcounts and evicts its own chunks as for a local session. The
part's body names the member list the save was placed by (a node whose own list differs
refuses it as stale) and, on the name's R nodes, carries the session's whole manifest. A save
commits the parts on every other node first, the name's nodes last, so a session is visible
(its whole manifest readable) only when every chunk it names has its R copies. A restore reads
the manifest from the first of the name's nodes that answers, then fetches each node's share
at once: one READ plan per node over that node's QP (RDMA), or one batched GET per node (TCP),
all in parallel. A node that fails is replaced by the next replica for its chunks.

A delete commits a deletion marker on every live node (a part with no chunks that names the
deleted version, kept DELETE_MARK_TTL_S), which replaces the session's part there and stops a
repair that read the session before the delete from putting it back.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

from ..client.reports import KVState, RestoreReport
from ..client.restore import fill_located
from ..client.store import Store, connect
from ..client.transport import Fallback
from ..errors import (
    ConnectionLost,
    MissingChunksError,
    NotFoundError,
    RdmakvError,
    SessionChangedError,
    StaleMembersError,
)
from ..wire import chunking
from ..wire import manifest as mf
from ..wire.cluster_part import (
    ANY_VERSION,
    FLAG_DELETED,
    FLAG_REPAIR,
    UNKNOWN,
    dec_part_body,
    enc_part_body,
    members_digest,
    session_version,
)
from .membership import ClusterError, MemberWatch, parse_cluster_url
from .placement import by_member, keys64, owners, place

DEFAULT_REPLICAS = 2
SAVE_RETRY_S = 15.0  # a save placed around a dead node waits at most this for etcd to drop it
NODE_TIMEOUT_S = 10.0  # every request to one node gives up after this
NODE_FAILURES = (ConnectionLost, OSError, TimeoutError)
DELETE_MARK_TTL_S = 600.0  # a deletion marker stays this long; a repair gives a session up after half of it


@dataclass
class ClusterReport:
    nodes: int = 0
    chunks: int = 0
    failovers: int = 0  # nodes that failed during the operation and were replaced by replicas
    stale_retries: int = 0  # saves placed again after a node said the member list was stale
    transport: str = "tcp"  # "rdma" only when every node's share came by RDMA
    wall_s: float = 0.0
    per_node: dict = field(default_factory=dict)


def parse_connect_url(url: str) -> tuple[str, str]:
    """``rdmakv+etcd://HOST[:PORT]/CLUSTER/NAMESPACE`` -> (``etcd://HOST:PORT/CLUSTER``, namespace)."""
    p = urlsplit(url)
    parts = p.path.strip("/").split("/")
    if p.scheme != "rdmakv+etcd" or not p.hostname or len(parts) != 2 or not all(parts):
        raise ValueError(f"cluster URL must be rdmakv+etcd://HOST[:PORT]/CLUSTER/NAMESPACE, got {url!r}")
    etcd = f"etcd://{p.hostname}:{p.port or 2379}/{parts[0]}"
    parse_cluster_url(etcd)
    return etcd, parts[1]


class ClusterStore:
    def __init__(self, cluster_url: str, namespace: str, key: str | bytes | None = None,
                 replicas: int = DEFAULT_REPLICAS, window: int = 64, transport: str = "tcp",
                 watch: bool = True) -> None:  # fmt: skip
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self.cluster_url, self.ns, self.key = cluster_url, namespace, key
        self.replicas, self.window, self.transport = replicas, window, transport
        self.view = MemberWatch(cluster_url)
        if watch:
            self.view.start(required=True)
        else:
            self.view.reload()
        if not self.view.members:
            self.view.close()
            raise RdmakvError(f"cluster {cluster_url} has no live members")
        self._pinned: list[str] | None = None
        self._stores: dict[str, Store] = {}
        self.down: set[str] = set()

    # --- members ----------------------------------------------------------------------------
    @property
    def members(self) -> list[str]:
        return self._pinned if self._pinned is not None else self.view.members

    @members.setter
    def members(self, addrs: list[str]) -> None:
        """Place by this list instead of the watched one (tests, and repair over a fixed list)."""
        self._pinned = sorted(addrs)

    def refresh(self, hint: list[str] | None = None) -> None:
        """Re-read the member list now; when etcd is unreachable take ``hint`` (a node's list)."""
        self._pinned = None
        try:
            self.view.reload()
        except ClusterError:
            if hint:
                self._pinned = sorted(hint)
        self.down -= set(self.members)

    def live(self) -> list[str]:
        return [n for n in self.members if n not in self.down]

    def _store(self, node: str) -> Store:
        st = self._stores.get(node)
        if st is None:
            st = self._stores[node] = connect(f"rdmakv://{node}/{self.ns}", key=self.key, transport=self.transport,
                                              window=self.window, timeout=NODE_TIMEOUT_S)  # fmt: skip
        return st

    def _drop(self, node: str) -> None:
        self.down.add(node)
        st = self._stores.pop(node, None)
        if st is not None:
            try:
                st.close()
            except Exception:  # noqa: BLE001 - it failed already
                pass

    # --- save -------------------------------------------------------------------------------
    def save(self, name: str, kv: KVState) -> ClusterReport:
        """Save a session on its nodes; returns once every chunk has its R copies and the name's
        nodes hold the whole manifest. Retries (bounded by SAVE_RETRY_S) when a node says the
        member list changed or a node dies mid-save."""
        t0 = time.perf_counter()
        m, chunks = chunking.split(kv, self.window)
        deadline = time.monotonic() + SAVE_RETRY_S
        stale = failovers = 0
        while True:
            try:
                rep = self.save_placed(name, m, chunks)
                break
            except StaleMembersError as e:
                stale += 1
                self.refresh(e.members)
            except NODE_FAILURES:
                failovers += 1
                time.sleep(0.5)  # the dead node leaves the member list within the lease TTL
                self.refresh()
            if time.monotonic() > deadline:
                raise ClusterError(f"save of {name!r}: the member list did not settle within {SAVE_RETRY_S:.0f} s "
                                   f"(members {self.members}, down {sorted(self.down)})")  # fmt: skip
        rep.stale_retries, rep.failovers = stale, failovers
        rep.wall_s = time.perf_counter() - t0
        return rep

    def save_placed(self, name: str, m: mf.Manifest, chunks: list, members: list[str] | None = None,
                    fill=None, not_after: float | None = None) -> ClusterReport:  # fmt: skip
        """One placement of a save over ``members`` (default: the live list). ``chunks[i]`` may be
        None for a chunk the caller does not hold: that is a repair, whose commits a node refuses
        (SessionChangedError) when it holds a part of another version of the session, or a
        deletion marker of this one; a node that lacks such a chunk gets it from ``fill(indices)
        -> {index: bytes}``. ``not_after`` (monotonic): no commit is sent after it (a repair that
        read the session longer ago than a deletion marker is sure to be kept gives up)."""
        members = members if members is not None else self.live()
        digest = members_digest(members)
        whole = m.encode()
        version = session_version(whole)
        flags = FLAG_REPAIR if fill is not None else 0
        keys = m.keys.tolist()
        placed = by_member(m.keys, members, self.replicas)
        name_nodes = owners(name, members, self.replicas)
        for node in name_nodes:
            placed.setdefault(node, [])
        rep = ClusterReport(nodes=len(placed), chunks=len(keys))

        def commit(node: str, extra: dict | None = None) -> tuple[str, list[int]]:
            """(node, the indices it lacks that nobody here holds the bytes of)."""
            idx = placed[node]
            if not_after is not None and time.monotonic() > not_after:
                raise SessionChangedError(f"repair of {name!r} took too long since it read the session; given up")
            body = enc_part_body(digest, version, whole if node in name_nodes else b"", flags)
            part = mf.Manifest(mf.KIND_PART, body, m.keys[idx], m.lengths[idx], np.arange(len(idx), dtype=np.uint64),
                               m.hash_alg)  # fmt: skip
            data = [chunks[i] for i in idx] if not extra else [extra.get(i, chunks[i]) for i in idx]
            try:
                r = self._store(node).save_manifest(name, part, data)
            except MissingChunksError as e:
                if fill is None:
                    raise
                lacking = set(e.missing)
                return node, [i for i in idx if keys[i] in lacking]
            except NODE_FAILURES as e:
                self._drop(node)
                raise ConnectionLost(f"node {node} failed during the save: {e}") from e
            row = rep.per_node.setdefault(node, {"sent": 0, "round_trips": 0})
            row.update(chunks=len(idx), transport=r.transport)
            row["sent"] += r.chunks_sent
            row["round_trips"] += r.round_trips
            return node, []

        # the name's nodes last (see the docstring). A node that lacks chunks nobody here holds
        # (a repair) is committed again once ``fill`` fetched them: never while another thread
        # uses the same connections.
        with ThreadPoolExecutor(max(1, len(placed))) as pool:
            for group in ([n for n in placed if n not in name_nodes], name_nodes):
                lacking = {n: idx for n, idx in pool.map(commit, group) if idx}
                if lacking:
                    got = fill(sorted({i for idx in lacking.values() for i in idx}))
                    for n, still in pool.map(commit, list(lacking), [got] * len(lacking)):
                        if still:
                            raise MissingChunksError(f"node {n} still lacks {len(still)} chunk(s) of {name!r}",
                                                     [keys[i] for i in still])  # fmt: skip
        return rep

    # --- restore ----------------------------------------------------------------------------
    def whole_manifest(self, name: str, rep: ClusterReport | None = None) -> tuple[bytes, str]:
        """(the session's manifest, the node it came from), from the first name node that has it."""
        rep = rep if rep is not None else ClusterReport()
        deleted = False
        for attempt in range(2):
            for node in owners(name, self.live(), self.replicas):
                try:
                    part = self._store(node).get_manifest(name)
                except NotFoundError:
                    continue  # not there (yet): the next replica
                except NODE_FAILURES:
                    self._drop(node)
                    rep.failovers += 1
                    continue
                body = dec_part_body(part.body) if part.kind == mf.KIND_PART else None
                if body is not None and body.whole:
                    return body.whole, node
                deleted = deleted or (body is not None and body.deleted)
            if attempt == 0:
                self.refresh()  # the name's nodes may have changed since the list was read
        e = NotFoundError(f"session {name!r} is not in cluster {self.cluster_url} namespace {self.ns!r}"
                          + (" (deleted)" if deleted else ""))  # fmt: skip
        e.deleted = deleted
        raise e

    def restore(self, name: str, report: bool = False):
        t0 = time.perf_counter()
        rep = ClusterReport()
        whole, _ = self.whole_manifest(name, rep)
        m = mf.decode(whole)
        layout = chunking.decode_layout(m)
        buf = np.empty(layout.total_bytes, dtype=np.uint8)
        self.fetch_into(name, m, layout.chunk_table()[2], buf, rep)
        rep.wall_s = time.perf_counter() - t0
        kv = chunking.assemble(layout, buf.data)
        return (kv, rep) if report else kv

    def fetch_into(self, name: str, m: mf.Manifest, offsets: np.ndarray, buf: np.ndarray, rep: ClusterReport,
                   want: list[int] | None = None, ranks: int | None = None) -> None:  # fmt: skip
        """Chunks ``want`` (default all) of session ``name`` into ``buf`` at ``offsets``: each node's
        share at once, failing over to the next replica for a node that fails or lacks a chunk.
        ``ranks``: how many nodes (in rendezvous order) may hold a chunk (default R; a repair
        looks further, at every member)."""
        keys = m.keys.tolist()
        todo = list(range(len(keys))) if want is None else list(want)
        ranks = ranks or self.replicas
        tries = self._ranked(m, todo, ranks)
        refreshed = False
        transports: set[str] = set()
        while todo:
            by_node: dict[str, list[int]] = {}
            lost = []
            for i in todo:
                live = [n for n in tries[i] if n not in self.down]
                if live:
                    by_node.setdefault(live[0], []).append(i)
                else:
                    lost.append(i)
            if lost and not refreshed:  # placed by a list newer than ours: look again, once
                refreshed = True
                self.refresh()
                tries.update(self._ranked(m, lost, ranks))
                continue
            if lost:
                raise RdmakvError(f"every replica of {len(lost)} chunk(s) of {name!r} is down or lacks it "
                                  f"(first: #{lost[0]})")  # fmt: skip

            def fetch(node: str, idx: list[int]) -> list[int]:
                try:
                    missing, transport = self._fetch_node(node, name, m, keys, idx, offsets, buf)
                except NODE_FAILURES:
                    self._drop(node)
                    rep.failovers += 1
                    return idx
                transports.add(transport)
                row = rep.per_node.setdefault(node, {"chunks": 0, "transport": transport})
                row["chunks"] += len(idx) - len(missing)
                for i in missing:
                    tries[i] = [n for n in tries[i] if n != node]
                return missing

            with ThreadPoolExecutor(max(1, len(by_node))) as pool:
                todo = [i for lst in pool.map(lambda kv_: fetch(*kv_), by_node.items()) for i in lst]
            rep.nodes = max(rep.nodes, len(rep.per_node))
        rep.chunks = len(keys) if want is None else len(want)
        rep.transport = "rdma" if transports == {"rdma"} else "tcp" if transports <= {"tcp"} else "mixed"

    def _ranked(self, m: mf.Manifest, idx: list[int], ranks: int) -> dict[int, list[str]]:
        """Chunk index -> the live nodes that should hold it, best first."""
        live = self.live()
        if not idx or not live:
            return {i: [] for i in idx}
        rows = place(keys64(m.keys[idx]), live, ranks).tolist()
        return {i: [live[j] for j in row] for i, row in zip(idx, rows)}

    def _fetch_node(self, node: str, name: str, m: mf.Manifest, keys: list, idx: list[int], offsets: np.ndarray,
                    buf: np.ndarray) -> tuple[list[int], str]:  # fmt: skip
        """One node's share (``keys``: ``m.keys`` as a list), each chunk landing in place in
        ``buf``: READs at the locations the node's part lists (RDMA), else one batched GET.
        Returns (chunks it lacked, transport)."""
        st = self._store(node)
        r = RestoreReport()
        if st.active_transport == "rdma":
            found = st.rdma.lookup(name, r, one_sided=False)  # type: ignore[union-attr]
            if not isinstance(found, Fallback):
                part = mf.decode(found.manifest)
                pos = {k: j for j, k in enumerate(part.keys.tolist())}
                have = [i for i in idx if keys[i] in pos]
                pidx = np.array([pos[keys[i]] for i in have], dtype=np.int64)
                locs = found.locations.subset(pidx) if found.locations is not None else None
                fill_located(st.transports(), part.keys[pidx], part.lengths[pidx], offsets[have], locs, r, into=buf)
                return [i for i in idx if keys[i] not in pos], r.transport
        chunks = st.get_chunks([keys[i] for i in idx])  # absent chunks answer None: they fail over
        missing: list[int] = []
        for i, chunk in zip(idx, chunks):
            if chunk is None:
                missing.append(i)
            else:
                d = int(offsets[i])
                buf[d : d + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        return missing, "tcp"

    # --- the rest of the store API ----------------------------------------------------------
    def delete(self, name: str) -> int:
        """Delete a session: a deletion marker of the version read now (ANY_VERSION when none can
        be read) replaces its part on every live member; returns how many took it."""
        try:
            version = session_version(self.whole_manifest(name)[0])
        except NotFoundError:
            version = ANY_VERSION
        marker = mf.Manifest(mf.KIND_PART, enc_part_body(UNKNOWN, version, b"", FLAG_DELETED),
                             np.zeros(0, np.uint64), np.zeros(0, np.uint32), np.zeros(0, np.uint64))  # fmt: skip
        n = 0
        for node in self.live():
            try:
                self._store(node).save_manifest(name, marker, [], ttl=DELETE_MARK_TTL_S)
                n += 1
            except NODE_FAILURES:
                self._drop(node)
        return n

    def list(self) -> list[str]:
        """Every session name any live member holds a part of (a deletion marker, a part with no
        chunks and a TTL, which cluster saves never have, is not one)."""
        names: set[str] = set()
        for node in self.live():
            try:
                names.update(r["name"] for r in self._store(node).list() if r["chunks"] or r["expires_in"] is None)
            except NODE_FAILURES:
                self._drop(node)
        return sorted(names)

    def close(self) -> None:
        for node in list(self._stores):
            self._drop(node)
        self.down.clear()
        self.view.close()

    def __enter__(self) -> ClusterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_cluster(url: str, key: str | bytes | None = None, transport: str = "tcp", window: int = 64,
                    replicas: int = DEFAULT_REPLICAS) -> ClusterStore:  # fmt: skip
    """``rdmakv.connect("rdmakv+etcd://HOST:2379/CLUSTER/NAMESPACE")``: read the member list,
    watch it, and place by it."""
    etcd, ns = parse_connect_url(url)
    return ClusterStore(etcd, ns, key=key, replicas=replicas, window=window, transport=transport)
