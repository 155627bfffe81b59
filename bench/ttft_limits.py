"""The physical limits beside a restore of one slot file's bytes, measured in the same run:
writing them to the slot dir's filesystem, and moving them once through a loopback TCP socket
(one stream, no MAC, no checks: what any fetch over TCP costs at the least)."""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from pathlib import Path


def _write(data: bytes, out: Path) -> float:
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        f.write(data)
    return time.perf_counter() - t0


def _loopback(data: bytes) -> float:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def send() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(data)

    th = threading.Thread(target=send)
    th.start()
    buf = bytearray(len(data))
    view = memoryview(buf)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        got = 0
        while got < len(buf):
            n = c.recv_into(view[got:])
            if not n:
                break
            got += n
    dt = time.perf_counter() - t0
    th.join()
    srv.close()
    return dt


def measure(slot_file: Path, runs: int) -> dict[str, float]:
    """Medians in ms: the file written once more beside itself, and its bytes over loopback."""
    data = slot_file.read_bytes()
    out = slot_file.with_suffix(".limit")
    try:
        writes = [_write(data, out) for _ in range(runs)]
    finally:
        out.unlink(missing_ok=True)
    sockets = [_loopback(data) for _ in range(runs)]
    return {"bytes": len(data), "file_write_ms": statistics.median(writes) * 1e3,
            "loopback_tcp_ms": statistics.median(sockets) * 1e3, "cpus": os.cpu_count() or 0}  # fmt: skip
