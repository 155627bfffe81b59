"""One authenticated connection's operations: decode the request, call the engine, encode the
reply. Every reply fits the frame limit (GET_CHUNKS and LIST are paged; a chunk larger than a
frame is the one exception, and travels in continuation frames). An admin key may manage any
namespace (STATS, LIST, COMPACT, PIN) but never reads or writes its sessions. A cluster's node
key moves chunks and repair parts between nodes (NODE_OPS; the node agent checks each part)
and never saves, restores or lists sessions."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import numpy as np

from ... import __version__
from ...errors import AuthError, NotFoundError, ProtocolError, RdmakvError
from ...wire import batches
from ...wire import manifest as mf
from ...wire import messages as msg
from ...wire.protocol import Header, Op
from ..engine.admission import SaveMustWait
from .context import RdmaSession, ServerContext
from .write_path import WritePath

if TYPE_CHECKING:
    from ...hashing import Key
    from ...wire.keyring import KeyEntry

MANAGEMENT_OPS = {Op.STATS, Op.LIST, Op.COMPACT, Op.PIN}
ADMIN_OPS = {Op.COMPACT}  # store-wide: only an admin key
NODE_OPS = {Op.EXISTS, Op.PUT_CHUNKS, Op.GET_CHUNKS, Op.PUT_MANIFEST, Op.DELETE_MANIFEST}  # a node key: repair
STATS_NAMESPACES = 64  # an admin's STATS lists this many namespaces (the largest), to stay one small frame


class Reply:
    """Reply parts, and what to do once they are sent (let go of held chunks); ``then``: a second
    reply to the same request, sent right after this one as (opcode, reply)."""

    __slots__ = ("parts", "after", "then")

    def __init__(self, parts: list, after: Callable[[], None] | None = None,
                 then: tuple[int, Reply] | None = None) -> None:  # fmt: skip
        self.parts = parts
        self.after = after
        self.then = then

    def done(self) -> None:
        """(once, whether or not it was all sent) Let go of what this reply and the next held."""
        try:
            if self.after is not None:
                self.after()
        finally:
            if self.then is not None:
                self.then[1].done()


class Parked:
    """A request the engine cannot admit yet (SaveMustWait): kept, unanswered, with the connection
    unread, until the server retries it as room frees or its wait is over."""

    __slots__ = ("header", "payload")

    def __init__(self, header: Header, payload: memoryview) -> None:
        self.header = header
        self.payload = payload


class Handlers:
    def __init__(self, server: ServerContext, ns: str, entry: KeyEntry, single_key: bool) -> None:
        self.server = server
        self.engine = server.engine
        self.ns = ns
        self.entry = entry
        self.admin = entry.admin
        self.node_key = entry.node and not single_key  # moves chunks and parts between cluster nodes
        self.data_access = single_key or entry.namespace == ns  # a file's admin entry only manages
        self.holder = self.engine.new_holder()
        self.rdma_session: RdmaSession | None = None
        self.writes = WritePath(self)
        self.table: dict[int, Callable[[memoryview], list | Reply]] = {
            Op.EXISTS: self.on_exists,
            Op.PUT_CHUNKS: self.on_put_chunks,
            Op.GET_CHUNKS: self.on_get_chunks,
            Op.PUT_MANIFEST: self.on_put_manifest,
            Op.GET_MANIFEST: self.on_get_manifest,
            Op.DELETE_MANIFEST: self.on_delete_manifest,
            Op.LIST: self.on_list,
            Op.STATS: self.on_stats,
            Op.LOCATE: self.on_locate,
            Op.RDMA_CONNECT: self.on_rdma_connect,
            Op.PIN: self.on_pin,
            Op.COMPACT: self.on_compact,
            Op.COMMIT: self.on_commit,
            Op.HAS_MANIFESTS: self.on_has_manifests,
            Op.PUT_MANIFESTS: self.on_put_manifests,
            Op.GET_MANIFESTS: self.on_get_manifests,
        }

    def info(self) -> dict:
        return {
            "server": "rdmakv",
            "version": __version__,
            "max_frame": self.server.limits.max_frame,
            "rdma": self.server.rdma is not None and self.data_access,
            "admin": self.admin,
        }

    def dispatch(self, op: int, payload: memoryview) -> Reply:
        handler = self.table.get(op)
        if handler is None:
            raise ProtocolError(f"unknown opcode {op}")
        if op in ADMIN_OPS and not self.admin:
            raise AuthError("this operation needs an admin key")
        if self.node_key:
            if op not in NODE_OPS or self.server.cluster is None:
                raise AuthError("a node key moves chunks and parts between cluster nodes; it does not read, write "
                                "or list sessions")  # fmt: skip
        elif not self.data_access and op not in MANAGEMENT_OPS:
            raise AuthError(f"an admin key manages namespace {self.ns!r}; it does not read or write its sessions")
        self.holder.active_at = time.monotonic()  # a save of a connection that stalls loses its room
        metrics = self.server.metrics
        parked = False
        try:
            if metrics is None:
                out = handler(payload)
            else:
                t0 = time.perf_counter()
                try:
                    out = handler(payload)
                except SaveMustWait:
                    raise
                except RdmakvError as e:
                    metrics.error(self.ns, e.code)
                    raise
                metrics.request(self.ns, op, time.perf_counter() - t0)
        except SaveMustWait:
            parked = True  # it runs again later: counted once, when it is answered
            raise
        finally:  # after it ran: a namespace's first write counts in its own figures
            if not parked:
                self.server.count_request(self.ns, op)
        return out if isinstance(out, Reply) else Reply(out)

    def close(self) -> None:
        self.writes.cancel()
        self.engine.release_holder(self.holder)
        if self.rdma_session is not None:
            try:
                self.rdma_session.close()
            except Exception:  # noqa: BLE001 - the QP may already be gone with its device
                pass
            self.rdma_session = None
            self.server.count_qp(-1)

    # -- handlers ------------------------------------------------------------------------
    def on_exists(self, payload: memoryview) -> list:
        keys = msg.dec_keys(payload)
        return [msg.enc_bitmap(self.engine.exists(self.ns, keys))]

    def on_put_chunks(self, payload: memoryview) -> list:
        items = msg.dec_put_chunks(payload)
        stored, existed = self.engine.put_chunks(self.ns, items, self.holder)
        return [msg.enc_put_result(stored, existed)]

    def on_get_chunks(self, payload: memoryview) -> Reply:
        keys = msg.dec_keys(payload)
        alg = msg.alg_of(keys)
        got = self.engine.chunk_views(self.ns, keys.tolist(), self.server.limits.max_frame - 4096)
        try:
            served = cast("list[tuple[Key, memoryview]]", got.served)  # (chunk_views fills every view)
            parts = msg.enc_chunks(served, got.absent, alg, got.payload, got.checks)
        except BaseException:
            got.release()
            raise
        return Reply(parts, got.release)

    def on_put_manifest(self, payload: memoryview) -> list:
        name, body, opts = msg.dec_put_manifest(payload)
        self.writes.cancel()  # a new save replaces what this connection had reserved
        data = bytes(body)
        cluster = self.server.cluster
        with cluster.guard(self.ns, name) if cluster is not None else contextlib.nullcontext():
            if cluster is not None:  # stale member lists, repairs of old or deleted versions: checked and
                cluster.check_put(self.ns, name, data, self.node_key)  # committed in one step
            missing = self.engine.commit_manifest(self.ns, name, data, self.holder, pin=opts.pin, ttl=opts.ttl)
        if opts.reserve and len(missing):
            reply = self.writes.reserve(data, missing)
            if reply is not None:
                return [reply]
        if not len(missing) and self.server.rdma is not None:
            self.engine.publish(self.ns, name)  # one-sided lookups find this version from now on
        return [msg.enc_manifest_result(missing)]

    def on_commit(self, payload: memoryview) -> list:
        return self.writes.commit(payload)

    def on_get_manifest(self, payload: memoryview) -> Reply:
        name, flags = msg.dec_get_manifest(payload)
        want = bool(flags & msg.GET_WANT_LOCATIONS) and self.rdma_session is not None
        data, loc, tier = self.engine.get_manifest(self.ns, name, want, self.holder)
        if want:  # a lookup that came over TCP: the index was stale or lacked it (e.g. promoted since)
            self.engine.publish(self.ns, name)
        then = self._chunks_of(data) if flags & msg.GET_WITH_CHUNKS and loc is None and tier == "memory" else None
        return Reply(msg.enc_manifest_reply(data, loc, tier, follows=then is not None), then=then)

    def _chunks_of(self, manifest: bytes) -> tuple[int, Reply] | None:
        """A TCP restore's chunks sent right after its manifest (GET_WITH_CHUNKS): the first
        distinct ones, up to FOLLOW_BYTES, as a GET_CHUNKS reply; None when any is not here."""
        keys = mf.keys_view(manifest)  # (committed: decoded and checked once already)
        budget = min(msg.FOLLOW_BYTES, self.server.limits.max_frame - 4096)
        got = self.engine.chunk_views(self.ns, keys.tolist(), budget)
        if got.absent or not got.served:  # (the restore asks for them itself, and hears why)
            got.release()
            return None
        try:
            served = cast("list[tuple[Key, memoryview]]", got.served)  # (chunk_views fills every view)
            parts = msg.enc_chunks(served, got.absent, msg.alg_of(keys), got.payload, got.checks)
        except BaseException:
            got.release()
            raise
        return Op.GET_CHUNKS, Reply(parts, got.release)

    def on_put_manifests(self, payload: memoryview) -> list:
        """Each manifest committed as by PUT_MANIFEST; one manifest's failure is its own outcome."""
        items = batches.dec_put_manifests(payload)
        self.writes.cancel()
        outcomes = []
        for name, body, opts in items:
            try:
                data = bytes(body)
                if self.server.cluster is not None:
                    self.server.cluster.check_put(self.ns, name, data)
                missing = self.engine.commit_manifest(self.ns, name, data, self.holder, pin=opts.pin, ttl=opts.ttl)
            except RdmakvError as e:
                outcomes.append(batches.Outcome(batches.FAILED, code=e.code, message=str(e)))
                continue
            if len(missing):
                outcomes.append(batches.Outcome(batches.MISSING, missing))
                continue
            if self.server.rdma is not None:
                self.engine.publish(self.ns, name)
            outcomes.append(batches.Outcome(batches.COMMITTED))
        return batches.enc_outcomes(outcomes)

    def on_get_manifests(self, payload: memoryview) -> list:
        names, want = batches.dec_get_manifests(payload)
        want = want and self.rdma_session is not None
        budget = self.server.limits.max_frame - 4096
        found, regions = self.engine.get_manifests(self.ns, names, want, self.holder, budget)
        if want:  # lookups that came over TCP: the index lacked them or was stale
            for name, f in zip(names, found):
                if f.status == batches.FOUND:
                    self.engine.publish(self.ns, name)
        return batches.enc_found(found, regions)

    def on_has_manifests(self, payload: memoryview) -> list:
        return [msg.enc_bitmap(self.engine.has_manifests(self.ns, msg.dec_names(payload)))]

    def on_pin(self, payload: memoryview) -> list:
        name, pinned = msg.dec_pin(payload)
        self.engine.set_pin(self.ns, name, pinned)
        return []

    def on_compact(self, payload: memoryview) -> list:
        if len(payload):
            raise ProtocolError("COMPACT takes no payload")
        return [msg.enc_json(self.engine.compact())]

    def on_locate(self, payload: memoryview) -> list:
        keys = msg.dec_keys(payload)
        return [self.engine.locate(self.ns, keys).encode()]

    def on_delete_manifest(self, payload: memoryview) -> list:
        name = msg.dec_name_only(payload)
        cluster = self.server.cluster
        with cluster.guard(self.ns, name) if cluster is not None else contextlib.nullcontext():
            if cluster is not None:
                cluster.check_delete(self.ns, name, self.node_key)
            self.engine.delete_manifest(self.ns, name)
        return []

    def on_list(self, payload: memoryview) -> list:
        prefix, after = msg.dec_list(payload)
        rows = self.engine.list(self.ns, prefix, after, msg.LIST_PAGE + 1)
        more = len(rows) > msg.LIST_PAGE
        return [msg.enc_json({"sessions": rows[: msg.LIST_PAGE], "more": more})]

    def on_stats(self, payload: memoryview) -> list:
        stats = self.engine.stats(self.ns)
        stats["rdma"] = self.server.rdma is not None
        stats["requests"] = self.server.requests_of(self.ns)  # this one included
        if self.server.rdma is not None:
            stats["rdma_device"] = getattr(self.server.rdma, "device_name", "")
            bounded = getattr(self.server.rdma, "windows_bounded", None)
            stats["rdma_write_windows"] = {None: "not used yet", True: "on the slab's MRs",
                                           False: "on an MR of each save's run (the device does not keep "
                                                  "WRITEs inside a window's range)"}[bounded]  # fmt: skip
        if self.server.cluster is not None:
            stats["cluster"] = self.server.cluster.stats()
        if self.admin:  # only an operator sees the whole store
            srv = self.server
            stats["namespaces"] = self.engine.all_stats(STATS_NAMESPACES)
            stats["store"] = self.engine.store_stats() | srv.inflight.stats() | {
                "connections": srv.connections, "auth_failures": srv.auth_failures, "refused": srv.refused,
                "internal_errors": srv.internal_errors, "slow_requests_closed": srv.slow_closed,
            }  # fmt: skip
        return [msg.enc_json(stats)]

    def on_rdma_connect(self, payload: memoryview) -> list:
        exporter = self.server.rdma
        if exporter is None:
            raise NotFoundError("this server has no RDMA device; use TCP")
        if self.rdma_session is not None:
            self.rdma_session.close()
            self.rdma_session = None
            self.server.count_qp(-1)
        self.rdma_session, reply = exporter.connect(self.ns, bytes(payload))
        self.server.count_qp(+1)
        published = self.engine.published_index(self.ns, self.server.limits.index_entries)
        index = exporter.register_index(self.ns, published)
        # QP info, the one-sided lookup index, then the namespace's region table (later regions
        # arrive with every location reply)
        regions = self.engine.locate(self.ns, np.zeros(0, dtype=np.uint64)).encode()
        return [reply, index, regions]
