"""Client end of the READ path: one RC QP + a CQ with a completion channel, posting READ chains.

Doorbell-batched WR chains with selective signaling, completions reaped by spinning briefly and
then sleeping on the completion channel (never spinning forever: in a one-CPU guest the peer
needs the CPU).
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .device import Device, Pyverbs, errno_text, load_pyverbs
from .errors import RdmaError, ReadTimeout, WorkCompletionError
from .memory import ProtectionDomain
from .qp import DEFAULT_ACK_TIMEOUT, DEFAULT_RETRY_CNT, QPInfo, new_psn, rc_connect
from .rxe_quirks import find_channel_fd, splits_mixed_sges, uniform_pieces


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


class Requester:
    """Client end: one RC QP + a CQ with a completion channel, posting READ chains.

    Not thread-safe: one caller at a time.
    """

    _qp: Any  # pyverbs objects (untyped); None once closed
    _cq: Any
    _channel: Any

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
        pv = load_pyverbs()
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
            self._channel, self._fd = find_channel_fd(pv, ctx)
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
            raise RdmaError(f"creating the requester QP failed: {errno_text(exc)}") from exc
        except BaseException:
            self.close()
            raise
        self._psn = new_psn()
        rd_atom = max(1, min(caps.max_qp_rd_atom, 255))
        self.local_info = QPInfo(
            qpn=self._qp.qp_num, psn=self._psn, gid=caps.gid, mtu=caps.active_mtu, lid=caps.lid, rd_atomic=rd_atom
        )
        self._SIGNALED = int(e.IBV_SEND_SIGNALED)
        self._READ = int(e.IBV_WR_RDMA_READ)
        self._WRITE = int(e.IBV_WR_RDMA_WRITE)
        pd._adopt(self)

    def _create_qp(self, pv: Pyverbs, post_api: str, ctx: Any, depth: int) -> Any:
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
                send_ops_flags=e.IBV_QP_EX_WITH_RDMA_READ | e.IBV_QP_EX_WITH_RDMA_WRITE,
            )
            try:
                qp = pv.qp.QPEx(ctx, init)
            except pv.err.PyverbsError:
                if post_api == "ex":
                    raise
            else:
                self._ex = True
                self._split_mixed_sges = splits_mixed_sges(self.device.caps.name)
                qp.to_init(self._init_attr(pv))
                return qp
        init = pv.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self._cq, rcq=self._cq, cap=cap)
        qp = pv.qp.QP(self._pd.pd, init)
        qp.to_init(self._init_attr(pv))
        return qp

    def _init_attr(self, pv: Pyverbs) -> Any:
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
        rc_connect(
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
                out.extend(uniform_pieces(raddr, rkey, sges))
            else:
                out.append((raddr, rkey, sges))
        return out

    def write(self, ops: Iterable[Any], *, timeout: float | None = 30.0) -> int:
        """Post ``ops`` as RDMA WRITE WRs (same shape as ``read``: remote range, rkey, local
        SGEs to send) and wait until all completed, i.e. the responder acknowledged them."""
        return self.read(ops, timeout=timeout, _write=True)

    def read(self, ops: Iterable[Any], *, timeout: float | None = 30.0, _write: bool = False) -> int:
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
                post(prepared, i, k, last, stats, _write)
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
        self, prepared: list[tuple[int, int, Sequence[Sge]]], start: int, count: int, last: int, stats: ReadStats,
        write: bool = False,
    ) -> None:  # fmt: skip
        qp = self._qp
        verb = qp.wr_rdma_write if write else qp.wr_rdma_read
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
                verb(rkey, raddr)
                qp.wr_set_sge_list(len(sges), sges)
        except BaseException:
            qp.wr_abort()
            raise
        t1 = clock()
        try:
            qp.wr_complete()
        except self._pv.err.PyverbsError as exc:
            self._broken = f"post failed: {errno_text(exc)}"
            raise RdmaError(f"posting {count} {'WRITE' if write else 'READ'} WRs failed: {errno_text(exc)}") from exc
        self._seq = seq
        stats.post_s += clock() - t1
        stats.build_s += t1 - t0
        stats.batches += 1

    def _post_legacy(
        self, prepared: list[tuple[int, int, Sequence[Sge]]], start: int, count: int, last: int, stats: ReadStats,
        write: bool = False,
    ) -> None:  # fmt: skip
        pv = self._pv
        SendWR = pv.wr.SendWR
        SGE = pv.wr.SGE
        sig = self._SIGNALED
        opcode = self._WRITE if write else self._READ
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
            self._broken = f"post failed: {errno_text(exc)}"
            raise RdmaError(f"posting {count} {'WRITE' if write else 'READ'} WRs failed: {errno_text(exc)}") from exc
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
