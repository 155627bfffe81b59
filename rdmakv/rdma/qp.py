"""RC queue pairs: the connection info both ends exchange, the RC state machine, the Responder."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import Any

from .device import _MTU_BYTES, DeviceCaps, _errno_text, _gid_from_bytes, _load, _Pyverbs
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


# Local ACK timeout 4.096 us * 2**14 = 67 ms per try (0 would mean "wait forever").
DEFAULT_ACK_TIMEOUT = 14
DEFAULT_RETRY_CNT = RETRY_CNT  # not the usual 7: see rxe_quirks
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
