"""The one place in rdmakv that creates verbs resources (pyverbs).

Roles:
- ``Device``: one opened ibv context per device per process, plus the queried caps.
- ``ProtectionDomain`` / ``MemoryRegion``: registration of memory the caller owns.
- ``Responder``: server-side RC QP that only answers RDMA READs (no CPU per READ).
- ``Requester``: client-side RC QP + CQ + completion channel that posts READ chains.
- ``QPInfo``: what the two sides exchange (over the authenticated TCP channel) to connect.

pyverbs is imported lazily: importing this module never needs it, so pure code (the QPInfo
codec) and hosts without RDMA keep working. Over hostfs in the UML guest the first
``import pyverbs`` alone takes seconds, so nobody should pay it by accident.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib
import os
import random
import select
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from rdmakv.errors import RdmakvError

__all__ = [
    "Device",
    "DeviceCaps",
    "MemoryRegion",
    "ProtectionDomain",
    "QPInfo",
    "RdmaError",
    "RdmaUnavailable",
    "ReadOp",
    "ReadStats",
    "ReadTimeout",
    "Requester",
    "Responder",
    "Sge",
    "WorkCompletionError",
    "list_devices",
    "pyverbs_status",
]


# --------------------------------------------------------------------------- errors


class RdmaError(RdmakvError):
    """A verbs call failed (post, QP transition, registration...)."""


class RdmaUnavailable(RdmaError):
    """RDMA cannot be used here; the message says exactly why."""


class ReadTimeout(RdmaError, TimeoutError):
    """READs did not complete in time; the Requester is unusable (they may still land)."""


class WorkCompletionError(RdmaError):
    """A work completion came back with an error status.

    The RC QP is in the error state afterwards: the Requester that raised it refuses further
    reads (create a new one, or fall back to TCP for that connection).
    """

    def __init__(self, status: int, status_name: str, vendor_err: int, op_index: int | None, detail: str = "") -> None:
        self.status = status
        self.status_name = status_name
        self.vendor_err = vendor_err
        self.op_index = op_index
        where = f" at READ #{op_index} of the call" if op_index is not None else ""
        msg = (
            f"RDMA READ failed{where}: {status_name} (status {status}, vendor_err "
            f"{vendor_err:#x}); the QP is now in the error state and this Requester is "
            "unusable"
        )
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


# --------------------------------------------------------------------------- pyverbs loading

_pv: _Pyverbs | None = None
_pv_error: str | None = None
_pv_lock = threading.Lock()


class _Pyverbs:
    """The pyverbs modules we use, resolved once."""

    def __init__(self) -> None:
        try:
            self.e = importlib.import_module("pyverbs.enums")
        except ImportError:
            # rdma-core >= 59 (e.g. the PyPI sdist) renamed the module.
            self.e = importlib.import_module("pyverbs.libibverbs_enums")
        self.device = importlib.import_module("pyverbs.device")
        self.pd = importlib.import_module("pyverbs.pd")
        self.mr = importlib.import_module("pyverbs.mr")
        self.cq = importlib.import_module("pyverbs.cq")
        self.qp = importlib.import_module("pyverbs.qp")
        self.wr = importlib.import_module("pyverbs.wr")
        self.addr = importlib.import_module("pyverbs.addr")
        self.err = importlib.import_module("pyverbs.pyverbs_error")
        e = self.e
        self.wc_names = {
            int(v): n for n, v in vars(e).items() if n.startswith("IBV_WC_") and type(v) is type(e.IBV_WC_SUCCESS)
        }
        self.version = getattr(importlib.import_module("pyverbs"), "__version__", "")


def _load() -> _Pyverbs:
    global _pv, _pv_error
    if _pv is not None:
        return _pv
    with _pv_lock:
        if _pv is None and _pv_error is None:
            try:
                _pv = _Pyverbs()
            except ImportError as exc:
                _pv_error = (
                    f"pyverbs is not importable ({exc}); install Debian's "
                    "python3-pyverbs and use a venv made with --system-site-packages"
                )
            except Exception as exc:  # a broken build raises odd things (ABI mismatch)
                _pv_error = f"pyverbs failed to load: {type(exc).__name__}: {exc}"
    if _pv is None:
        raise RdmaUnavailable(_pv_error or "pyverbs failed to load")
    return _pv


def pyverbs_status() -> tuple[bool, str]:
    """(usable, explanation). Only checks that pyverbs imports, not that a device exists."""
    try:
        pv = _load()
    except RdmaUnavailable as exc:
        return False, str(exc)
    return True, f"pyverbs {pv.version or '(unknown version)'} ({pv.e.__name__})"


def _errno_text(exc: BaseException) -> str:
    code = getattr(exc, "error_code", None)
    if code:
        return f"{exc} [{errno.errorcode.get(code, code)}]"
    return str(exc)


# --------------------------------------------------------------------------- devices


def list_devices() -> list[str]:
    """Names of the RDMA devices the kernel exposes (empty when there are none)."""
    pv = _load()
    try:
        return [dev.name.decode() for dev in pv.device.get_device_list()]
    except pv.err.PyverbsError:
        # ibv_get_device_list() returns NULL when the kernel has no uverbs at all.
        return []


_MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
_PORT_ACTIVE = 4
_LINK_ETHERNET = 2
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


@dataclass(frozen=True)
class DeviceCaps:
    """What the device and the chosen port allow, as queried at open time."""

    name: str
    port: int
    gid_index: int
    gid: bytes  # 16 raw bytes, network order
    link_layer: int  # IBV_LINK_LAYER_*; Ethernet (RoCE) needs a GRH on every path
    lid: int
    active_mtu: int  # IBV_MTU_* enum value (1..5)
    mtu_bytes: int
    max_msg_sz: int
    max_sge: int
    max_sge_rd: int  # some HCAs take fewer SGEs on READ than on SEND; 0 = not reported
    max_qp_rd_atom: int  # READs this device answers at once per QP (responder resources)
    max_qp_init_rd_atom: int  # READs this device keeps outstanding per QP (initiator depth)
    max_qp_wr: int
    max_mr_size: int
    max_cqe: int

    @property
    def read_sge_limit(self) -> int:
        """Most SGEs one READ WR may scatter into on this device."""
        return min(self.max_sge, self.max_sge_rd) if self.max_sge_rd else self.max_sge

    @property
    def is_roce(self) -> bool:
        return self.link_layer == _LINK_ETHERNET


def _gid_to_bytes(gid_str: str) -> bytes:
    return bytes.fromhex(gid_str.replace(":", ""))


def _gid_from_bytes(pv: _Pyverbs, raw: bytes) -> Any:
    h = raw.hex()
    return pv.addr.GID(":".join(h[i : i + 4] for i in range(0, 32, 4)))


def _gid_score(raw: bytes, roce_v2: bool, ethernet: bool) -> int:
    """Preference among GIDs; 0 = unusable."""
    if not any(raw[8:]):
        return 0
    if not ethernet:
        return 1
    # RoCE v2 over IPv4 is routable and is what rxe on an IPv4 netdev gives; v1 and the
    # link-local v2 entries still work on one L2 segment, so keep them as fallbacks.
    if roce_v2:
        return 3 if raw.startswith(_V4_MAPPED_PREFIX) else 2
    return 1


class Device:
    """An opened RDMA device (ibv context) and its caps; ``Device.open`` caches per process."""

    _cache: ClassVar[dict[str | None, Device]] = {}
    _cache_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, ctx: Any, caps: DeviceCaps) -> None:
        self._ctx = ctx
        self.caps = caps
        self._closed = False

    @classmethod
    def open(cls, name: str | None = None) -> Device:
        """Open ``name`` (or the first device with an ACTIVE port) once per process.

        The port and GID chosen are the first ACTIVE port with the best GID: a RoCE v2
        IPv4-mapped GID when there is one.
        """
        with cls._cache_lock:
            dev = cls._cache.get(name)
            if dev is not None and not dev._closed:
                return dev
            dev = cls._open_uncached(name)
            cls._cache[name] = dev
            cls._cache[dev.caps.name] = dev
            return dev

    @classmethod
    def _open_uncached(cls, name: str | None) -> Device:
        pv = _load()
        names = list_devices()
        if not names:
            raise RdmaUnavailable(
                "no RDMA devices: the kernel exposes none (no /sys/class/infiniband entries; "
                "is ib_uverbs loaded and an rxe link added, e.g. `rdma link add rxe0 type rxe "
                "netdev IFACE`?)"
            )
        if name is not None and name not in names:
            raise RdmaUnavailable(f"RDMA device {name!r} not found; devices: {', '.join(names)}")
        reasons = []
        for cand in [name] if name is not None else names:
            try:
                ctx = pv.device.Context(name=cand)
            except pv.err.PyverbsError as exc:
                reasons.append(f"{cand}: cannot open ({_errno_text(exc)})")
                continue
            try:
                caps = cls._pick_port(pv, ctx, cand)
            except RdmaUnavailable as exc:
                ctx.close()
                reasons.append(str(exc))
                continue
            return cls(ctx, caps)
        raise RdmaUnavailable("no usable RDMA port: " + "; ".join(reasons))

    @staticmethod
    def _pick_port(pv: _Pyverbs, ctx: Any, name: str) -> DeviceCaps:
        e = pv.e
        attr = ctx.query_device()
        why = []
        for port in range(1, attr.phys_port_cnt + 1):
            pattr = ctx.query_port(port)
            if pattr.state != _PORT_ACTIVE:
                why.append(f"port {port} is {pv.device.port_state_to_str(pattr.state)}")
                continue
            ethernet = pattr.link_layer == _LINK_ETHERNET
            best: tuple[int, int, bytes] | None = None  # (score, index, gid)
            try:
                # One ioctl for the whole table; rxe's table has 1024 slots and per-index
                # queries go through sysfs (several syscalls each, ~15 us apiece in UML).
                entries = ctx.query_gid_table(max(1, pattr.gid_tbl_len) * attr.phys_port_cnt)
                for ent in entries:
                    if ent.port_num != port:
                        continue
                    raw = _gid_to_bytes(ent.gid_str())
                    score = _gid_score(raw, ent.gid_type == e.IBV_GID_TYPE_ROCE_V2, ethernet)
                    if score and (best is None or score > best[0]):
                        best = (score, ent.gid_index, raw)
            except (pv.err.PyverbsError, AttributeError):
                for idx in range(pattr.gid_tbl_len):
                    try:
                        raw = _gid_to_bytes(ctx.query_gid(port, idx).gid)
                        v2 = ethernet and ctx.query_gid_type(port, idx) == e.IBV_GID_TYPE_SYSFS_ROCE_V2
                    except pv.err.PyverbsError:
                        continue
                    score = _gid_score(raw, v2, ethernet)
                    if score and (best is None or score > best[0]):
                        best = (score, idx, raw)
                    if score == 3:
                        break
            if best is None:
                if ethernet:
                    why.append(
                        f"port {port} is ACTIVE but has no GID (RoCE needs an IP "
                        "address on the netdev under the rxe link)"
                    )
                    continue
                best = (1, 0, bytes(16))  # InfiniBand addresses by LID; the GID is unused
            mtu = int(pattr.active_mtu)
            return DeviceCaps(
                name=name,
                port=port,
                gid_index=best[1],
                gid=best[2],
                link_layer=int(pattr.link_layer),
                lid=int(pattr.lid),
                active_mtu=mtu,
                mtu_bytes=_MTU_BYTES.get(mtu, 0),
                max_msg_sz=int(pattr.max_msg_sz),
                max_sge=int(attr.max_sge),
                max_sge_rd=int(attr.max_sge_rd),
                max_qp_rd_atom=int(attr.max_qp_rd_atom),
                max_qp_init_rd_atom=int(attr.max_qp_init_rd_atom),
                max_qp_wr=int(attr.max_qp_wr),
                max_mr_size=int(attr.max_mr_size),
                max_cqe=int(attr.max_cqe),
            )
        raise RdmaUnavailable(f"{name}: " + ("; ".join(why) or "no ports"))

    @property
    def context(self) -> Any:
        """The pyverbs Context (for code in this module; others should not need it)."""
        if self._closed:
            raise RdmaError(f"device {self.caps.name} is closed")
        return self._ctx

    def alloc_pd(self) -> ProtectionDomain:
        pv = _load()
        try:
            return ProtectionDomain(self, pv.pd.PD(self.context))
        except pv.err.PyverbsError as exc:
            raise RdmaError(f"{self.caps.name}: ibv_alloc_pd failed: {_errno_text(exc)}") from exc

    def close(self) -> None:
        """Close the context and, through pyverbs, everything still open under it.

        Only for tests and process teardown: the object is shared per process.
        """
        if self._closed:
            return
        self._closed = True
        with Device._cache_lock:
            for key in [k for k, v in Device._cache.items() if v is self]:
                del Device._cache[key]
        self._ctx.close()


@atexit.register
def _close_devices() -> None:
    # Left to interpreter finalization, pyverbs tears contexts down after the modules it
    # needs are gone and prints "Error in sys.excepthook". Close them while Python is whole.
    for dev in list(Device._cache.values()):
        with contextlib.suppress(Exception):
            dev.close()


# --------------------------------------------------------------------------- PD and MR


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
        self, address: int, length: int, *, remote_read: bool, keepalive: object | None = None
    ) -> MemoryRegion:
        """Register [address, address+length) (memory the caller owns, e.g. an mmap).

        LOCAL_WRITE always (READ destinations need it); REMOTE_READ if asked.
        ``keepalive`` is held until the MR is closed.
        """
        pv = _load()
        caps = self.device.caps
        if address <= 0:
            # pyverbs allocates a buffer of its own when the address is falsy.
            raise ValueError(f"address must be a positive pointer, got {address}")
        if not 0 < length <= caps.max_mr_size:
            raise ValueError(f"length {length} outside 1..max_mr_size ({caps.max_mr_size})")
        e = pv.e
        access = e.IBV_ACCESS_LOCAL_WRITE | (e.IBV_ACCESS_REMOTE_READ if remote_read else 0)
        try:
            mr = pv.mr.MR(self.pd, length, access, address=address)
        except pv.err.PyverbsError as exc:
            hint = ""
            if getattr(exc, "error_code", None) in (errno.ENOMEM, errno.EPERM, errno.EFAULT):
                hint = "; registration pins pages: raise RLIMIT_MEMLOCK (ulimit -l) and check the range is mapped"
            raise RdmaError(f"ibv_reg_mr({address:#x}, {length}) failed: {_errno_text(exc)}{hint}") from exc
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


# --------------------------------------------------------------------------- connection info


@dataclass(frozen=True)
class QPInfo:
    """What one RC end tells the other to connect. Fixed 32-byte wire form.

    ``psn`` is the first PSN this end sends with (the peer sets its rq_psn to it).
    ``rd_atomic`` is how many incoming READs this end answers at once (its responder
    resources); the peer caps its outstanding READs to it.
    """

    qpn: int
    psn: int
    gid: bytes
    mtu: int  # IBV_MTU_* enum value (1..5) of this end's active port MTU
    lid: int = 0
    rd_atomic: int = 1

    VERSION = 1
    _STRUCT = struct.Struct("!BBBxIIH2x16s")
    SIZE = _STRUCT.size

    def __post_init__(self) -> None:
        if not 0 < self.qpn < 1 << 24:
            raise ValueError(f"qpn {self.qpn} is not a 24-bit QP number")
        if not 0 <= self.psn < 1 << 24:
            raise ValueError(f"psn {self.psn} is not 24-bit")
        if not isinstance(self.gid, bytes) or len(self.gid) != 16:
            raise ValueError("gid must be 16 bytes")
        if self.mtu not in _MTU_BYTES:
            raise ValueError(f"mtu {self.mtu} is not an IBV_MTU_* value (1..5)")
        if not 0 <= self.lid < 1 << 16:
            raise ValueError(f"lid {self.lid} is not 16-bit")
        if not 0 < self.rd_atomic < 256:
            raise ValueError(f"rd_atomic {self.rd_atomic} outside 1..255")

    def to_bytes(self) -> bytes:
        return self._STRUCT.pack(self.VERSION, self.mtu, self.rd_atomic, self.qpn, self.psn, self.lid, self.gid)

    @classmethod
    def from_bytes(cls, data: bytes) -> QPInfo:
        if len(data) != cls.SIZE:
            raise ValueError(f"QPInfo is {cls.SIZE} bytes, got {len(data)}")
        version, mtu, rd_atomic, qpn, psn, lid, gid = cls._STRUCT.unpack(data)
        if version != cls.VERSION:
            raise ValueError(f"unsupported QPInfo version {version}")
        return cls(qpn=qpn, psn=psn, gid=gid, mtu=mtu, lid=lid, rd_atomic=rd_atomic)


# --------------------------------------------------------------------------- QPs

# Local ACK timeout 4.096 us * 2**14 = 67 ms per try (0 would mean "wait forever").
# retry_cnt 6, not the usual 7: rxe (6.1 rxe_comp.c) never decrements a retry_cnt of 7, so a
# dead peer would be retried forever. With 6 a dead peer gives RETRY_EXC_ERR after ~7 tries.
DEFAULT_ACK_TIMEOUT = 14
DEFAULT_RETRY_CNT = 6
# RNR only concerns SENDs; never 7 (= retry forever).
DEFAULT_RNR_RETRY = 3
MIN_RNR_TIMER = 12


def _rc_connect(
    pv: _Pyverbs,
    qp: Any,
    caps: DeviceCaps,
    local_psn: int,
    remote: QPInfo,
    *,
    access: int,
    max_rd_atomic: int,
    max_dest_rd_atomic: int,
    ack_timeout: int,
    retry_cnt: int,
) -> None:
    """RESET/INIT -> RTR -> RTS for an RC QP towards ``remote``."""
    e = pv.e
    if caps.is_roce:
        gr = pv.addr.GlobalRoute(dgid=_gid_from_bytes(pv, remote.gid), sgid_index=caps.gid_index, hop_limit=64)
        ah = pv.addr.AHAttr(port_num=caps.port, is_global=1, gr=gr, dlid=remote.lid)
    else:
        ah = pv.addr.AHAttr(port_num=caps.port, dlid=remote.lid)
    attr = pv.qp.QPAttr(port_num=caps.port)
    attr.qp_access_flags = access
    attr.pkey_index = 0
    attr.path_mtu = min(caps.active_mtu, remote.mtu)  # enum values are ordered by size
    attr.dest_qp_num = remote.qpn
    attr.rq_psn = remote.psn
    attr.sq_psn = local_psn
    attr.max_dest_rd_atomic = max_dest_rd_atomic
    attr.max_rd_atomic = max_rd_atomic
    attr.min_rnr_timer = MIN_RNR_TIMER
    attr.timeout = ack_timeout
    attr.retry_cnt = retry_cnt
    attr.rnr_retry = DEFAULT_RNR_RETRY
    attr.ah_attr = ah
    try:
        if qp.qp_state == e.IBV_QPS_RESET:
            qp.to_init(attr)
        qp.to_rtr(attr)
        qp.to_rts(attr)
    except pv.err.PyverbsError as exc:
        raise RdmaError(f"RC QP {qp.qp_num:#x} -> RTS towards QP {remote.qpn:#x} failed: {_errno_text(exc)}") from exc


def _new_psn() -> int:
    return random.getrandbits(24)


class Responder:
    """Server end of one client connection: an RC QP in the namespace's PD.

    It only answers READs (REMOTE_READ access, responder resources = device max) and posts
    nothing itself, so the server's CPU does no work per READ.
    """

    def __init__(
        self,
        pd: ProtectionDomain,
        remote: QPInfo,
        *,
        ack_timeout: int = DEFAULT_ACK_TIMEOUT,
        retry_cnt: int = DEFAULT_RETRY_CNT,
    ) -> None:
        pv = _load()
        e = pv.e
        self._pd = pd
        caps = pd.device.caps
        ctx = pd.device.context
        self._cq = None
        self._qp = None
        try:
            # QP creation wants CQs even though nothing is ever posted here.
            self._cq = pv.cq.CQ(ctx, 2, None, None, 0)
            cap = pv.qp.QPCap(max_send_wr=1, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
            init = pv.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self._cq, rcq=self._cq, cap=cap)
            self._qp = pv.qp.QP(pd.pd, init)
            psn = _new_psn()
            rd_atom = max(1, min(caps.max_qp_rd_atom, 255))
            self.local_info = QPInfo(
                qpn=self._qp.qp_num, psn=psn, gid=caps.gid, mtu=caps.active_mtu, lid=caps.lid, rd_atomic=rd_atom
            )
            _rc_connect(
                pv,
                self._qp,
                caps,
                psn,
                remote,
                access=e.IBV_ACCESS_REMOTE_READ,
                max_rd_atomic=1,
                max_dest_rd_atomic=rd_atom,
                ack_timeout=ack_timeout,
                retry_cnt=retry_cnt,
            )
        except pv.err.PyverbsError as exc:
            self.close()
            raise RdmaError(f"creating the responder QP failed: {_errno_text(exc)}") from exc
        except BaseException:
            self.close()
            raise
        pd._adopt(self)

    @property
    def qp_num(self) -> int:
        return self.local_info.qpn

    def close(self) -> None:
        """Destroy QP then CQ. Idempotent; a client still reading gets an error completion."""
        qp, self._qp = self._qp, None
        cq, self._cq = self._cq, None
        if qp is not None:
            qp.close()
        if cq is not None:
            cq.close()

    def __enter__(self) -> Responder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sge(NamedTuple):
    """One local scatter element of a READ: where bytes land, and the MR's lkey."""

    addr: int
    length: int
    lkey: int


