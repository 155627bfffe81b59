"""Bounded everything before authentication: HELLO size, handshake and idle timeouts, connection
caps, thousands of idle or stalled sockets, running out of file descriptors."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import rdmakv
from fallback_tcp.framed import FramedSocket, client_handshake
from rdmakv import kvgen
from rdmakv.errors import BusyError
from rdmakv.kvgen import ModelShape
from rdmakv.wire import messages as msg
from rdmakv.wire.auth import parse_key
from rdmakv.wire.protocol import Op, encode_header

from .conftest import KEY_HEX, ServerProcess

SHAPE = ModelShape("lim", 2, 64, 64)


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_mib(srv) -> float:
    return _status(srv.pid(), "VmRSS") / 1024


def _raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def _save_restore_s(srv, ns: str = "probe") -> float:
    kv = kvgen.generate(kvgen.token_stream(1, 64), SHAPE)
    t0 = time.perf_counter()
    with rdmakv.connect(srv.url(ns), key=KEY_HEX, transport="tcp", window=16, timeout=10) as st:
        st.save("s", kv)
        assert st.restore("s").equals(kv)
    return time.perf_counter() - t0


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_an_oversized_hello_is_refused_before_it_is_read(fresh_server):
    srv = fresh_server("64MiB")
    rss0 = _rss_mib(srv)
    socks = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(encode_header(Op.HELLO, 2, 0, 64 << 20))  # a 64 MiB HELLO, announced
        socks.append(s)
    for s in socks:
        fs = FramedSocket(s)
        header, payload = fs.recv()
        assert header.op == Op.ERROR and "exceeds the limit of 512" in msg.dec_error(payload)[1]
        assert _closed_within(s, 5)
    assert _rss_mib(srv) - rss0 < 8
    assert _save_restore_s(srv) < 5


def test_handshake_and_idle_timeouts(fresh_server):
    srv = fresh_server("64MiB", "--handshake-timeout", "1", "--idle-timeout", "2")
    silent = socket.create_connection(("127.0.0.1", srv.port))
    t0 = time.monotonic()
    assert _closed_within(silent, 5) and time.monotonic() - t0 < 3
    fs = FramedSocket(socket.create_connection(("127.0.0.1", srv.port)))
    client_handshake(fs, parse_key(KEY_HEX), "idle")
    t0 = time.monotonic()
    assert _closed_within(fs.sock, 6) and 1.5 < time.monotonic() - t0 < 5


def test_connection_caps_refuse_with_a_clear_error(fresh_server):
    srv = fresh_server("64MiB", "--max-connections", "30", "--max-connections-per-source", "10")
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(10)]
    time.sleep(0.3)
    with pytest.raises(BusyError, match="connections from 127.0.0.1"):
        rdmakv.connect(srv.url("x"), key=KEY_HEX, transport="tcp")
    other = []
    for i in range(20):  # two other source addresses fill the rest
        s = socket.socket()
        s.bind((f"127.0.0.{2 + i // 10}", 0))
        s.connect(("127.0.0.1", srv.port))
        other.append(s)
    time.sleep(0.3)
    with pytest.raises(BusyError, match="30 connections open"):
        s = socket.socket()
        s.bind(("127.0.0.9", 0))
        s.connect(("127.0.0.1", srv.port))
        FramedSocket(s).send_plain(Op.HELLO, 0, 0, msg.enc_hello(bytes(32), "x", bytes(16), 2))
        header, payload = FramedSocket(s).recv()
        code, text, _ = msg.dec_error(payload)
        raise BusyError(text)
    for s in held + other:
        s.close()
    time.sleep(0.5)
    assert _save_restore_s(srv) < 5


def test_a_thousand_idle_and_two_hundred_stalled_sockets_cost_no_threads(fresh_server, capsys):
    _raise_nofile(4096)
    srv = fresh_server("64MiB", "--handshake-timeout", "60", "--max-connections-per-source", "4096")
    _save_restore_s(srv)  # the worker pool starts its threads on demand: let it, before counting
    rss0, threads0 = _rss_mib(srv), _status(srv.pid(), "Threads")
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(1000)]
    stalled = []
    for _ in range(200):  # each sends half a HELLO and then nothing
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(encode_header(Op.HELLO, 2, 0, 300)[:10])
        stalled.append(s)
    time.sleep(1.0)
    threads1 = _status(srv.pid(), "Threads")  # (before the save: its requests start pool workers, up to --workers)
    wall = _save_restore_s(srv)
    rss1 = _rss_mib(srv)
    with capsys.disabled():
        print(f"\n[limits] 1,200 idle/stalled sockets: server RSS {rss0:.1f} -> {rss1:.1f} MiB "
              f"({(rss1 - rss0) * 1024 / 1200:.1f} KiB each), threads {threads0} -> {threads1}, "
              f"save+restore alongside {wall * 1000:.0f} ms")  # fmt: skip
    assert wall < 1.0
    assert threads1 <= threads0 + 2
    assert (rss1 - rss0) * 1024 / 1200 < 64  # under 64 KiB per unauthenticated connection
    for s in idle + stalled:
        s.close()


def test_out_of_file_descriptors_refuses_and_the_server_lives_on(tmp_path):
    """An in-process server with a small RLIMIT_NOFILE and a connection cap above it: accept()
    hits EMFILE; the waiting client is told so, and the server serves again once fds free up."""
    script = textwrap.dedent(f"""
        import os, resource, socket, sys, time
        from rdmakv.store.engine.core import Engine
        from rdmakv.store.server.eventloop import Server, ServerLimits
        e = Engine({str(tmp_path / 'd')!r}, 16 << 20); e.open()
        srv = Server(e, bytes.fromhex({KEY_HEX!r}), limits=ServerLimits(max_connections=5000)).start()
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        print(srv.address[1], flush=True)
        sys.stdin.readline()
        print(srv.refused, flush=True)
        sys.stdin.readline()
        srv.stop(); e.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))  # fmt: skip
    port = int(proc.stdout.readline())
    _raise_nofile(4096)
    socks = []
    refused = 0
    for _ in range(400):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks.append(s)
    time.sleep(1.0)
    for s in socks[150:]:
        s.settimeout(0.2)
        try:
            data = s.recv(4096)
            refused += b"out of file descriptors" in data
        except (TimeoutError, OSError):
            pass
    proc.stdin.write("\n")
    proc.stdin.flush()
    server_refused = int(proc.stdout.readline())
    assert refused >= 1 and server_refused >= 1
    for s in socks:
        s.close()
    time.sleep(1.5)
    kv = kvgen.generate(kvgen.token_stream(2, 32), SHAPE)
    with rdmakv.connect(f"rdmakv://127.0.0.1:{port}/fd", key=KEY_HEX, transport="tcp", window=16) as st:
        st.save("s", kv)  # still serving
        assert st.restore("s").equals(kv)
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(30) == 0


