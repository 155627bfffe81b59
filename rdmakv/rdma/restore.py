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

from ..client.bufpool import BufferPool
from ..client.reports import RestoreReport
from ..client.transport import Dest, Fallback, Filled, Found, TcpTransport
from ..errors import RdmakvError
from ..hashing import chunk_key, verified
from ..wire.messages import NO_REGION, Locations, dec_locations
from ..wire.writes import INDEX_INFO_SIZE, dec_index_info
from .device import Device, probe_device
from .errors import RdmaError
from .lookup import OneSidedIndex
from .memory import MemoryRegion, alloc_pd
from .qp import QPInfo
from .readplan import plan_reads
from .requester import ReadOp, Requester, Sge

SCRATCH_BYTES = 1 << 20
PLAN_CACHE = 32
MAX_READ_BYTES = 1 << 20


class RdmaRestorer:
    """The RDMA transport of a restore (``rdmakv.client.transport.Transport``): lookups by a READ
    of the published index (or GET_MANIFEST with locations over the connection's TCP channel),
    fills by one READ plan into memory registered in this connection's PD. Chunks that fail
    verification are re-located and read again, then fetched over TCP through ``tcp``."""

    name = "rdma"

    def __init__(self, tcp: TcpTransport, device: Device) -> None:
        self.tcp = tcp
        self.channel = tcp.channel
        self.device = device
        self.pd = alloc_pd(device)
        self.requester: Requester | None = None
        try:
            self.requester = Requester(device, self.pd, post_api=os.environ.get("RDMAKV_POST_API", "auto"))
            reply = self.channel.rdma_connect(self.requester.local_info.to_bytes())
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

    def latch(self, reason: str) -> Fallback:
        """Stop using RDMA on this connection; every later restore goes over TCP."""
        self.usable = False
        self.latched_reason = reason
        return Fallback(reason)

    # -- the Transport interface ----------------------------------------------------------
    def lookup(self, name: str, rep: RestoreReport, *, one_sided: bool = True) -> Found | Fallback:
        """Found with the chunks' locations: by READ of the index when it has ``name`` (and
        ``one_sided``), else by GET_MANIFEST with locations; a Fallback once RDMA is off."""
        if not self.usable:
            return Fallback(self.latched_reason)
        if self.index is not None and self.one_sided and one_sided:
            try:
                got = self.index.lookup(name, rep)
            except RdmaError as e:
                return self.latch(f"RDMA READ of the lookup index failed ({e}); this connection now uses TCP")
            if got is not None:
                return Found(got[0], got[1], "memory", one_sided=True)
        data, loc, tier = self.channel.get_manifest(name, want_locations=True)
        rep.tier = tier
        if loc is None:
            return self.latch("server returned no chunk locations (its RDMA session is gone)")
        return Found(data, loc, tier)

    def buffer(self, nbytes: int) -> Dest:
        view, addr, lkey = self.pool.alloc(nbytes)
        return Dest(view, addr, lkey)

    def adopt(self, view: np.ndarray) -> Dest:
        """``view`` (a caller's uint8 array) registered in this connection's PD, so that READs land
        in it; ``release`` the Dest when done (the registration pins its pages)."""
        mr = self.pd.register_buffer(view, remote_read=False)
        return Dest(view, mr.addr, mr.lkey, mr)

    def release(self, dest: Dest) -> None:
        if isinstance(dest.registration, MemoryRegion):  # made by ``adopt`` for this Dest alone
            self.pd.deregister(dest.registration)
            dest.registration = None

    def fill(self, keys: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, locations: Locations | None,
             dest: Dest, rep: RestoreReport, *, strict: bool = False) -> Filled | Fallback:  # fmt: skip
        """READ chunks at ``locations`` into ``dest`` (registered on this connection) at
        ``offsets``, each verified. "moved" when ``strict`` and a chunk is not where
        ``locations`` said (nothing read is to be trusted then); a Fallback on an RDMA error
        (this connection now uses TCP)."""
        if not self.usable:
            return Fallback(self.latched_reason)
        if locations is None or dest.lkey is None:
            return Fallback("no chunk locations" if locations is None else "destination not registered for RDMA")
        try:
            self._fill(keys, lengths, offsets, locations, dest.view, dest.addr, dest.lkey, rep, strict)
        except _Moved:
            return "moved"
        except RdmaError as e:  # WorkCompletionError, ReadTimeout, a dead QP
            return self.latch(f"RDMA READ failed ({e}); this connection now uses TCP")
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
        view = buf.data
        bad = self._read(uniq, ulen, udest, sub, view, laddr, lkey, rep)
        if len(bad) and strict:  # a one-sided lookup's version holds nothing: start over by TCP
            raise _Moved()
        if len(bad):
            rep.retried_chunks += len(bad)
            fresh = self.channel.locate(uniq[bad])
            present = fresh.slots["region"] != NO_REGION
            idx = bad[present]
            again = fresh.subset(np.flatnonzero(present))
            still = idx[self._read(uniq[idx], ulen[idx], udest[idx], again, view, laddr, lkey, rep)]
            gone = bad[~present]
            tcp = np.concatenate([still, gone])
            if len(tcp):
                rep.fallback_chunks += len(tcp)
                self.tcp.fill_view(uniq[tcp], ulen[tcp].astype(np.uint32), udest[tcp].astype(np.uint64), view)
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


def open_restorer(tcp: TcpTransport, server_info: dict) -> tuple[RdmaRestorer | None, str]:
    """Connect the RDMA path over ``tcp``'s connection if both ends can; else (None, why not)."""
    if not server_info.get("rdma"):
        return None, "server has no RDMA device (it serves TCP only)"
    device, why = probe_device()
    if device is None:
        return None, why
    try:
        return RdmaRestorer(tcp, device), ""
    except (RdmaError, RdmakvError, ValueError) as e:
        return None, f"RDMA_CONNECT failed: {e}"
