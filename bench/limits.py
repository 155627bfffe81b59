"""The link's own limit: perftest ib_read_bw / ib_read_lat and a raw pyverbs READ, no store logic."""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import shutil
import subprocess
import time

from .stats import summary


def device_ipv4(gid: bytes) -> str | None:
    """The IPv4 address behind a RoCE v2 IPv4-mapped GID."""
    if gid[:12] == bytes(10) + b"\xff\xff":
        return ".".join(str(b) for b in gid[12:])
    return None


def _perftest(tool: str, size: int, iters: int, dev: str, gid_index: int, addr: str, port: int) -> str:
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} not found (apt-get install perftest)")
    args = [tool, "-d", dev, "-x", str(gid_index), "-s", str(size), "-n", str(iters), "-p", str(port), "-F"]
    server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)
        out = ""
        for _ in range(20):  # the server may need a moment to listen
            client = subprocess.run([*args, addr], capture_output=True, text=True, timeout=120)
            out = client.stdout + client.stderr
            if client.returncode == 0:
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"{tool} client failed: {out.strip()[-300:]}")
        return out
    finally:
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _result_row(out: str, size: int) -> list[str]:
    for line in out.splitlines():
        cols = line.split()
        if cols and cols[0] == str(size) and len(cols) >= 3:
            return cols
    raise RuntimeError(f"no result row for {size} bytes in perftest output:\n{out[-800:]}")


def perftest(size: int, iters: int, dev: str, gid_index: int, addr: str) -> dict:
    """ib_read_bw (average MB/s) and ib_read_lat (typical us) for messages of ``size`` bytes."""
    out: dict[str, float | None] = {"bytes": size, "iterations": iters}
    out |= _bandwidth("ib_read_bw", size, iters, dev, gid_index, addr, 18515)
    lat = _result_row(_perftest("ib_read_lat", size, max(5, iters // 2), dev, gid_index, addr, 18516), size)
    # columns: #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%
    nums = [float(x) for x in lat[2:] if re.fullmatch(r"[0-9.]+", x)]
    out["lat_typical_ms"] = nums[2] / 1e3 if len(nums) > 2 else None
    out["lat_min_ms"] = nums[0] / 1e3 if nums else None
    return out


def perftest_write(size: int, iters: int, dev: str, gid_index: int, addr: str) -> dict:
    """ib_write_bw (average MB/s) for messages of ``size`` bytes: the link's limit for a save by WRITE."""
    return {"bytes": size, "iterations": iters} | _bandwidth("ib_write_bw", size, iters, dev, gid_index, addr, 18517)


def _bandwidth(tool: str, size: int, iters: int, dev: str, gid_index: int, addr: str, port: int) -> dict:
    """An ib_*_bw run's average MB/s and the time one message of ``size`` bytes takes at it."""
    bw = _result_row(_perftest(tool, size, iters, dev, gid_index, addr, port), size)
    # columns: #bytes #iterations BW peak[MB/sec] BW average[MB/sec] MsgRate[Mpps]
    avg = float(bw[3])
    return {"bw_avg_MBps": avg, "bw_time_per_message_ms": size / (avg * 1e6) * 1e3 if avg else None}


def raw_pyverbs_read(size: int, runs: int, max_read_bytes: int) -> dict:
    """READ ``size`` bytes between two registered buffers on one device, no store logic."""
    from rdmakv import rdma

    dev = rdma.Device.open(os.environ.get("RDMAKV_RDMA_DEVICE") or None)
    pd_s, pd_c = rdma.alloc_pd(dev), rdma.alloc_pd(dev)
    src = mmap.mmap(-1, size)
    dst = mmap.mmap(-1, size)
    src_addr = ctypes.addressof(ctypes.c_char.from_buffer(src))
    dst_addr = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    mr_s = pd_s.register(src_addr, size, remote_read=True, keepalive=src)
    mr_d = pd_c.register(dst_addr, size, remote_read=False, keepalive=dst)
    req = rdma.Requester(dev, pd_c)
    resp = rdma.Responder(pd_s, req.local_info)
    req.connect(resp.local_info)
    ops = [
        rdma.ReadOp(src_addr + o, mr_s.rkey, [rdma.Sge(dst_addr + o, min(max_read_bytes, size - o), mr_d.lkey)])
        for o in range(0, size, max_read_bytes)
    ]
    samples = []
    try:
        req.read(ops)
        for _ in range(runs):
            t0 = time.perf_counter()
            req.read(ops)
            samples.append(time.perf_counter() - t0)
    finally:
        req.close()
        resp.close()
        pd_s.close()
        pd_c.close()
    return {"bytes": size, "reads_per_op": len(ops), **summary(samples)}
