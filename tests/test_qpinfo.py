"""QPInfo wire codec: pure, no RDMA needed."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from rdmakv.rdma.qp import QPInfo

GID = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])


def test_round_trip_and_fixed_size() -> None:
    info = QPInfo(qpn=0x11, psn=0xABCDEF, gid=GID, mtu=3, lid=7, rd_atomic=128)
    raw = info.to_bytes()
    assert len(raw) == QPInfo.SIZE == 32
    assert QPInfo.from_bytes(raw) == info


@pytest.mark.parametrize("qpn", [1, 0xFFFFFF])
@pytest.mark.parametrize("psn", [0, 0xFFFFFF])
@pytest.mark.parametrize("mtu", [1, 5])
def test_round_trip_edges(qpn: int, psn: int, mtu: int) -> None:
    info = QPInfo(qpn=qpn, psn=psn, gid=bytes(range(16)), mtu=mtu, lid=0xFFFF, rd_atomic=255)
    assert QPInfo.from_bytes(info.to_bytes()) == info


def test_gid_bytes_keep_their_order() -> None:
    raw = QPInfo(qpn=2, psn=3, gid=GID, mtu=1).to_bytes()
    assert raw.endswith(GID)


@pytest.mark.parametrize(
    "field, value",
    [
        ("qpn", 0),
        ("qpn", 1 << 24),
        ("psn", -1),
        ("psn", 1 << 24),
        ("gid", b"\0" * 15),
        ("mtu", 0),
        ("mtu", 6),
        ("lid", 1 << 16),
        ("rd_atomic", 0),
        ("rd_atomic", 256),
    ],
)
def test_rejects_out_of_range(field: str, value: object) -> None:
    ok = QPInfo(qpn=2, psn=3, gid=GID, mtu=1)
    with pytest.raises(ValueError):
        dataclasses.replace(ok, **{field: value})


def test_rejects_bad_bytes() -> None:
    raw = QPInfo(qpn=2, psn=3, gid=GID, mtu=1).to_bytes()
    with pytest.raises(ValueError):
        QPInfo.from_bytes(raw[:-1])
    with pytest.raises(ValueError):
        QPInfo.from_bytes(raw + b"\0")
    with pytest.raises(ValueError, match="version"):
        QPInfo.from_bytes(b"\x02" + raw[1:])
    bad_mtu = bytearray(raw)
    bad_mtu[1] = 9
    with pytest.raises(ValueError):
        QPInfo.from_bytes(bytes(bad_mtu))
    bad_qpn = bytearray(raw)
    struct.pack_into("!I", bad_qpn, 4, 1 << 24)
    with pytest.raises(ValueError):
        QPInfo.from_bytes(bytes(bad_qpn))
