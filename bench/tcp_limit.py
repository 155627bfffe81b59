"""The TCP path against its own limit: a raw loopback socket moving the same bytes, and the
restore and cold save walls with each frame MAC (HMAC-SHA256, keyed BLAKE3, Poly1305) and each chunk key
(xxh3-64, BLAKE3-256), side by side in one run."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

from .stats import summary

_SENDER = textwrap.dedent("""
    import socket, sys
    n = int(sys.argv[1])
    data = bytes(n)
    ls = socket.create_server(("127.0.0.1", 0))
    print(ls.getsockname()[1], flush=True)
    c, _ = ls.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while c.recv(1):
        c.sendall(data)
""")


def raw_transfer(nbytes: int, runs: int, start_at: float | None = None) -> dict:
    """Per transfer: a 1-byte request, then ``nbytes`` from another process over loopback TCP,
    received into a preallocated buffer (what the TCP path could do with no protocol at all).
    ``start_at`` (a time.time()): the timed transfers wait for it, after the warm-up, so that
    several of these in other processes run at once; "started"/"ended" say when they ran."""
    proc = subprocess.Popen([sys.executable, "-c", _SENDER, str(nbytes)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None  # (a pipe)
        port = int(proc.stdout.readline())
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = memoryview(bytearray(nbytes))
        samples = []
        started = time.time()
        for i in range(runs + 3):
            if i == 3 and start_at is not None:
                while time.time() < start_at:
                    time.sleep(0.001)
                started = time.time()
            t0 = time.perf_counter()
            s.sendall(b"x")
            got = 0
            while got < nbytes:
                got += s.recv_into(buf[got:])
            if i >= 3:  # warm-up
                samples.append(time.perf_counter() - t0)
        ended = time.time()
        s.close()
        return summary(samples) | {"bytes": nbytes, "started": started, "ended": ended}
    finally:
        proc.kill()
        proc.wait()


def variants(ctx, runs: int) -> dict:
    """Restore and cold save over TCP for each (MAC, chunk key) pair, interleaved."""
    from .suites import session

    ref = session(256, 7)
    combos = [(mac, alg) for mac in ("hmac-sha256", "blake3", "poly1305") for alg in ("xxh3", "blake3")]
    stores = {c: ctx.connect(f"tcp-{c[0]}-{c[1]}", "tcp", mac=c[0], hash_alg=c[1]) for c in combos}
    samples: dict[tuple[str, str], dict[str, list[float]]] = {c: {"restore": [], "cold_save": []} for c in combos}
    colds = [session(256, 5000 + i) for i in range(runs)]
    transports = set()
    try:
        for st in stores.values():
            st.save("ref", ref)
            st.restore("ref")
        for i in range(runs):
            for c, st in stores.items():
                t0 = time.perf_counter()
                _, rep = st.restore("ref", report=True)
                samples[c]["restore"].append(time.perf_counter() - t0)
                transports.add(rep.transport)
                samples[c]["cold_save"].append(st.save(f"cold{i}", colds[i]).wall_s)
    finally:
        for st in stores.values():
            st.close()
    out: dict[str, Any] = {f"{mac}+{alg}": {k: summary(v) for k, v in s.items()} for (mac, alg), s in samples.items()}
    out["transports"] = sorted(transports)
    out["kv_bytes"] = ref.nbytes
    return out


def tcp_limit(ctx, runs: int) -> dict:
    v = variants(ctx, runs)
    raw = raw_transfer(v["kv_bytes"], max(runs, 10))
    best = min(x["restore"]["median_ms"] for k, x in v.items() if isinstance(x, dict) and "restore" in x)
    default = v["blake3+xxh3"]["restore"]["median_ms"]
    return {
        "raw_socket": raw,
        "variants": v,
        "restore_default_over_raw": default / raw["median_ms"],
        "restore_best_over_raw": best / raw["median_ms"],
    }


__all__ = ["raw_transfer", "tcp_limit", "variants"]
