"""Work-arounds for soft-RoCE (rxe) and the rdma-core 44 of Debian bookworm, in one place.

Each one says what breaks without it and where it is fixed upstream, so it can be dropped
once the fix is everywhere we run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

# retry_cnt 6, not the usual 7: rxe (6.1 rxe_comp.c) never decrements a retry_cnt of 7, so a
# dead peer would be retried forever. With 6 a dead peer gives RETRY_EXC_ERR after ~7 tries.
RETRY_CNT = 6


def splits_mixed_sges(device_name: str) -> bool:
    """Whether READs must be cut into pieces whose SGEs share one length (see uniform_pieces).

    Only rxe's extended post path has the bug; $RDMAKV_SPLIT_MIXED_SGES forces the split."""
    return device_name.startswith("rxe") or bool(os.environ.get("RDMAKV_SPLIT_MIXED_SGES"))


def uniform_pieces(raddr: int, rkey: int, sges: Sequence[Any]) -> list[tuple[int, int, Sequence[Any]]]:
    """Split one READ into consecutive READs whose SGEs all have the same length.

    librxe in rdma-core < 59 (the ibv_wr_set_sge_list of Debian bookworm's rdma-core 44)
    sums the list as num_sge x the first SGE's length; a READ whose SGEs differ in length
    then overruns its scatter list and completes with LOC_PROT_ERR (rdma-core PR #1744).
    """
    out: list[tuple[int, int, Sequence[Any]]] = []
    start = 0
    for j in range(1, len(sges) + 1):
        if j == len(sges) or sges[j].length != sges[start].length:
            piece = sges[start:j]
            out.append((raddr, rkey, piece))
            raddr += piece[0].length * len(piece)
            start = j
    return out


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


def find_channel_fd(pv: Any, ctx: Any) -> tuple[Any, int | None]:
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
