"""RC queue pairs: the connection info both ends exchange, the RC state machine, the Responder."""

from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass
from typing import Any

from .device import MTU_BYTES, DeviceCaps, Pyverbs, errno_text, gid_from_bytes, load_pyverbs
from .errors import RdmaError
from .memory import ProtectionDomain
from .rxe_quirks import RETRY_CNT


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
        if self.mtu not in MTU_BYTES:
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


# Local ACK timeout 4.096 us * 2**14 = 67 ms per try (0 would mean "wait forever").
DEFAULT_ACK_TIMEOUT = 14
DEFAULT_RETRY_CNT = RETRY_CNT  # not the usual 7: see rxe_quirks
# RNR only concerns SENDs; never 7 (= retry forever).
DEFAULT_RNR_RETRY = 3
MIN_RNR_TIMER = 12


def rc_connect(
    pv: Pyverbs,
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
        gr = pv.addr.GlobalRoute(dgid=gid_from_bytes(pv, remote.gid), sgid_index=caps.gid_index, hop_limit=64)
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
        raise RdmaError(f"RC QP {qp.qp_num:#x} -> RTS towards QP {remote.qpn:#x} failed: {errno_text(exc)}") from exc


def new_psn() -> int:
    return random.getrandbits(24)


class Responder:
    """Server end of one client connection: an RC QP in the namespace's PD.

    It answers READs (REMOTE_READ access, responder resources = device max) with no work by
    the server's CPU. For a save by WRITE the server posts two WRs of its own on it: the bind
    of a type-2 memory window over the reserved slots (REMOTE_WRITE on the window only; the
    slab's MRs never carry it), and its invalidation before the chunks are checked.
    """

    _qp: Any  # pyverbs objects (untyped); None once closed
    _cq: Any

    def __init__(
        self,
        pd: ProtectionDomain,
        remote: QPInfo,
        *,
        ack_timeout: int = DEFAULT_ACK_TIMEOUT,
        retry_cnt: int = DEFAULT_RETRY_CNT,
    ) -> None:
        pv = load_pyverbs()
        e = pv.e
        self._pd = pd
        caps = pd.device.caps
        ctx = pd.device.context
        self._cq = None
        self._qp = None
        self._windows: dict[int, Any] = {}  # rkey -> MW
        try:
            # Only window binds and invalidations are ever posted here, one at a time.
            self._cq = pv.cq.CQ(ctx, 8, None, None, 0)
            cap = pv.qp.QPCap(max_send_wr=4, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
            init = pv.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self._cq, rcq=self._cq, cap=cap)
            self._qp = pv.qp.QP(pd.pd, init)
            psn = new_psn()
            rd_atom = max(1, min(caps.max_qp_rd_atom, 255))
            self.local_info = QPInfo(
                qpn=self._qp.qp_num, psn=psn, gid=caps.gid, mtu=caps.active_mtu, lid=caps.lid, rd_atomic=rd_atom
            )
            rc_connect(
                pv,
                self._qp,
                caps,
                psn,
                remote,
                # REMOTE_WRITE on the QP admits WRITEs at all; memory only takes them through a window
                access=e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE,
                max_rd_atomic=1,
                max_dest_rd_atomic=rd_atom,
                ack_timeout=ack_timeout,
                retry_cnt=retry_cnt,
            )
        except pv.err.PyverbsError as exc:
            self.close()
            raise RdmaError(f"creating the responder QP failed: {errno_text(exc)}") from exc
        except BaseException:
            self.close()
            raise
        pd._adopt(self)

    @property
    def qp_num(self) -> int:
        return self.local_info.qpn

    def open_window(self, mr: Any, addr: int, length: int, timeout: float = 2.0) -> int:
        """Bind a new type-2 memory window over [addr, addr+length) of ``mr`` (a MemoryRegion
        registered with mw_bind) with REMOTE_WRITE, on this QP only; returns its rkey."""
        pv = load_pyverbs()
        e = pv.e
        if self._qp is None:
            raise RdmaError("responder is closed")
        try:
            mw = pv.mr.MW(self._pd.pd, e.IBV_MW_TYPE_2)
        except pv.err.PyverbsError as exc:
            raise RdmaError(f"ibv_alloc_mw(type 2) failed: {errno_text(exc)}") from exc
        try:
            info = pv.mr.MWBindInfo(mr._mr, addr, length, e.IBV_ACCESS_REMOTE_WRITE)
            wr = pv.wr.SendWR(opcode=e.IBV_WR_BIND_MW, send_flags=e.IBV_SEND_SIGNALED)
            wr.set_bind_wr(mw, info)
            self._post(wr, "bind of a memory window", timeout)
        except BaseException:
            mw.close()
            raise
        self._windows[wr.rkey] = mw
        return int(wr.rkey)

    def close_window(self, rkey: int, timeout: float = 2.0) -> None:
        """Invalidate the window (a WRITE through it now fails with a remote access error)."""
        pv = load_pyverbs()
        e = pv.e
        mw = self._windows.pop(rkey, None)
        if mw is None:
            return
        try:
            if self._qp is not None:
                wr = pv.wr.SendWR(opcode=e.IBV_WR_LOCAL_INV, send_flags=e.IBV_SEND_SIGNALED)
                wr.imm_data = rkey  # the union member that is invalidate_rkey
                self._post(wr, "invalidation of a memory window", timeout)
        finally:
            mw.close()

    def _post(self, wr: Any, what: str, timeout: float) -> None:
        pv = load_pyverbs()
        try:
            self._qp.post_send(wr)
        except pv.err.PyverbsError as exc:
            raise RdmaError(f"posting the {what} failed: {errno_text(exc)}") from exc
        deadline = time.monotonic() + timeout
        while True:
            n, wcs = self._cq.poll(1)
            if n:
                if wcs[0].status:
                    name = pv.wc_names.get(int(wcs[0].status), str(wcs[0].status))
                    raise RdmaError(f"the {what} completed with {name}")
                return
            if time.monotonic() > deadline:
                raise RdmaError(f"the {what} did not complete within {timeout:g} s")
            time.sleep(0)

    def close(self) -> None:
        """Destroy QP then CQ. Idempotent; a client still reading gets an error completion."""
        for mw in self._windows.values():
            mw.close()
        self._windows.clear()
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
