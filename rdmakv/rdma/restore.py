"""Client side of the RDMA restore path.

restore = one control round trip (GET_MANIFEST with chunk locations), then the
READ plan posted as doorbell-batched WR chains into a registered buffer that
backs the restored arrays. Every chunk is verified against its key; chunks
that fail (a slot freed and reused between LOCATE and READ, a torn read) are
re-located and read once more, then fetched over TCP. A work-completion error
or a failed RDMA_CONNECT latches this connection to TCP, and the report says so
and why.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from ..bufpool import BufferPool
from ..errors import RdmakvError
from ..hashing import chunk_key, verified
from ..kvstate import RestoreReport
from ..wire.messages import NO_REGION, Locations, dec_locations
from ..wire.writes import INDEX_INFO_SIZE, dec_index_info
from .device import Device, list_devices, pyverbs_status
from .errors import RdmaError
from .exporter import DEVICE_ENV
from .lookup import OneSidedIndex
from .qp import QPInfo
from .readplan import plan_reads
from .requester import ReadOp, Requester, Sge

SCRATCH_BYTES = 1 << 20
PLAN_CACHE = 32
MAX_READ_BYTES = 1 << 20


class RdmaRestorer:
    def __init__(self, store, device: Device) -> None:
        self.store = store
        self.device = device
        self.pd = device.alloc_pd()
        self.requester: Requester | None = None
        try:
            self.requester = Requester(device, self.pd, post_api=os.environ.get("RDMAKV_POST_API", "auto"))
            reply = store.channel.rdma_connect(self.requester.local_info.to_bytes())
            self.requester.connect(QPInfo.from_bytes(reply[: QPInfo.SIZE]))
            at = QPInfo.SIZE + INDEX_INFO_SIZE
            addr, rkey, entries, probe = dec_index_info(reply[QPInfo.SIZE : at])
            self.regions = dec_locations(reply[at:]).regions  # the table at connect time
            self.pool = BufferPool(self.pd)
            self.scratch, self.scratch_addr, self.scratch_lkey = self.pool.alloc(SCRATCH_BYTES)
            self.index = OneSidedIndex(self, addr, rkey, entries, probe) if entries else None
        except BaseException:
            self.close()
            raise
        self.max_sge = max(4, min(device.caps.read_sge_limit, 30))
        self.max_read_bytes = MAX_READ_BYTES
        self.merge = True  # bench knob: False posts one READ per chunk
        self._plans: OrderedDict[tuple, tuple] = OrderedDict()
        self.usable = True
        self.latched_reason = ""
        self.one_sided = True  # look sessions up in the index by READ (False: GET_MANIFEST over TCP)

    def close(self) -> None:
        if self.requester is not None:
            self.requester.close()
            self.requester = None
        self.usable = False

    def latch(self, reason: str) -> None:
        """Stop using RDMA on this connection; every later restore goes over TCP."""
        self.usable = False
        self.latched_reason = reason
        self.store.rdma_reason = reason

    # -- restore -----------------------------------------------------------------------
    def fetch(self, name: str, rep: RestoreReport, kv: bool, **hooks):
        """(manifest, KV layout or None, restore buffer, chunk offsets) by READs, or None when this
        connection has just switched to TCP (the report says why)."""
        ch = self.store.channel
        if self.index is not None and self.one_sided and not hooks:
            got = self._fetch_one_sided(name, rep, kv)
            if got is not None or not self.usable:
                return got
        mark = ch.mark()
        data, loc, rep.tier = ch.get_manifest(name, want_locations=True)
        m, layout, offsets, total = self.store.restore_target(data, kv)
        buf = self.read_located(m.keys, m.lengths, offsets, total, loc, rep, mark, **hooks)
        return None if buf is None else (m, layout, buf, offsets)

    def _fetch_one_sided(self, name: str, rep: RestoreReport, kv: bool):
        """The restore with no request to the server, or None (then over the TCP lookup): the
        name is not in the index, the index kept changing, or a chunk moved since it was read."""
        mark = self.store.channel.mark()
        try:
            found = self.index.lookup(name, rep)
        except RdmaError as e:
            self.latch(f"RDMA READ of the lookup index failed ({e}); this connection now uses TCP")
            rep.fallback_reason = self.latched_reason
            return None
        if found is None:
            return None
        data, loc = found
        m, layout, offsets, total = self.store.restore_target(data, kv)
        try:
            buf = self.read_located(m.keys, m.lengths, offsets, total, loc, rep, mark, strict=True)
        except _Moved:
            rep.index_fallbacks += 1
            return None
        if buf is not None:
            rep.lookup = "one-sided"
            return m, layout, buf, offsets
        return None

    def read_located(
        self, keys, lengths, offsets, total: int, loc: Locations | None, rep: RestoreReport, mark,
        strict: bool = False, **hooks,
    ) -> np.ndarray | None:  # fmt: skip
        """Chunks at ``loc`` READ into a new buffer at ``offsets``; None when this connection has
        just switched to TCP (the report says why). ``mark``: the channel mark the round trips
        and bytes of this restore are counted from."""
        ch = self.store.channel
        if loc is None:
            self.latch("server returned no chunk locations (its RDMA session is gone)")
            return None
        buf, laddr, lkey = self.pool.alloc(total)
        if "after_locate" in hooks:
            hooks["after_locate"]()
        try:
            self._fill(keys, lengths, offsets, loc, buf, laddr, lkey, rep, strict)
        except RdmaError as e:  # WorkCompletionError, ReadTimeout, a dead QP
            self.latch(f"RDMA READ failed ({e}); this connection now uses TCP")
            rep.fallback_reason = self.latched_reason
            rep.round_trips += ch.usage_since(mark)[1]
            return None
        rep.transport = "rdma"
        rep.chunks = len(keys)
        nbytes, rts = ch.usage_since(mark)
        rep.bytes += nbytes
        rep.round_trips += rts
        return buf

    def read_into(
        self, keys, lengths, offsets, loc: Locations, dest: np.ndarray, laddr: int, lkey: int, rep: RestoreReport,
        *, strict: bool = False,
    ) -> str:  # fmt: skip
        """READ chunks at ``loc`` straight into memory the caller registered in this connection's
        PD (``self.pd``): ``dest`` (a uint8 array whose first byte is at ``laddr``, ``lkey`` its
        registration), chunk i at ``offsets[i]``. Each chunk is verified; a chunk not where
        ``loc`` said is re-located (or fetched over TCP) unless ``strict``. Returns "ok",
        "moved" (``strict``: ``loc`` is stale, nothing read is to be trusted) or "failed" (an
        RDMA error: this connection now uses TCP, the report says why)."""
        mark = self.store.channel.mark()
        try:
            self._fill(keys, lengths, offsets, loc, dest, laddr, lkey, rep, strict)
        except _Moved:
            rep.index_fallbacks += 1
            return "moved"
        except RdmaError as e:
            self.latch(f"RDMA READ failed ({e}); this connection now uses TCP")
            rep.fallback_reason = self.latched_reason
            return "failed"
        finally:
            nbytes, rts = self.store.channel.usage_since(mark)
            rep.bytes += nbytes
            rep.round_trips += rts
        rep.transport = "rdma"
        rep.chunks += len(keys)
        return "ok"

    def _fill(
        self,
        keys: np.ndarray,
        lengths: np.ndarray,
        offsets: np.ndarray,
        loc: Locations,
        buf: np.ndarray,
        laddr: int,
        lkey: int,
        rep: RestoreReport,
        strict: bool = False,
    ) -> None:
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        ulen = lengths[first].astype(np.int64)
        udest = offsets[first].astype(np.int64)
        sub = loc.subset(first)
        view = memoryview(buf)
        bad = self._read(uniq, ulen, udest, sub, view, laddr, lkey, rep)
        if len(bad) and strict:  # a one-sided lookup's version holds nothing: start over by TCP
            raise _Moved()
        if len(bad):
            rep.retried_chunks += len(bad)
            fresh = self.store.channel.locate(uniq[bad])
            present = fresh.slots["region"] != NO_REGION
            idx = bad[present]
            again = fresh.subset(np.flatnonzero(present))
            still = idx[self._read(uniq[idx], ulen[idx], udest[idx], again, view, laddr, lkey, rep)]
            gone = bad[~present]
            tcp = np.concatenate([still, gone])
            if len(tcp):
                rep.fallback_chunks += len(tcp)
                self.store.fill_tcp(uniq[tcp], ulen[tcp].astype(np.uint32), udest[tcp].astype(np.uint64), view)
        if len(first) != len(keys):  # the same chunk at several positions: copy from the first
            for i in np.flatnonzero(offsets != udest[inverse]).tolist():
                src = int(udest[inverse[i]])
                n = int(lengths[i])
                buf[int(offsets[i]) : int(offsets[i]) + n] = buf[src : src + n]

    def _read(
        self, keys, lens, dests, loc: Locations, view: memoryview, laddr: int, lkey: int, rep: RestoreReport
    ) -> np.ndarray:
        """READ chunks into place (``loc`` holds one location per key); returns indices (into
        ``keys``) that failed verification against their key, or the store's check of an opaque one."""
        plan, missing, checks = self._prepare(keys, lens, dests, loc, laddr, lkey)
        assert self.requester is not None
        rep.reads_posted += self.requester.read(plan.reads)
        rep.bytes += plan.bytes_read
        if keys.dtype == np.uint64:  # xxh3-64 content keys: the hash itself, no dispatch per chunk
            failed = [i for i, k, d, n, _ in checks if chunk_key(view[d : d + n]) != k]
        else:
            failed = [i for i, k, d, n, c in checks if not verified(k, view[d : d + n], c)]
        if not failed:
            return missing
        return np.concatenate([missing, np.array(failed, dtype=np.int64)])

    def _prepare(self, keys, lens, dests, loc: Locations, laddr: int, lkey: int):
        """The READ plan and the verification list, memoised: restoring the same session into
        the same pool extent (the common repeat) reuses the prebuilt WR list."""
        slots = loc.slots
        checks_raw = b"" if loc.checks is None else loc.checks.tobytes()
        ident = (keys.tobytes(), lens.tobytes(), dests.tobytes(), slots.tobytes(), loc.regions.tobytes(), laddr,
                 self.merge, self.max_read_bytes, checks_raw)
        hit = self._plans.get(ident)
        if hit is not None:
            self._plans.move_to_end(ident)
            return hit
        located = slots["region"] != NO_REGION
        missing = np.flatnonzero(~located).astype(np.int64)
        idx = np.flatnonzero(located)
        regions = {int(r["id"]): int(r["addr"]) for r in loc.regions}
        rkeys = {int(r["id"]): int(r["rkey"]) for r in loc.regions}
        plan = plan_reads(
            slots["region"][idx], slots["offset"][idx], slots["size"][idx], lens[idx], dests[idx],
            regions, rkeys, local_base=laddr, lkey=lkey,
            scratch_addr=self.scratch_addr, scratch_lkey=self.scratch_lkey, scratch_bytes=SCRATCH_BYTES,
            max_sge=self.max_sge, max_read_bytes=self.max_read_bytes, merge=self.merge,
        )  # fmt: skip
        plan.reads = [ReadOp(a, k, [Sge(*sg) for sg in sges]) for a, k, sges in plan.reads]
        values = loc.check_list()
        checks = list(zip(idx.tolist(), keys[idx].tolist(), dests[idx].tolist(), lens[idx].tolist(),
                          [values[i] for i in idx.tolist()]))  # fmt: skip
        out = (plan, missing, checks)
        self._plans[ident] = out
        if len(self._plans) > PLAN_CACHE:
            self._plans.popitem(last=False)
        return out


class _Moved(Exception):
    """A chunk of a one-sidedly looked-up version is no longer where its entry said."""


def open_restorer(store) -> tuple[RdmaRestorer | None, str]:
    """Connect the RDMA path if both ends can; else (None, why not)."""
    if not store.server_info.get("rdma"):
        return None, "server has no RDMA device (it serves TCP only)"
    ok, why = pyverbs_status()
    if not ok:
        return None, f"pyverbs is not importable here ({why})"
    if not list_devices():
        return None, "no RDMA device on this host"
    try:
        device = Device.open(os.environ.get(DEVICE_ENV) or None)
        return RdmaRestorer(store, device), ""
    except (RdmaError, RdmakvError, ValueError) as e:
        return None, f"RDMA_CONNECT failed: {e}"
