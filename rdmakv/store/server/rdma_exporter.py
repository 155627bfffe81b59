"""Server side of the RDMA restore path: export each namespace's slab for one-sided READs.

One protection domain per namespace; each slab region is registered once, in
that PD, with REMOTE_READ. A client's RC QP is created in the PD of the
namespace it authenticated for, so a READ with another tenant's rkey fails
with a remote access error on the client's QP. After RDMA_CONNECT the server
does no work per READ.
"""

from __future__ import annotations

import threading

from slab import Region

from ...errors import CodecError
from ...rdma.device import Device, probe_device
from ...rdma.errors import RdmaError
from ...rdma.memory import MemoryRegion, ProtectionDomain, alloc_pd
from ...rdma.qp import QPInfo, Responder

# a window bound on an MR of its own run: the PD and that MR, to deregister when it closes
WindowHandle = tuple[ProtectionDomain, MemoryRegion] | None


class RdmaExporter:
    def __init__(self, device: Device) -> None:
        self.device = device
        self.device_name = device.caps.name
        self._pds: dict[str, ProtectionDomain] = {}
        self._mrs: dict[tuple[str, int], MemoryRegion] = {}
        self._lock = threading.Lock()
        self.windows_bounded: bool | None = None  # probed on the first save by WRITE
        self._index_mrs: dict[str, MemoryRegion] = {}

    def _pd(self, ns: str) -> ProtectionDomain:
        with self._lock:
            pd = self._pds.get(ns)
            if pd is None:
                pd = self._pds[ns] = alloc_pd(self.device)
            return pd

    def register(self, ns: str, region: Region) -> int:
        """Register a whole slab region once (READ, and windows may be bound on it); its rkey."""
        mr = self._pd(ns).register(region.address, region.length, remote_read=True, keepalive=region,
                                   mw_bind=True)  # fmt: skip
        self._mrs[(ns, region.id)] = mr
        return mr.rkey

    def register_index(self, ns: str, index) -> bytes:
        """Register the namespace's lookup index (exactly its bytes: a READ past it fails) once;
        returns its wire form (wire.writes.enc_index_info)."""
        import ctypes

        from ...wire.writes import enc_index_info

        with self._lock:
            mr = self._index_mrs.get(ns)
        if mr is None:
            view = (ctypes.c_char * index.size).from_buffer(index.buf)
            mr = self._pd(ns).register(ctypes.addressof(view), index.size, remote_read=True, keepalive=view)
            with self._lock:
                self._index_mrs[ns] = mr
        return enc_index_info(mr.addr, mr.rkey, index.entries)

    def open_window(
        self, responder: Responder, ns: str, region_id: int, addr: int, length: int
    ) -> tuple[int, WindowHandle]:
        """A memory window with REMOTE_WRITE over exactly [addr, addr+length) of a region, bound on
        ``responder``'s QP; (rkey, handle for close_window)."""
        if self.windows_bounded is None:
            self.windows_bounded = window_bounds_hold(self.device)
        if self.windows_bounded:
            return responder.open_window(self._mrs[(ns, region_id)], addr, length), None
        # The device does not keep WRITEs inside a window (rxe checks the MR's range, not the
        # window's): bind it on an MR of exactly the run, so that range is the window's.
        pd = self._pd(ns)
        run_mr = pd.register(addr, length, remote_read=False, mw_bind=True)
        try:
            return responder.open_window(run_mr, addr, length), (pd, run_mr)
        except BaseException:
            pd.deregister(run_mr)
            raise

    def close_window(self, responder: Responder, rkey: int, handle: WindowHandle) -> None:
        try:
            responder.close_window(rkey)
        finally:
            if handle is not None:
                pd, run_mr = handle
                pd.deregister(run_mr)

    def release(self, ns: str, region: Region) -> None:
        """Deregister a region the slab is about to unmap: a READ with its rkey now fails."""
        mr = self._mrs.pop((ns, region.id), None)
        if mr is not None:
            self._pd(ns).deregister(mr)

    def connect(self, ns: str, payload: bytes) -> tuple[Responder, bytes]:
        """Create this connection's responder QP in the namespace's PD and connect it."""
        try:
            remote = QPInfo.from_bytes(payload)
        except ValueError as e:
            raise CodecError(f"bad RDMA_CONNECT payload: {e}") from e
        responder = Responder(self._pd(ns), remote)
        return responder, responder.local_info.to_bytes()


def window_bounds_hold(device: Device) -> bool:
    """Whether a WRITE through a memory window beyond the window's range fails on this device
    (it must: probed once with a loopback QP pair and a 2-page scratch buffer)."""
    import ctypes
    import mmap

    from ...rdma.requester import Requester

    buf = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    view = (ctypes.c_char * len(buf)).from_buffer(buf)
    src = bytearray(8)
    with alloc_pd(device) as pd:
        mr = pd.register(ctypes.addressof(view), len(buf), remote_read=False, keepalive=view, mw_bind=True)
        smr = pd.register_buffer(src, remote_read=False)
        rq = Requester(device, pd, max_outstanding=4)
        rs = Responder(pd, rq.local_info)
        rq.connect(rs.local_info)
        rkey = rs.open_window(mr, mr.addr + mmap.PAGESIZE, mmap.PAGESIZE)
        try:
            rq.write([(mr.addr, rkey, [(smr.addr, len(src), smr.lkey)])], timeout=5)
            bounded = False
        except RdmaError:
            bounded = True
        try:
            rs.close_window(rkey)
        except RdmaError:
            pass  # the responder may be in error after the refused WRITE; the PD closes it all
    del view
    return bounded


def make_exporter(engine) -> tuple[RdmaExporter | None, str]:
    """An exporter bound to ``engine`` (its regions get registered), or None and why not."""
    device, why = probe_device()
    if device is None:
        return None, why
    exporter = RdmaExporter(device)
    try:
        engine.set_region_hook(exporter.register, exporter.release)
    except RdmaError as e:
        engine.set_region_hook(None)
        return None, f"cannot register the slab: {e}"
    return exporter, f"exporting on {device.caps.name}"
