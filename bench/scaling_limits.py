"""What two streams at once can reach on this machine, with no rdmakv in them: the ceiling for the
"two clients at once vs one" ratio of `rdmakv bench throughput`, measured in the same run.

- raw socket: ``clients`` processes, each receiving the same bytes from its own sender process over
  loopback TCP into a preallocated buffer (bench.tcp_limit.raw_transfer's loop), all at once;
- raw socket + MAC: the same with the frame MAC (Poly1305) on both ends of each stream, the least
  CPU an authenticated transfer costs (with one server, both clients' MACs run in that process);
- write + fdatasync: ``clients`` processes, each writing the same bytes into its own new file in
  the data dir's filesystem and fdatasyncing it, all at once.

The ratio is the aggregate MB/s of two against that of one. rdmakv's own two-client run adds a
server process on the same cores, so it cannot beat these figures."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

from . import tcp_limit


def _raw_worker(args: tuple[int, int, float, bool]) -> tuple[int, float, float]:
    nbytes, reps, start_at, mac = args
    r = tcp_limit.raw_transfer(nbytes, reps, start_at, mac=mac)  # (its sender started and warmed up first)
    return nbytes * reps, r["started"], r["ended"]


def write_synced(path: str, data: memoryview) -> None:
    """``data`` into a new file at ``path``, then fdatasync (what a durable save must do)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        tcp_limit.write_all(fd, data)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _fdatasync_worker(args: tuple[int, int, float, str, int]) -> tuple[int, float, float]:
    nbytes, reps, start_at, directory, idx = args
    data = memoryview(bytes(nbytes))

    def write_all() -> None:
        for i in range(reps):
            path = os.path.join(directory, f"scaling-{idx}-{i}.tmp")
            write_synced(path, data)
            os.unlink(path)

    return _timed(write_all, nbytes * reps, start_at)


def _timed(work, nbytes: int, start_at: float) -> tuple[int, float, float]:
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.time()
    work()
    return nbytes, t0, time.time()


def _aggregate(results: list[tuple[int, float, float]]) -> float:
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    return sum(r[0] for r in results) / wall / 1e6


def _at_once(worker, jobs: list[tuple]) -> float:
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        return _aggregate(pool.map(worker, jobs))


def limit_scaling(nbytes: int, reps: int, directory: str, lead_s: float = 3.0) -> dict:
    """{"raw_socket": {...}, "raw_socket_mac": {...}, "fdatasync": {...}}: aggregate MB/s of one and of
    two at once, and their ratio."""
    out = {}
    for name in ("raw_socket", "raw_socket_mac", "fdatasync"):
        mbps = {}
        for clients in (1, 2):
            start_at = time.time() + lead_s  # the pool's processes (and senders) start before the clock does
            if name != "fdatasync":
                mbps[clients] = _at_once(_raw_worker, [(nbytes, reps, start_at, name == "raw_socket_mac")] * clients)
            else:
                jobs = [(nbytes, reps, start_at, directory, i) for i in range(clients)]
                mbps[clients] = _at_once(_fdatasync_worker, jobs)
        out[name] = {"bytes": nbytes, "reps": reps, "one_MBps": mbps[1], "two_MBps": mbps[2],
                     "ratio": mbps[2] / mbps[1]}  # fmt: skip
    return out
