"""rdmakv.rdma.verbs against a real device (rxe0 inside the UML guest).

Run through the guest harness: ``python -m rdmakv.guest.rxe_vm -- pytest -m rdma tests/rdma``.
"""

from __future__ import annotations

import mmap
import os
import random
import time
from collections.abc import Iterator

import pytest

from rdmakv.rdma import (
    Device,
    MemoryRegion,
    ProtectionDomain,
    RdmaError,
    RdmaUnavailable,
    ReadOp,
    ReadTimeout,
    Requester,
    Responder,
    Sge,
    WorkCompletionError,
    alloc_pd,
    pyverbs_status,
)

pytestmark = pytest.mark.rdma

SIZE = 1 << 20


@pytest.fixture(scope="module")
def device() -> Device:
    ok, why = pyverbs_status()
    if not ok:
        pytest.skip(why)
    try:
        return Device.open(os.environ.get("RDMAKV_RDMA_DEVICE") or None)
    except RdmaUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def pds(device: Device) -> Iterator[tuple[ProtectionDomain, ProtectionDomain, ProtectionDomain]]:
    """(server namespace A, server namespace B, client) protection domains."""
    made = [alloc_pd(device) for _ in range(3)]
    yield made[0], made[1], made[2]
    for pd in made:
        pd.close()
        pd.close()  # idempotent


def _buffer(pd: ProtectionDomain, *, fill: bytes | None, remote_read: bool) -> tuple[mmap.mmap, MemoryRegion]:
    buf = mmap.mmap(-1, SIZE)
    if fill is not None:
        buf[:] = fill
    return buf, pd.register_buffer(buf, remote_read=remote_read)


def _connect(
    device: Device, server_pd: ProtectionDomain, client_pd: ProtectionDomain, **kw: object
) -> tuple[Requester, Responder]:
    req = Requester(device, client_pd, **kw)
    resp = Responder(server_pd, req.local_info)
    req.connect(resp.local_info)
    return req, resp


@pytest.mark.parametrize("post_api", ["ex", "legacy"])
def test_scatter_read_chain_longer_than_send_queue(device, pds, post_api) -> None:
    pd_a, _, pd_c = pds
    rng = random.Random(7)
    src_bytes = rng.randbytes(SIZE)
    src, src_mr = _buffer(pd_a, fill=src_bytes, remote_read=True)
    dst, dst_mr = _buffer(pd_c, fill=None, remote_read=False)
    depth = 16
    req, resp = _connect(device, pd_a, pd_c, max_outstanding=depth, post_api=post_api)
    assert req.post_api == post_api
    nsge = min(4, req.max_sge)
    wr_len = 4096
    n_wrs = 150  # > depth: the chain must be fed to the SQ in several doorbells
    # Each READ takes a remote 4 KiB run and scatters its pieces to places in reverse order,
    # some as plain tuples (the API converts them) and some as Sge.
    piece = wr_len // nsge
    ops = []
    expected = bytearray(SIZE)
    slots = list(range(n_wrs * nsge))
    rng.shuffle(slots)
    for i in range(n_wrs):
        raddr = src_mr.addr + i * wr_len
        sges = []
        for p in range(nsge):
            slot = slots[i * nsge + p]
            length = piece if p < nsge - 1 else wr_len - piece * (nsge - 1)
            laddr = dst_mr.addr + slot * piece
            sges.append(Sge(laddr, length, dst_mr.lkey) if p % 2 else (laddr, length, dst_mr.lkey))
            off = i * wr_len + p * piece
            expected[slot * piece : slot * piece + length] = src_bytes[off : off + length]
        ops.append(ReadOp(raddr, src_mr.rkey, sges) if i % 2 else (raddr, src_mr.rkey, sges))
    assert req.read(ops, timeout=30) == n_wrs
    assert req.last_stats.batches > 1
    assert dst[:] == bytes(expected)

    # A second call on the same QP works (wr_id accounting carries over).
    one = [(src_mr.addr + SIZE - 8192, src_mr.rkey, [(dst_mr.addr, 8192, dst_mr.lkey)])]
    assert req.read(one) == 1
    assert dst[:8192] == src_bytes[SIZE - 8192 :]

    with pytest.raises(ValueError):
        req.read([(src_mr.addr, src_mr.rkey, [(dst_mr.addr, 1, dst_mr.lkey)] * (req.max_sge + 1))])
    with pytest.raises(ValueError):
        req.read([(src_mr.addr, src_mr.rkey, [])])
    too_big = device.caps.max_msg_sz + 1
    with pytest.raises(ValueError, match="max_msg_sz"):
        req.read([(src_mr.addr, src_mr.rkey, [(dst_mr.addr, too_big, dst_mr.lkey)])])
    assert req.usable
    req.close()
    req.close()
    resp.close()
    resp.close()
    src_mr.close()
    dst_mr.close()
    src.close()  # the registration pinned the mmap until the MR closed
    dst.close()


