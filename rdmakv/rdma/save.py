"""Client side of saves by RDMA WRITE: the missing chunks staged in registered memory exactly as
the server's windows lay them out, then written as a few large WRITEs (one chain per call)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..wire.writes import Reservation
from .requester import ReadOp, Sge

MAX_WRITE_BYTES = 1 << 20  # one WR moves at most this (a long WRITE holds the wire for others)


def write_reserved(restorer, res: Reservation, keys: list, chunk_of: Mapping) -> int:
    """WRITE each missing chunk (``chunk_of[key]``) to its reserved address; returns WRs posted.
    Raises RdmaError (the QP is then unusable) or CodecError for an address outside the windows."""
    w = res.windows
    sizes = w["length"].astype(np.int64)
    base = np.zeros(len(w), dtype=np.int64)
    base[1:] = np.cumsum(sizes)[:-1]
    buf, laddr, lkey = restorer.pool.alloc(int(sizes.sum()))
    for key, addr in zip(keys, res.addrs.tolist()):
        data = np.frombuffer(chunk_of[key], dtype=np.uint8)
        i = res.window_of(addr, len(data))
        at = int(base[i]) + addr - int(w["addr"][i])
        buf[at : at + len(data)] = data
    ops = []
    for i, (addr, length, rkey) in enumerate(zip(w["addr"].tolist(), w["length"].tolist(), w["rkey"].tolist())):
        for o in range(0, length, MAX_WRITE_BYTES):
            n = min(MAX_WRITE_BYTES, length - o)
            ops.append(ReadOp(addr + o, rkey, [Sge(laddr + int(base[i]) + o, n, lkey)]))
    return restorer.requester.write(ops)