class ReadOp(NamedTuple):
    """One RDMA READ WR: remote (addr, rkey) scattered into ``sges`` in order."""

    remote_addr: int
    rkey: int
    sges: Sequence[Sge]


@dataclass
class ReadStats:
    """Counters of the last Requester.read(); times (seconds) only with ``timing=True``."""

    wrs: int = 0
    batches: int = 0  # doorbells (post calls)
    build_s: float = 0.0  # building/writing WRs into the send queue
    post_s: float = 0.0  # the doorbell call(s); rxe does the transfer work inside it
    wait_s: float = 0.0  # reaping completions
    blocked: int = 0  # times we slept on the completion channel


def _no_clock() -> float:
    return 0.0


_channel_lock = threading.Lock()


def _event_fds() -> set[int] | None:
    """The process's open uverbs event descriptors (async-event files and completion channels)."""
    fd_dir = "/proc/self/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    found = set()
    for name in names:
        try:
            if "infinibandevent" in os.readlink(f"{fd_dir}/{name}"):
                found.add(int(name))
        except (OSError, ValueError):
            continue  # e.g. the descriptor listdir itself used, closed by now
    return found


def _find_channel_fd(pv: _Pyverbs, ctx: Any) -> tuple[Any, int | None]:
    """Create a CompChannel and find its fd.

    pyverbs < 59 does not expose the fd, and ibv_get_cq_event() blocks with no timeout, so we
    identify the one ``[infinibandevent]`` descriptor the creation adds. Comparing plain fd
    numbers would not do: listdir's own descriptor can hold the very number the channel gets.
    """
    with _channel_lock:
        before = _event_fds()
        channel = pv.cq.CompChannel(ctx)
        fd = getattr(channel, "fd", None)
        if fd is not None:
            return channel, int(fd)
        after = _event_fds()
    if before is None or after is None:
        return channel, None
    new = after - before
    return channel, new.pop() if len(new) == 1 else None


