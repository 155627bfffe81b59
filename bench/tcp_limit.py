"""The TCP path against its own limit: a raw loopback socket moving the same bytes, and the
restore and cold save walls with each frame MAC (HMAC-SHA256, keyed BLAKE3, Poly1305) and each chunk key
(xxh3-64, BLAKE3-256), side by side in one run."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from typing import Any

from .stats import summary

_SENDER = textwrap.dedent("""
    import socket, struct, sys
    n, piece, mac, chunk = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
    data = memoryview(bytes(n))
    if chunk:
        import xxhash
    ls = socket.create_server(("127.0.0.1", 0))
    print(ls.getsockname()[1], flush=True)
    c, _ = ls.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mac:
        import blake3
        from cryptography.hazmat.primitives import poly1305
    seq = 0
    while c.recv(1):
        if not mac:
            c.sendall(data)
            continue
        seq += 1
        if chunk:  # a client computes each chunk's key before it sends
            keys = [xxhash.xxh3_64_intdigest(data[at : at + chunk]) for at in range(0, n, chunk)]
        tag = poly1305.Poly1305(blake3.blake3(struct.pack(">Q", seq)).digest())
        for at in range(0, n, piece):  # each piece hashed, then sent (what seal_stream does)
            tag.update(data[at : at + piece])
            c.sendall(data[at : at + piece])
        c.sendall(tag.finalize())
""")

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def write_all(fd: int, data: memoryview) -> None:
    """All of ``data`` to ``fd`` (os.write may take less than it is given)."""
    done = 0
    while done < data.nbytes:
        done += os.write(fd, data[done:])


MAC_PIECE = 1 << 20  # as protocol.STREAM_PIECE: the MAC runs over pieces of this size as they go


def raw_transfer(nbytes: int, runs: int, start_at: float | None = None, *, mac: bool = False,
                 sync_dir: str | None = None, chunk: int = 0) -> dict:  # fmt: skip
    """Per transfer: a 1-byte request, then ``nbytes`` from another process over loopback TCP,
    received into a preallocated buffer (what the TCP path could do with no protocol at all).
    ``mac``: the same with the default frame MAC (Poly1305) computed by the sender on each piece
    before it goes and checked by the receiver on each piece as it lands (the floor of an
    authenticated transfer). ``sync_dir``: each received piece is also written to a new file
    there, fdatasync'd at the end (the floor of a durable save: the bytes cross the socket and
    reach the disk, with no per-chunk work at all). ``chunk`` (with ``mac`` and ``sync_dir``): the
    bytes work a save's design asks for, each in one native call and no other per-chunk work: the
    sender computes each chunk's xxh3 key before it sends; the receiver copies each piece into a
    second buffer (the slab), hashes every chunk there twice with xxh3 (the key check, the log
    record's checksum) and writes the copy to the file. ``start_at`` (a time.time()): the timed
    transfers wait for it, after the warm-up, so that several of these in other processes run at
    once; "started"/"ended" say when they ran."""
    import blake3
    import xxhash
    from cryptography.hazmat.primitives import poly1305

    cmd = [sys.executable, "-c", _SENDER, str(nbytes), str(MAC_PIECE), "1" if mac else "0", str(chunk)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None  # (a pipe)
        port = int(proc.stdout.readline())
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = memoryview(bytearray(nbytes))
        slab = memoryview(bytearray(nbytes)) if chunk else buf
        tag = bytearray(16)
        samples = []
        started = time.time()
        for i in range(runs + 3):
            if i == 3 and start_at is not None:
                while time.time() < start_at:
                    time.sleep(0.001)
                started = time.time()
            fd = -1 if sync_dir is None else os.open(os.path.join(sync_dir, "raw-save.tmp"), _NEW_FILE, 0o644)
            t0 = time.perf_counter()
            s.sendall(b"x")
            check = poly1305.Poly1305(blake3.blake3(struct.pack(">Q", i + 1)).digest()) if mac else None
            for at in range(0, nbytes, MAC_PIECE if mac or sync_dir else nbytes):
                piece = buf[at : at + MAC_PIECE] if mac or sync_dir else buf
                got = 0
                while got < piece.nbytes:
                    got += s.recv_into(piece[got:])
                if check is not None:
                    check.update(piece)
                if chunk:
                    slab[at : at + piece.nbytes] = piece
                    for c in range(at, at + piece.nbytes, chunk):
                        xxhash.xxh3_64_intdigest(slab[c : c + chunk])  # the key check
                        xxhash.xxh3_64_intdigest(slab[c : c + chunk])  # the record's checksum
                    piece = slab[at : at + piece.nbytes]
                if fd >= 0:
                    write_all(fd, piece)
            if check is not None:
                got = 0
                while got < 16:
                    got += s.recv_into(memoryview(tag)[got:])
                check.verify(bytes(tag))
            if fd >= 0:
                os.fdatasync(fd)
            dt = time.perf_counter() - t0
            if fd >= 0:
                os.close(fd)
            if i >= 3:  # warm-up
                samples.append(dt)
        ended = time.time()
        s.close()
        if sync_dir is not None:
            os.unlink(os.path.join(sync_dir, "raw-save.tmp"))
        return summary(samples) | {"bytes": nbytes, "started": started, "ended": ended, "mac": mac,
                                   "synced": sync_dir is not None, "chunk": chunk}  # fmt: skip
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


__all__ = ["raw_transfer", "tcp_limit", "variants", "write_all"]
