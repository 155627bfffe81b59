"""Protection domains and memory registration of caller-owned memory."""

from __future__ import annotations

import errno
from typing import Any

from .device import Device, errno_text, load_pyverbs
from .errors import RdmaError


class MemoryRegion:
    """A registration of caller-owned memory. The caller keeps the memory alive until close()."""

    def __init__(self, mr: Any, addr: int, length: int, keepalive: object | None) -> None:
        self._mr = mr
        self.addr = addr
        self.length = length
        self.lkey: int = mr.lkey
        self.rkey: int = mr.rkey
        self._keepalive = keepalive  # e.g. a ctypes view that pins an mmap against close()

    @property
    def closed(self) -> bool:
        return self._mr is None

    def close(self) -> None:
        if self._mr is None:
            return
        mr, self._mr = self._mr, None
        try:
            mr.close()
        finally:
            self._keepalive = None

    def __enter__(self) -> MemoryRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"MemoryRegion(addr={self.addr:#x}, length={self.length}, lkey={self.lkey:#x}, "
            f"rkey={self.rkey:#x}{', closed' if self.closed else ''})"
        )


def alloc_pd(device: Device) -> ProtectionDomain:
    """A new protection domain on ``device`` (memory builds on the device module, never the reverse)."""
    pv = load_pyverbs()
    try:
        return ProtectionDomain(device, pv.pd.PD(device.context))
    except pv.err.PyverbsError as exc:
        raise RdmaError(f"{device.caps.name}: ibv_alloc_pd failed: {errno_text(exc)}") from exc


class ProtectionDomain:
    """One PD; a namespace's regions and its clients' Responder QPs share one."""

    def __init__(self, device: Device, pd: Any) -> None:
        self.device = device
        self._pd = pd
        self._children: list[Any] = []  # our wrappers, closed before the PD

    @property
    def pd(self) -> Any:
        if self._pd is None:
            raise RdmaError("protection domain is closed")
        return self._pd

    def register(
        self, address: int, length: int, *, remote_read: bool, keepalive: object | None = None, mw_bind: bool = False
    ) -> MemoryRegion:
        """Register [address, address+length) (memory the caller owns, e.g. an mmap).

        LOCAL_WRITE always (READ destinations need it); REMOTE_READ if asked.
        ``keepalive`` is held until the MR is closed.
        """
        pv = load_pyverbs()
        caps = self.device.caps
        if address <= 0:
            # pyverbs allocates a buffer of its own when the address is falsy.
            raise ValueError(f"address must be a positive pointer, got {address}")
        if not 0 < length <= caps.max_mr_size:
            raise ValueError(f"length {length} outside 1..max_mr_size ({caps.max_mr_size})")
        e = pv.e
        # MW_BIND lets the owner open memory windows on it; the MR itself never takes REMOTE_WRITE
        access = e.IBV_ACCESS_LOCAL_WRITE | (e.IBV_ACCESS_REMOTE_READ if remote_read else 0)
        access |= e.IBV_ACCESS_MW_BIND if mw_bind else 0
        try:
            mr = pv.mr.MR(self.pd, length, access, address=address)
        except pv.err.PyverbsError as exc:
            hint = ""
            if getattr(exc, "error_code", None) in (errno.ENOMEM, errno.EPERM, errno.EFAULT):
                hint = "; registration pins pages: raise RLIMIT_MEMLOCK (ulimit -l) and check the range is mapped"
            raise RdmaError(f"ibv_reg_mr({address:#x}, {length}) failed: {errno_text(exc)}{hint}") from exc
        region = MemoryRegion(mr, address, length, keepalive)
        self._children.append(region)
        return region

    def register_buffer(self, buf: Any, *, remote_read: bool) -> MemoryRegion:
        """Register a writable buffer (mmap, bytearray, numpy array...).

        The MR holds an export of ``buf`` until it is closed, so an mmap cannot be closed (or
        a bytearray resized) under a live registration.
        """
        import ctypes

        view = (ctypes.c_char * memoryview(buf).nbytes).from_buffer(buf)
        return self.register(ctypes.addressof(view), len(view), remote_read=remote_read, keepalive=view)

    def deregister(self, mr: MemoryRegion) -> None:
        """Close a registration made here (before its memory is unmapped) and forget it."""
        mr.close()
        if mr in self._children:
            self._children.remove(mr)

    def _adopt(self, child: Any) -> None:
        self._children.append(child)

    def close(self) -> None:
        """Close QPs (Responders/Requesters made here), then MRs, then the PD. Idempotent."""
        if self._pd is None:
            return
        children, self._children = self._children, []
        # QPs reference the PD and the MRs are what they serve: tear QPs down first.
        for child in children:
            if not isinstance(child, MemoryRegion):
                child.close()
        for child in children:
            if isinstance(child, MemoryRegion):
                child.close()
        pd, self._pd = self._pd, None
        pd.close()

    def __enter__(self) -> ProtectionDomain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
