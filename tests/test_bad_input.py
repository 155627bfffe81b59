"""Every bad input gets a clear error, loses nothing, and the server keeps serving others."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

import rdmakv
from fallback_tcp.framed import FramedSocket, client_handshake
from rdmakv import kvgen
from rdmakv.errors import (
    AuthError,
    ConnectionLost,
    IntegrityError,
    ManifestError,
    MissingChunksError,
    NotFoundError,
    ProtocolError,
    StoreFullError,
)
from rdmakv.kvgen import ModelShape
from rdmakv.wire import messages as msg
from rdmakv.wire.auth import parse_key
from rdmakv.wire.protocol import HEADER, Op, encode_header

from .conftest import KEY_HEX, OTHER_KEY_HEX

SMALL = ModelShape("small", 2, 16, 16)


def _kv(seed: int, n: int = 40) -> rdmakv.KVState:
    return kvgen.generate(kvgen.token_stream(seed, n), SMALL)


def _raw(server, ns: str) -> FramedSocket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    fs = FramedSocket(sock)
    client_handshake(fs, parse_key(KEY_HEX), ns)
    return fs


def _read_error(fs: FramedSocket) -> tuple[int, str]:
    header, payload = fs.recv()
    assert header.op == Op.ERROR
    code, message, _ = msg.dec_error(payload)
    return code, message


def _still_serving(server, ns: str) -> None:
    kv = _kv(99)
    with rdmakv.connect(server.url(ns + "-other"), key=KEY_HEX, transport="tcp", window=8) as st:
        st.save("probe", kv)
        assert st.restore("probe").equals(kv)


def test_wrong_key(server, ns):
    with pytest.raises(AuthError, match="key"):
        rdmakv.connect(server.url(ns), key=OTHER_KEY_HEX, transport="tcp")
    _still_serving(server, ns)


def test_malformed_key_is_a_clear_error():
    with pytest.raises(AuthError, match="64 hex characters"):
        rdmakv.connect("rdmakv://127.0.0.1:1/x", key="abc")


def test_tampered_frame(server, ns):
    fs = _raw(server, ns)
    parts = fs.auth.seal(Op.EXISTS, 0, 1, [msg.enc_keys([1, 2, 3])])
    frame = bytearray(b"".join(bytes(p) for p in parts))
    frame[HEADER.size + 5] ^= 0x01  # flip one payload bit
    fs.sock.sendall(frame)
    code, message = _read_error(fs)
    assert code == AuthError.code and "authentication failed" in message
    with pytest.raises(ConnectionLost):
        fs.recv()  # the server hung up
    _still_serving(server, ns)


def test_replayed_frame(server, ns):
    fs = _raw(server, ns)
    parts = fs.auth.seal(Op.EXISTS, 0, 1, [msg.enc_keys([1])])
    frame = b"".join(bytes(p) for p in parts)
    fs.sock.sendall(frame)
    header, _ = fs.recv()
    assert header.op == Op.EXISTS
    fs.sock.sendall(frame)  # same bytes again: the implicit sequence number moved on
    code, message = _read_error(fs)
    assert code == AuthError.code and "replayed" in message
    _still_serving(server, ns)


def test_reordered_frames(server, ns):
    fs = _raw(server, ns)
    a = b"".join(bytes(p) for p in fs.auth.seal(Op.EXISTS, 0, 1, [msg.enc_keys([1])]))
    b = b"".join(bytes(p) for p in fs.auth.seal(Op.EXISTS, 0, 2, [msg.enc_keys([2])]))
    fs.sock.sendall(b + a)
    code, _ = _read_error(fs)
    assert code == AuthError.code


def test_reflected_frame_is_rejected(server, ns):
    """A server frame sent back to the server fails: each direction has its own key."""
    fs = _raw(server, ns)
    fs.send(Op.STATS, 0, 1, [])
    hdr = bytearray(HEADER.size)
    fs.sock.recv_into(hdr, HEADER.size, socket.MSG_WAITALL)
    length = HEADER.unpack(hdr)[5]
    rest = fs.sock.recv(length + 32, socket.MSG_WAITALL)
    fs.sock.sendall(bytes(hdr) + rest)
    code, _ = _read_error_raw(fs)
    assert code == AuthError.code


def _read_error_raw(fs: FramedSocket) -> tuple[int, str]:
    # After the manual recv above our receive counter is behind; read a plain error frame.
    hdr = fs.sock.recv(HEADER.size, socket.MSG_WAITALL)
    *_, op, flags, _, length = HEADER.unpack(hdr)
    payload = fs.sock.recv(length, socket.MSG_WAITALL)
    assert op == Op.ERROR
    code, message, _ = msg.dec_error(payload)
    return code, message


def test_truncated_frame_then_disconnect(server, ns):
    fs = _raw(server, ns)
    parts = fs.auth.seal(Op.PUT_CHUNKS, 0, 1, msg.enc_put_chunks([1], [b"x" * 1000]))
    frame = b"".join(bytes(p) for p in parts)
    fs.sock.sendall(frame[: len(frame) // 2])
    fs.sock.close()  # server must notice mid-frame EOF, store nothing, and carry on
    _still_serving(server, ns)
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        assert st.stats()["chunks"] == 0


def test_oversized_length_rejected_before_allocation(server, ns):
    fs = _raw(server, ns)
    fs.sock.sendall(encode_header(Op.PUT_CHUNKS, 0, 1, 0xFFFFFFF0))
    code, message = _read_error(fs)
    assert code == ProtocolError.code or "exceeds the limit" in message
    assert "exceeds the limit" in message
    _still_serving(server, ns)


def test_garbage_bytes_instead_of_a_frame(server, ns):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = sock.recv(4096)
    assert b"not an rdmakv frame" in data or data == b""
    _still_serving(server, ns)


def test_unknown_opcode(server, ns):
    fs = _raw(server, ns)
    fs.send(99, 0, 7, [b"hello"])
    code, message = _read_error(fs)
    assert code == ProtocolError.code and "unknown opcode 99" in message
    fs.send(Op.STATS, 0, 8, [])  # the connection is still usable: the frame was authentic
    header, _ = fs.recv()
    assert header.op == Op.STATS


def test_garbage_manifest(server, ns):
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        with pytest.raises(ManifestError, match="not a manifest"):
            st.put_manifest("bad", b"\x00" * 64)
        m = st.put_manifest  # a truncated real manifest
        kvm, _ = __import__("rdmakv.wire.chunking", fromlist=["split"]).split(_kv(1), 8)
        with pytest.raises(ManifestError):
            m("bad", kvm.encode()[:-3])
        assert st.list() == []


def test_manifest_referencing_missing_chunks(server, ns):
    from rdmakv.wire import chunking

    kvm, chunks = chunking.split(_kv(2), 8)
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        missing = st.put_manifest("m", kvm)
        assert sorted(missing) == sorted(set(kvm.keys.tolist()))
        assert st.list() == []  # not visible half-written
        st.put_chunks(chunks[:3])
        missing = st.put_manifest("m", kvm)
        assert len(missing) == len(set(kvm.keys.tolist())) - len({int(k) for k in kvm.keys[:3]})


def test_chunk_not_matching_its_key_is_refused(server, ns):
    fs = _raw(server, ns)
    fs.send(Op.PUT_CHUNKS, 0, 1, msg.enc_put_chunks([12345], [b"not the bytes of 12345"]))
    code, message = _read_error(fs)
    assert code == IntegrityError.code and "do not hash" in message


def test_unknown_name(server, ns):
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        with pytest.raises(NotFoundError, match="no manifest named 'nope'"):
            st.restore("nope")
        with pytest.raises(NotFoundError):
            st.delete_manifest("nope")


def test_bad_names_rejected_locally(server, ns):
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        for bad in ("", "x" * 256, "a\nb"):
            with pytest.raises(ValueError):
                st.save(bad, _kv(3))


def test_store_full_keeps_acknowledged_manifests(fresh_server):
    """A cache full of pinned sessions: STORE_FULL says which limit and how much is pinned,
    every acknowledged session survives, and unpinning or deleting makes room again."""
    srv = fresh_server("4MiB")
    big = ModelShape("big", 8, 256, 256)  # 8 KiB per token
    saved = {}
    with rdmakv.connect(srv.url("full"), key=KEY_HEX, transport="tcp", window=32) as st:
        with pytest.raises(StoreFullError, match=r"store full.*memory capacity.*pinned \(\d") as ei:
            for i in range(100):
                kv = kvgen.generate(kvgen.token_stream(500 + i, 64), big)
                st.save(f"s{i}", kv, pin=True)
                saved[f"s{i}"] = kv
        assert "MiB pinned in this namespace" in str(ei.value)
        assert len(saved) >= 3
        for name, kv in saved.items():
            assert st.restore(name).equals(kv)
        # deleting frees room: the next save succeeds
        st.delete_manifest("s0")
        st.save("after", saved["s1"])
        st.unpin("s1")
        st.save("after-unpin", kvgen.generate(kvgen.token_stream(999, 64), big))
    # and everything acknowledged survives a restart
    srv.stop()
    srv.start()
    with rdmakv.connect(srv.url("full"), key=KEY_HEX, transport="tcp") as st:
        for name, kv in saved.items():
            if name != "s0":
                assert st.restore(name).equals(kv)


def test_client_disconnecting_mid_pipeline(server, ns):
    fs = _raw(server, ns)
    chunks = [np.random.default_rng(i).bytes(64 << 10) for i in range(40)]
    from rdmakv.hashing import chunk_key

    for i, c in enumerate(chunks):  # 40 frames in flight, no response read
        fs.send(Op.PUT_CHUNKS, 0, i + 1, msg.enc_put_chunks([chunk_key(c)], [c]))
    fs.sock.close()
    _still_serving(server, ns)
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        assert st.list() == []  # nothing half-visible; orphan chunks may remain until evicted


def test_unreachable_server_is_one_clear_line():
    r = subprocess.run(
        [sys.executable, "-m", "rdmakv", "ls", "rdmakv://127.0.0.1:9/x"],
        capture_output=True,
        text=True,
        env={"RDMAKV_AUTH_KEY": KEY_HEX, "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach rdmakv server at 127.0.0.1:9" in lines[0]


def test_wrong_key_cli_is_one_clear_line(server):
    r = subprocess.run(
        [sys.executable, "-m", "rdmakv", "stats", server.url("x")],
        capture_output=True,
        text=True,
        env={"RDMAKV_AUTH_KEY": OTHER_KEY_HEX, "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "authentication failed" in lines[0], r.stderr


def test_missing_key_cli_is_one_clear_line(server):
    r = subprocess.run(
        [sys.executable, "-m", "rdmakv", "ls", server.url("x")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 1 and "RDMAKV_AUTH_KEY" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_chunks_error_type_exists():
    assert MissingChunksError("x", [1]).missing == [1]
