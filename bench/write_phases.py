"""Where a save by WRITE spends its time, seen from the client: the reserving PUT_MANIFEST, the
WRITEs (staging included) and the COMMIT, beside a TCP save's calls, with the server's CPU ticks. A
diagnostic beside `rdmakv bench throughput`, run in the rxe guest:
`rdmakv rxe-vm --mem 6G -- rdmakv bench write-phases` (bench/results/throughput/guest-profile/)."""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import rdmakv.rdma.save as rdma_save
from bench.suites import session
from bench.throughput import WINDOW
from fallback_tcp.transport import TcpChannel
from rdmakv.client.store import connect
from rdmakv.store.server.spawn import ServerProcess

spent: collections.defaultdict[str, float] = collections.defaultdict(float)


def timed(label: str, f: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - t0

    return call


def main(argv: list[str] | None = None) -> int:
    """Five timed saves (after one warm-up) per size and transport, a line each on stdout."""
    del argv  # (no options)
    for name, label in (("put_manifest_reserving", "reserve_rpc"), ("commit_written", "commit_rpc"),
                        ("put_manifest", "put_manifest_rpc"), ("put_chunks", "put_chunks")):  # fmt: skip
        setattr(TcpChannel, name, timed(label, getattr(TcpChannel, name)))
    rdma_save.write_reserved = timed("write_reserved", rdma_save.write_reserved)  # (imported at each save)
    key = os.urandom(32).hex()
    data_dir = tempfile.mkdtemp(prefix="rdmakv-phases-")
    server = ServerProcess(data_dir, "4GiB", "--fsync", "manifest", "--transport", "auto", key_hex=key)
    server.start()
    try:
        for n in (256, 4096):
            for transport in ("rdma", "tcp"):
                with connect(server.url("ph"), key=key, transport=transport, window=WINDOW) as st:
                    for i in range(6):
                        kv = session(n, 100 * n + i + (50 if transport == "tcp" else 0))
                        spent.clear()
                        c0 = server.cpu_ticks()
                        rep = st.save(f"s{i}", kv)
                        ticks = server.cpu_ticks() - c0
                        st.delete_manifest(f"s{i}")
                        if i:  # the first warms the connection up
                            phases = {k: round(v * 1e3, 1) for k, v in spent.items()}
                            print(n, transport, rep.transport, f"wall {rep.wall_s * 1e3:.1f}", "server ticks", ticks,
                                  phases, flush=True)  # fmt: skip
                        time.sleep(0.5)
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0