def test_a_server_process_under_a_small_fd_limit_caps_connections_itself(tmp_path):
    srv = ServerProcess(str(tmp_path / "d"), "16MiB")
    srv.start_prefix = ["prlimit", "--nofile=300:300"]
    srv.start()
    try:
        assert any("at most" in line and "connections" in line for line in srv.log)
        socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(400)]
        time.sleep(1.0)
        assert srv.proc.poll() is None  # alive
        for s in socks:
            s.close()
        time.sleep(0.5)
        assert _save_restore_s(srv) < 5
    finally:
        srv.stop()


def test_claims_allocate_nothing_and_huge_manifests_are_refused(fresh_server):
    srv = fresh_server("64MiB")
    rss0 = _rss_mib(srv)
    liars = []
    for _ in range(20):  # authenticated, then a header announcing a 60 MB frame, then silence
        fs = FramedSocket(socket.create_connection(("127.0.0.1", srv.port)))
        client_handshake(fs, parse_key(KEY_HEX), "liar")
        assert fs.auth is not None
        header = fs.auth.seal(Op.PUT_MANIFEST, 0, 1, [bytes(60 << 20)])[0]
        fs.sock.sendall(header + bytes(1000))
        liars.append(fs)
    time.sleep(1.0)
    assert _rss_mib(srv) - rss0 < 30  # not 20 x 60 MB
    for fs in liars:  # under the byte-rate floor: each is closed once the grace is over
        assert _closed_within(fs.sock, 6)
    import xxhash

    from rdmakv.wire import manifest as mf

    n = 3_000_000  # 60 MB of chunk table naming one 64-byte chunk, built by hand (the client refuses it)
    with rdmakv.connect(srv.url("huge"), key=KEY_HEX, transport="tcp") as st:
        (key,) = st.put_chunks([bytes(64)])
    table = np.zeros(n, mf.CHUNK_DTYPE)
    table["key"], table["length"] = key, 64
    raw = mf._HEADER.pack(mf.MAGIC, mf.VERSION, mf.KIND_OPAQUE, 1, 0, 0, n) + table.tobytes()
    raw += xxhash.xxh3_64_digest(raw)[::-1]  # the trailer is the little-endian u64
    fs = FramedSocket(socket.create_connection(("127.0.0.1", srv.port)))
    client_handshake(fs, parse_key(KEY_HEX), "huge")
    for i in range(20):
        fs.send(Op.PUT_MANIFEST, 0, i + 1, msg.enc_put_manifest(f"m{i}", raw))
        header, payload = fs.recv()
        assert header.op == Op.ERROR and "chunks, limit" in msg.dec_error(payload)[1]
    fs.close()
    assert _rss_mib(srv) - rss0 < 200
    for fs in liars:
        fs.close()
