"""InfiniStore (PyPI ``infinistore`` 0.2.35) beside rdmakv in the throughput bench: its RDMA read
and its TCP read of the same bytes, in the same rxe guest run, with its server's CPU per GB.

Two halves in one file:
- ``run(rows)`` (rdmakv's venv): finds InfiniStore's Python (``$RDMAKV_INFINISTORE_PYTHON``, default
  /work/scratch-infinistore/venv/bin/python: a venv with torch (CPU), infinistore 0.2.35 and
  uvloop==0.21.0, whose 0.23 crashes the server), and runs this file with it as a subprocess;
  it skips with the reason when that Python cannot import infinistore.
- ``main()`` (InfiniStore's venv; stdlib, numpy and infinistore only): starts
  ``infinistore.server`` on the RDMA device (it needs one even for TCP), writes each size's
  bytes once as keys of 3 MiB (one 256-token chunk of the Qwen2.5-0.5B shape, LMCache's default
  chunk), then times reads into a preallocated, registered buffer and checks the bytes.

Its quirks, handled here: a TCP read of a missing key never returns (so every key is checked with
``check_exist`` first), and an RDMA op on rxe can livelock in retries (so each has a timeout, and
a timed-out op ends the RDMA part with that reason).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_PYTHON = "/work/scratch-infinistore/venv/bin/python"
KEY_BYTES = 256 * 12288  # one 256-token chunk of the Qwen2.5-0.5B shape
OP_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 1200.0
SERVICE_PORT, MANAGE_PORT = 22345, 18080


# ----------------------------------------------------------------- rdmakv's side
def _python() -> str:
    return os.environ.get("RDMAKV_INFINISTORE_PYTHON") or DEFAULT_PYTHON


def available() -> tuple[bool, str]:
    py = _python()
    if not os.access(py, os.X_OK):
        return False, f"InfiniStore's Python {py} is not there (set $RDMAKV_INFINISTORE_PYTHON to a venv with " \
                      "infinistore==0.2.35 and uvloop==0.21.0)"
    p = subprocess.run([py, "-c", "import infinistore, uvloop; print(uvloop.__version__)"], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    if p.returncode:
        return False, f"{py} cannot import infinistore: {(p.stdout + p.stderr).strip().splitlines()[-1:]}"
    return True, p.stdout.strip()


def run(rows: list[dict], quick: bool) -> dict:
    ok, why = available()
    if not ok:
        return {"skipped": why}
    from rdmakv import rdma

    from . import limits as lim

    dev = rdma.Device.open(os.environ.get("RDMAKV_RDMA_DEVICE") or None)
    addr = lim.device_ipv4(dev.caps.gid)
    if addr is None:
        return {"skipped": "the RDMA device has no IPv4 RoCE GID (InfiniStore's client needs an address)"}
    sizes = [r["bytes"] for r in rows] or [256 * 12288, 4096 * 12288]
    spec = {"dev": dev.caps.name, "host": addr, "sizes": sizes, "runs": 3 if quick else 5}
    try:
        p = subprocess.run([_python(), os.path.abspath(__file__), json.dumps(spec)], capture_output=True, text=True,
                           timeout=RUN_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        return {"error": f"InfiniStore run did not finish in {RUN_TIMEOUT_S:g} s", "stderr_tail": str(e.stderr)[-800:]}
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"InfiniStore run exited {p.returncode} without a result", "stderr_tail": p.stderr[-1500:]}
    by_bytes = {r["bytes"]: r["tokens"] for r in rows}
    for r in out.get("rows", []):
        r["tokens"] = by_bytes.get(r["bytes"], r["bytes"] // 12288)
    out["uvloop"] = why
    out["note"] = (f"InfiniStore {out.get('version')}: keys of {KEY_BYTES:,} bytes (one 256-token chunk); RDMA read = "
                   "rdma_read_cache_async of all the size's keys into one registered buffer (its server WRITEs them); "
                   "TCP read = tcp_read_cache per key plus the copy into the caller's buffer. Server CPU from "
                   "/proc/<pid>/stat over the timed loop.")  # fmt: skip
    return out


# ----------------------------------------------------------------- InfiniStore's side (its venv)
def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _summary(walls: list[float], nbytes: int, ticks: int) -> dict:
    import statistics

    med = statistics.median(walls)
    return {"median_ms": med * 1e3, "min_ms": min(walls) * 1e3, "max_ms": max(walls) * 1e3, "n": len(walls),
            "MBps": nbytes / med / 1e6,
            "server_cpu_s_per_GB": ticks / os.sysconf("SC_CLK_TCK") / (nbytes * len(walls) / 1e9)}  # fmt: skip


def _start_server(dev: str, prealloc_gb: int, log_path: str) -> subprocess.Popen:
    import urllib.request

    cmd = [sys.executable, "-m", "infinistore.server", "--dev-name", dev, "--link-type", "Ethernet", "--ib-port", "1",
           "--service-port", str(SERVICE_PORT), "--manage-port", str(MANAGE_PORT), "--prealloc-size",
           str(prealloc_gb), "--minimal-allocate-size", "64", "--log-level", "warning"]  # fmt: skip
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"infinistore.server exited {proc.returncode}: {Path(log_path).read_text()[-800:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{MANAGE_PORT}/kvmap_len", timeout=2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("infinistore.server not ready after 300 s")


def _connect(host: str, dev: str | None):
    import contextlib

    import infinistore

    if dev:
        cfg = infinistore.ClientConfig(host_addr=host, service_port=SERVICE_PORT, dev_name=dev, ib_port=1,
                                       link_type=infinistore.LINK_ETHERNET, connection_type=infinistore.TYPE_RDMA,
                                       log_level="warning")  # fmt: skip
    else:
        cfg = infinistore.ClientConfig(host_addr=host, service_port=SERVICE_PORT,
                                       connection_type=infinistore.TYPE_TCP, log_level="warning")  # fmt: skip
    conn = infinistore.InfinityConnection(cfg)
    with contextlib.redirect_stdout(sys.stderr):  # connect() prints
        conn.connect()
    return conn


async def _peer(spec: dict) -> dict:
    import asyncio
    import mmap
    from importlib import metadata

    import numpy as np

    out: dict = {"version": metadata.version("infinistore"), "key_bytes": KEY_BYTES, "rows": []}
    big = max(spec["sizes"])
    prealloc = max(1, -(-int(big * 1.5) // (1 << 30)))
    log_path = "/tmp/infinistore-server.log"
    server = _start_server(spec["dev"], prealloc, log_path)
    try:
        rconn = _connect(spec["host"], spec["dev"])
        tconn = _connect(spec["host"], None)
        src_mm, dst_mm = mmap.mmap(-1, big), mmap.mmap(-1, big)
        src, dst = np.frombuffer(src_mm, np.uint8), np.frombuffer(dst_mm, np.uint8)
        src[:] = np.random.default_rng(1).integers(0, 256, big, dtype=np.uint8)
        dst[::4096] = 0  # fault the pages in now, not in a timed read
        rconn.register_mr(src.ctypes.data, big)
        rconn.register_mr(dst.ctypes.data, big)
        rdma_broken = ""
        for size in spec["sizes"]:
            n_keys = -(-size // KEY_BYTES)
            blocks = [(f"k{size}-{i}", i * KEY_BYTES) for i in range(n_keys)]
            row: dict = {"bytes": size, "keys": n_keys}
            nbytes = n_keys * KEY_BYTES  # whole keys (every size here is a multiple of a key)
            try:
                await asyncio.wait_for(rconn.rdma_write_cache_async(blocks, KEY_BYTES, src.ctypes.data), OP_TIMEOUT_S)
                missing = [k for k, _ in blocks if not tconn.check_exist(k)]
                if missing:  # its TCP read of a missing key never returns: never ask for one
                    raise RuntimeError(f"{len(missing)} keys missing after the write")
            except Exception as e:  # noqa: BLE001
                row["rdma_read"] = row["tcp_read"] = {"error": f"write failed: {type(e).__name__}: {e}"}
                out["rows"].append(row)
                continue
            if rdma_broken:
                row["rdma_read"] = {"error": rdma_broken}
            else:
                walls: list[float] = []
                try:
                    dst[:nbytes] = 0
                    first = rconn.rdma_read_cache_async(blocks, KEY_BYTES, dst.ctypes.data)
                    await asyncio.wait_for(first, OP_TIMEOUT_S)
                    if not np.array_equal(dst[:nbytes], src[:nbytes]):
                        raise RuntimeError("RDMA read returned other bytes")
                    c0 = _cpu_ticks(server.pid)
                    for _ in range(spec["runs"]):
                        t0 = time.perf_counter()
                        await asyncio.wait_for(rconn.rdma_read_cache_async(blocks, KEY_BYTES, dst.ctypes.data),
                                               OP_TIMEOUT_S)  # fmt: skip
                        walls.append(time.perf_counter() - t0)
                    row["rdma_read"] = _summary(walls, nbytes, _cpu_ticks(server.pid) - c0) | {"verified": True}
                except TimeoutError:
                    rdma_broken = f"an RDMA read did not complete in {OP_TIMEOUT_S:g} s (rxe retry livelock?)"
                    row["rdma_read"] = {"error": rdma_broken}
                except Exception as e:  # noqa: BLE001
                    row["rdma_read"] = {"error": f"{type(e).__name__}: {e}"}
            try:
                walls = []
                dst[:nbytes] = 0
                for i in range(spec["runs"] + 1):
                    if i == 1:
                        if not np.array_equal(dst[:nbytes], src[:nbytes]):
                            raise RuntimeError("TCP read returned other bytes")
                        c0 = _cpu_ticks(server.pid)
                    t0 = time.perf_counter()
                    for key, off in blocks:
                        got = tconn.tcp_read_cache(key)
                        if got is None or len(got) != KEY_BYTES:
                            raise RuntimeError(f"tcp_read_cache({key}) gave {None if got is None else len(got)} bytes")
                        dst[off : off + KEY_BYTES] = got
                    if i:
                        walls.append(time.perf_counter() - t0)
                row["tcp_read"] = _summary(walls, nbytes, _cpu_ticks(server.pid) - c0) | {"verified": True}
            except Exception as e:  # noqa: BLE001
                row["tcp_read"] = {"error": f"{type(e).__name__}: {e}"}
            try:
                rconn.delete_keys([k for k, _ in blocks])
            except Exception:  # noqa: BLE001 - the next size has its own keys
                pass
            out["rows"].append(row)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    return out


def main() -> None:
    import asyncio

    spec = json.loads(sys.argv[1])
    try:
        out = asyncio.run(_peer(spec))
    except Exception as e:  # noqa: BLE001 - reported as the result
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
    os._exit(0)  # its client threads may hang at exit


if __name__ == "__main__":
    main()