def _uniform_pieces(raddr: int, rkey: int, sges: Sequence[Sge]) -> list[tuple[int, int, Sequence[Sge]]]:
    """Split one READ into consecutive READs whose SGEs all have the same length.

    librxe in rdma-core < 59 (the ibv_wr_set_sge_list of Debian bookworm's rdma-core 44)
    sums the list as num_sge x the first SGE's length; a READ whose SGEs differ in length
    then overruns its scatter list and completes with LOC_PROT_ERR (rdma-core PR #1744).
    """
    out: list[tuple[int, int, Sequence[Sge]]] = []
    start = 0
    for j in range(1, len(sges) + 1):
        if j == len(sges) or sges[j].length != sges[start].length:
            piece = sges[start:j]
            out.append((raddr, rkey, piece))
            raddr += piece[0].length * len(piece)
            start = j
    return out


class Requester:
    """Client end: one RC QP + a CQ with a completion channel, posting READ chains.

    Not thread-safe: one caller at a time.
    """

    def __init__(
        self,
        device: Device,
        pd: ProtectionDomain,
        *,
        max_outstanding: int | None = None,
        max_sge: int | None = None,
        spin_polls: int = 200,
        ack_timeout: int = DEFAULT_ACK_TIMEOUT,
        retry_cnt: int = DEFAULT_RETRY_CNT,
        post_api: str = "auto",
        timing: bool = False,
    ) -> None:
        """``max_outstanding``: send-queue depth, i.e. READ WRs posted but not yet completed
        (default min(1024, max_qp_wr)). ``max_sge``: SGEs per READ (default the device's
        READ limit). ``spin_polls``: CQ polls before blocking on the completion channel.
        ``post_api``: "ex" (ibv_wr_* batch), "legacy" (linked ibv_send_wr chain) or "auto".
        ``timing``: fill ``last_stats`` times (each clock read is a 15-40 us syscall in UML).
        """
        pv = _load()
        e = pv.e
        if pd.device is not device:
            raise ValueError("pd was allocated on another device")
        caps = device.caps
        self.device = device
        self._pd = pd
        self._pv = pv
        depth = min(max_outstanding or 1024, caps.max_qp_wr)
        if depth < 1:
            raise ValueError(f"max_outstanding must be >= 1, got {max_outstanding}")
        limit = caps.read_sge_limit
        self.max_sge = min(max_sge or limit, limit)
        if self.max_sge < 1:
            raise ValueError("max_sge must be >= 1")
        self.depth = depth
        # Unsignaled WRs hold their SQ slot until a later signaled one completes: signal
        # often enough that a full queue always contains a signaled WR to wait for.
        self._sig_every = max(1, depth // 4)
        self._spin = max(0, spin_polls)
        self._ack_timeout = ack_timeout
        self._retry_cnt = retry_cnt
        self._seq = 0  # wr_id of the last WR posted (wr_ids count from 1)
        self._retired = 0  # every WR with wr_id <= this has completed
        self._broken: str | None = None
        self._connected = False
        self.last_stats = ReadStats()
        self._clock = time.perf_counter if timing else _no_clock
        self._deadline: float | None = None
        self._timeout: float | None = None
        self._qp = self._cq = self._channel = None
        self._fd: int | None = None
        self._poller: select.poll | None = None
        self._ex = False
        self._split_mixed_sges = False
        ctx = device.context
        try:
            self._channel, self._fd = _find_channel_fd(pv, ctx)
            if self._fd is not None:
                # Never let ibv_get_cq_event() block: we wait in poll() with a timeout.
                os.set_blocking(self._fd, False)
                self._poller = select.poll()
                self._poller.register(self._fd, select.POLLIN)
            # Room for a completion per WR: after an error every queued WR is flushed.
            cqe = min(depth + 1, caps.max_cqe)
            self._cq = pv.cq.CQ(ctx, cqe, None, self._channel, 0)
            self._qp = self._create_qp(pv, post_api, ctx, depth)
        except pv.err.PyverbsError as exc:
            self.close()
            raise RdmaError(f"creating the requester QP failed: {_errno_text(exc)}") from exc
        except BaseException:
            self.close()
            raise
        self._psn = _new_psn()
        rd_atom = max(1, min(caps.max_qp_rd_atom, 255))
        self.local_info = QPInfo(
            qpn=self._qp.qp_num, psn=self._psn, gid=caps.gid, mtu=caps.active_mtu, lid=caps.lid, rd_atomic=rd_atom
        )
        self._SIGNALED = int(e.IBV_SEND_SIGNALED)
        self._READ = int(e.IBV_WR_RDMA_READ)
        pd._adopt(self)

    def _create_qp(self, pv: _Pyverbs, post_api: str, ctx: Any, depth: int) -> Any:
        e = pv.e
        cap = pv.qp.QPCap(max_send_wr=depth, max_recv_wr=1, max_send_sge=self.max_sge, max_recv_sge=1)
        if post_api not in ("auto", "ex", "legacy"):
            raise ValueError(f"post_api must be auto, ex or legacy, not {post_api!r}")
        if post_api in ("auto", "ex"):
            init = pv.qp.QPInitAttrEx(
                qp_type=e.IBV_QPT_RC,
                scq=self._cq,
                rcq=self._cq,
                cap=cap,
                pd=self._pd.pd,
                comp_mask=e.IBV_QP_INIT_ATTR_PD | e.IBV_QP_INIT_ATTR_SEND_OPS_FLAGS,
                send_ops_flags=e.IBV_QP_EX_WITH_RDMA_READ,
            )
            try:
                qp = pv.qp.QPEx(ctx, init)
            except pv.err.PyverbsError:
                if post_api == "ex":
                    raise
            else:
                self._ex = True
                # see _uniform_pieces: only rxe's ex path has the mixed-length SGE bug
                self._split_mixed_sges = self.device.caps.name.startswith("rxe") or bool(
                    os.environ.get("RDMAKV_SPLIT_MIXED_SGES")
                )
                qp.to_init(self._init_attr(pv))
                return qp
        init = pv.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self._cq, rcq=self._cq, cap=cap)
        qp = pv.qp.QP(self._pd.pd, init)
        qp.to_init(self._init_attr(pv))
        return qp

    def _init_attr(self, pv: _Pyverbs) -> Any:
        attr = pv.qp.QPAttr(port_num=self.device.caps.port)
        attr.qp_access_flags = 0  # nobody reads from or writes to the client over this QP
        attr.pkey_index = 0
        return attr

    @property
    def post_api(self) -> str:
        return "ex" if self._ex else "legacy"

    @property
    def sleeps_on_channel(self) -> bool:
        """True when waits block in poll() on the completion channel (else: 1 ms naps)."""
        return self._poller is not None

    @property
    def usable(self) -> bool:
        return self._broken is None and self._qp is not None

    @property
    def signal_every(self) -> int:
        """Every how many WRs one is signaled (the last WR of a call always is)."""
        return self._sig_every

    @signal_every.setter
    def signal_every(self, n: int) -> None:
        if not 1 <= n <= self.depth:
            raise ValueError(f"signal_every must be 1..{self.depth} (the send-queue depth)")
        self._sig_every = n

    def connect(self, remote: QPInfo) -> None:
        """Move the QP to RTS towards the server's Responder."""
        if self._qp is None:
            raise RdmaError("requester is closed")
        if self._connected:
            raise RdmaError("requester is already connected")
        caps = self.device.caps
        init_depth = max(1, min(caps.max_qp_init_rd_atom, remote.rd_atomic, 255))
        _rc_connect(
            self._pv,
            self._qp,
            caps,
            self._psn,
            remote,
            access=0,
            max_rd_atomic=init_depth,
            max_dest_rd_atomic=1,
            ack_timeout=self._ack_timeout,
            retry_cnt=self._retry_cnt,
        )
        self._connected = True

    # ------------------------------------------------------------------ hot path

    def _prepare(self, ops: Iterable[Any]) -> list[tuple[int, int, Sequence[Sge]]]:
        # Everything is checked before the first WR is posted: a bad WR found mid-chain would
        # leave earlier ones in flight, and the device would turn it into an error completion
        # that kills the QP.
        limit = self.max_sge
        max_msg = self.device.caps.max_msg_sz
        out = []
        for i, op in enumerate(ops):
            raddr, rkey, sges = op
            n = len(sges)
            if not 0 < n <= limit:
                raise ValueError(f"READ #{i} has {n} SGEs; allowed 1..{limit} (device max_sge)")
            for s in sges:
                if type(s) is not Sge:
                    # pyverbs reads .addr/.length/.lkey: plain tuples need wrapping.
                    sges = [Sge(*s) for s in sges]
                    break
            size = sges[0].length if n == 1 else sum(s.length for s in sges)
            if not 0 < size <= max_msg:
                raise ValueError(f"READ #{i} moves {size} bytes; allowed 1..{max_msg} (port max_msg_sz)")
            if n > 1 and self._split_mixed_sges:
                out.extend(_uniform_pieces(raddr, rkey, sges))
            else:
                out.append((raddr, rkey, sges))
        return out

    def read(self, ops: Iterable[Any], *, timeout: float | None = 30.0) -> int:
        """Post ``ops`` as READ WRs and wait until all completed. Returns the WR count.

        Each op is (remote_addr, rkey, [(local_addr, length, lkey), ...]); ``ReadOp``/``Sge``
        instances avoid a conversion (~1-2 us per WR in UML). WRs go out in as few doorbells
        as the send-queue depth allows. Raises:
        - WorkCompletionError on any bad completion (the Requester is unusable afterwards);
        - ReadTimeout (an RdmaError and a TimeoutError) once ``timeout`` seconds have passed
          since the call first had to sleep on the completion channel (also unusable: the
          READs may still land);
        - ValueError, with nothing posted, for an SGE count outside 1..max_sge or a READ
          longer than the port's max_msg_sz.
        """
        if self._broken is not None:
            raise RdmaError(f"requester unusable: {self._broken}")
        if self._qp is None:
            raise RdmaError("requester is closed")
        if not self._connected:
            raise RdmaError("requester is not connected")
        prepared = self._prepare(ops)
        total = len(prepared)
        stats = ReadStats(wrs=total)
        self.last_stats = stats
        if not total:
            return 0
        # The clock is only read once the call has to sleep: in UML every read is a syscall.
        self._deadline = None
        self._timeout = timeout
        base = self._seq  # op i has wr_id base + 1 + i
        last = base + total
        post = self._post_ex if self._ex else self._post_legacy
        try:
            i = 0
            while i < total:
                space = self.depth - (self._seq - self._retired)
                if space <= 0:
                    self._wait(base, stats)
                    continue
                k = min(space, total - i)
                post(prepared, i, k, last, stats)
                i += k
            while self._retired < last:
                self._wait(base, stats)
        except WorkCompletionError:
            raise
        except TimeoutError as exc:
            self._broken = str(exc)
            raise
        except BaseException as exc:
            if self._seq != self._retired:
                # WRs still in flight into caller memory: no safe way to reuse the QP.
                self._broken = f"read() interrupted with WRs in flight ({exc!r})"
            raise
        return total

    def _post_ex(
        self, prepared: list[tuple[int, int, Sequence[Sge]]], start: int, count: int, last: int, stats: ReadStats
    ) -> None:
        qp = self._qp
        sig = self._SIGNALED
        every = self._sig_every
        seq = self._seq
        clock = self._clock
        t0 = clock()
        qp.wr_start()
        try:
            for j in range(start, start + count):
                raddr, rkey, sges = prepared[j]
                seq += 1
                qp.wr_id = seq
                qp.wr_flags = sig if (seq == last or not seq % every) else 0
                qp.wr_rdma_read(rkey, raddr)
                qp.wr_set_sge_list(len(sges), sges)
        except BaseException:
            qp.wr_abort()
            raise
        t1 = clock()
        try:
            qp.wr_complete()
        except self._pv.err.PyverbsError as exc:
            self._broken = f"post failed: {_errno_text(exc)}"
            raise RdmaError(f"posting {count} READ WRs failed: {_errno_text(exc)}") from exc
        self._seq = seq
        stats.post_s += clock() - t1
        stats.build_s += t1 - t0
        stats.batches += 1

    def _post_legacy(
        self, prepared: list[tuple[int, int, Sequence[Sge]]], start: int, count: int, last: int, stats: ReadStats
    ) -> None:
        pv = self._pv
        SendWR = pv.wr.SendWR
        SGE = pv.wr.SGE
        sig = self._SIGNALED
        opcode = self._READ
        every = self._sig_every
        clock = self._clock
        t0 = clock()
        # Built back to front so each WR is born linked to its successor. SendWR copies the
        # SGEs into its own array, but `next` is a raw pointer: the list keeps every WR of
        # the chain alive until post_send returns.
        chain: list[Any] = []
        nxt = None
        seq = self._seq + count
        for j in range(start + count - 1, start - 1, -1):
            raddr, rkey, sges = prepared[j]
            flags = sig if (seq == last or not seq % every) else 0
            wr = SendWR(seq, opcode, len(sges), 0, [SGE(a, n, k) for a, n, k in sges], flags, nxt)
            wr.set_wr_rdma(rkey, raddr)
            chain.append(wr)
            nxt = wr
            seq -= 1
        t1 = clock()
        try:
            self._qp.post_send(nxt, None)
        except pv.err.PyverbsError as exc:
            self._broken = f"post failed: {_errno_text(exc)}"
            raise RdmaError(f"posting {count} READ WRs failed: {_errno_text(exc)}") from exc
        finally:
            del chain
        self._seq += count
        stats.post_s += clock() - t1
        stats.build_s += t1 - t0
        stats.batches += 1

    def _wait(self, base: int, stats: ReadStats) -> None:
        """Reap at least one completion: spin a little, then sleep on the channel."""
        t0 = self._clock()
        cq = self._cq
        n, wcs = cq.poll(16)
        spins = self._spin
        while not n and spins:
            spins -= 1
            n, wcs = cq.poll(16)
        while not n:
            # Arm, then re-poll: a completion that landed between the last poll and the arm
            # raises no event.
            cq.req_notify()
            n, wcs = cq.poll(16)
            if n:
                break
            stats.blocked += 1
            self._block()
            n, wcs = cq.poll(16)
        for wc in wcs:
            if wc.status:
                self._fail(wc, base)
            self._retired = wc.wr_id  # RC completes in order; a signaled WR retires all before
        stats.wait_s += self._clock() - t0

    def _block(self) -> None:
        pv = self._pv
        if self._deadline is None and self._timeout is not None:
            self._deadline = time.monotonic() + self._timeout
        deadline = self._deadline
        while True:
            if deadline is None:
                wait_ms = 1000
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ReadTimeout(
                        f"RDMA READs not completed in time ({self._seq - self._retired} WRs "
                        "outstanding); the requester is unusable"
                    )
                wait_ms = max(1, int(left * 1000))
            if self._poller is None:
                # No fd to sleep on: nap in small steps so the deadline still holds.
                time.sleep(min(wait_ms, 1) / 1000)
                return
            if not self._poller.poll(min(wait_ms, 1000)):
                continue
            try:
                self._channel.get_cq_event(self._cq)
            except pv.err.PyverbsError:
                continue  # EAGAIN: spurious readiness
            self._cq.ack_events(1)
            return

    def _fail(self, wc: Any, base: int) -> None:
        status = int(wc.status)
        name = self._pv.wc_names.get(status, f"status {status}")
        idx = wc.wr_id - base - 1
        op_index = idx if 0 <= idx < self._seq - base else None
        self._broken = f"work completion error {name}"
        hint = ""
        if status == int(self._pv.e.IBV_WC_REM_ACCESS_ERR):
            hint = "the rkey/range is not readable through the responder's PD"
        elif status == int(self._pv.e.IBV_WC_RETRY_EXC_ERR):
            hint = "no response from the peer: responder gone or unreachable"
        raise WorkCompletionError(status, name, int(wc.vendor_err), op_index, hint)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Destroy QP, CQ, then the completion channel. Idempotent."""
        qp, self._qp = self._qp, None
        cq, self._cq = self._cq, None
        ch, self._channel = self._channel, None
        if self._poller is not None and self._fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._poller.unregister(self._fd)
        self._poller = None
        self._fd = None  # owned by libibverbs: destroyed with the channel
        if qp is not None:
            qp.close()
        if cq is not None:
            cq.close()  # acks any events still counted
        if ch is not None:
            ch.close()

    def __enter__(self) -> Requester:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
