"""Server side of the RDMA restore path: export each namespace's slab for one-sided READs.

One protection domain per namespace; each slab region is registered once, in
that PD, with REMOTE_READ. A client's RC QP is created in the PD of the
namespace it authenticated for, so a READ with another tenant's rkey fails
with a remote access error on the client's QP. After RDMA_CONNECT the server
does no work per READ.
"""

from __future__ import annotations

import os
import threading

from slab import Region

from ..errors import CodecError
from .device import Device, list_devices, pyverbs_status
from .errors import RdmaError
from .memory import MemoryRegion, ProtectionDomain
from .qp import QPInfo, Responder

DEVICE_ENV = "RDMAKV_RDMA_DEVICE"


class RdmaExporter:
    def __init__(self, device: Device) -> None:
        self.device = device
        self.device_name = device.caps.name
        self._pds: dict[str, ProtectionDomain] = {}
        self._mrs: dict[tuple[str, int], MemoryRegion] = {}
        self._lock = threading.Lock()

    def _pd(self, ns: str) -> ProtectionDomain:
        with self._lock:
            pd = self._pds.get(ns)
            if pd is None:
                pd = self._pds[ns] = self.device.alloc_pd()
            return pd

    def register(self, ns: str, region: Region) -> int:
        """Register a whole slab region once; returns its rkey."""
        mr = self._pd(ns).register(region.address, region.length, remote_read=True, keepalive=region)
        self._mrs[(ns, region.id)] = mr
        return mr.rkey

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


def make_exporter(engine) -> tuple[RdmaExporter | None, str]:
    """An exporter bound to ``engine`` (its regions get registered), or None and why not."""
    ok, why = pyverbs_status()
    if not ok:
        return None, f"pyverbs is not importable ({why})"
    devices = list_devices()
    if not devices:
        return None, "no RDMA device on this host"
    try:
        device = Device.open(os.environ.get(DEVICE_ENV) or None)
    except RdmaError as e:
        return None, str(e)
    exporter = RdmaExporter(device)
    try:
        engine.set_region_hook(exporter.register, exporter.release)
    except RdmaError as e:
        engine.set_region_hook(None)
        return None, f"cannot register the slab: {e}"
    return exporter, f"exporting on {device.caps.name}"