def test_one_large_read(device, pds) -> None:
    pd_a, _, pd_c = pds
    data = os.urandom(SIZE)
    _, src_mr = _buffer(pd_a, fill=data, remote_read=True)
    dst, dst_mr = _buffer(pd_c, fill=None, remote_read=False)
    req, _ = _connect(device, pd_a, pd_c)
    assert req.read([(src_mr.addr, src_mr.rkey, [(dst_mr.addr, SIZE, dst_mr.lkey)])]) == 1
    assert dst[:] == data


def test_rkey_from_another_pd_is_a_remote_access_error(device, pds) -> None:
    pd_a, pd_b, pd_c = pds
    _, src_mr = _buffer(pd_a, fill=b"\x5a" * SIZE, remote_read=True)
    dst, dst_mr = _buffer(pd_c, fill=b"\xee" * SIZE, remote_read=False)
    # The client authenticated for namespace B, so its QP lives in PD B: A's rkey is foreign.
    req, _ = _connect(device, pd_b, pd_c)
    with pytest.raises(WorkCompletionError) as info:
        req.read([(src_mr.addr, src_mr.rkey, [(dst_mr.addr, 4096, dst_mr.lkey)])], timeout=10)
    assert info.value.status_name == "IBV_WC_REM_ACCESS_ERR"
    assert info.value.op_index == 0
    assert dst[:] == b"\xee" * SIZE
    assert not req.usable
    with pytest.raises(RdmaError, match="unusable"):
        req.read([(src_mr.addr, src_mr.rkey, [(dst_mr.addr, 1, dst_mr.lkey)])])


def test_dead_responder_errors_within_seconds(device, pds) -> None:
    pd_a, _, pd_c = pds
    _, src_mr = _buffer(pd_a, fill=b"\x01" * SIZE, remote_read=True)
    _, dst_mr = _buffer(pd_c, fill=None, remote_read=False)
    req, resp = _connect(device, pd_a, pd_c)
    assert req.sleeps_on_channel  # the error arrives from a timer: this wait really blocks
    op = [(src_mr.addr, src_mr.rkey, [(dst_mr.addr, 4096, dst_mr.lkey)])]
    assert req.read(op) == 1
    resp.close()
    t0 = time.monotonic()
    with pytest.raises(WorkCompletionError) as info:
        req.read(op, timeout=20)
    elapsed = time.monotonic() - t0
    assert info.value.status_name == "IBV_WC_RETRY_EXC_ERR"
    assert elapsed < 5, elapsed
    assert req.last_stats.blocked >= 1


def test_read_timeout_instead_of_hanging(device, pds) -> None:
    pd_a, _, pd_c = pds
    _, src_mr = _buffer(pd_a, fill=b"\x02" * SIZE, remote_read=True)
    _, dst_mr = _buffer(pd_c, fill=None, remote_read=False)
    # 4.096 us * 2**20 = 4.3 s per retransmission: the device will not give up before we do.
    req, resp = _connect(device, pd_a, pd_c, ack_timeout=20)
    op = [(src_mr.addr, src_mr.rkey, [(dst_mr.addr, 4096, dst_mr.lkey)])]
    assert req.read(op) == 1
    resp.close()
    t0 = time.monotonic()
    with pytest.raises(ReadTimeout):
        req.read(op, timeout=0.5)
    assert time.monotonic() - t0 < 3
    assert not req.usable


def test_register_rejects_bad_ranges(device, pds) -> None:
    pd = pds[0]
    with pytest.raises(ValueError):
        pd.register(0, 4096, remote_read=False)
    with pytest.raises(ValueError):
        pd.register(4096, 0, remote_read=False)


def test_caps_are_queried(device) -> None:
    caps = device.caps
    assert caps.max_sge >= 1 and caps.max_qp_wr >= 1 and caps.max_qp_rd_atom >= 1
    assert caps.mtu_bytes in (256, 512, 1024, 2048, 4096)
    assert len(caps.gid) == 16
    assert Device.open(caps.name) is device
