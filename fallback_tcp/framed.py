"""Authenticated frames over a stream socket (the socket edge of rdmakv.wire.protocol)."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from rdmakv.errors import AuthError, ConnectionLost, ProtocolError, RdmakvError
from rdmakv.wire import messages as msg
from rdmakv.wire.auth import NONCE_BYTES, derive_session_keys
from rdmakv.wire.protocol import (
    DEFAULT_MAX_FRAME,
    FLAG_PLAIN,
    FLAG_RESPONSE,
    HEADER,
    TAG_LEN,
    FrameAuth,
    Header,
    Op,
    decode_header,
    plain_frame,
)

_IOV_MAX = 512
_READ_AHEAD = 64 << 10
_DIRECT_RECV = 16 << 10  # reads at least this big skip the read-ahead buffer (no extra copy)


def send_all(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> int:
    """Scatter-gather send of every byte of ``parts`` (no join, no copy)."""
    views = [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]
    total = sum(v.nbytes for v in views)
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i : i + _IOV_MAX])
        while sent:
            n = views[i].nbytes
            if sent >= n:
                sent -= n
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0
    return total


class FramedSocket:
    """One connection's framing, authentication and byte counters."""

    def __init__(self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self.auth: FrameAuth | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_sent = 0
        self.frames_received = 0
        self._buf = bytearray(64 << 10)
        self._hdr = bytearray(HEADER.size)
        self._rbuf = bytearray(_READ_AHEAD)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        self._tag = bytearray(TAG_LEN)

    def send(self, op: int, flags: int, req_id: int, parts: Sequence[bytes | memoryview]) -> int:
        assert self.auth is not None
        n = send_all(self.sock, self.auth.seal(op, flags, req_id, parts))
        self.bytes_sent += n
        self.frames_sent += 1
        return n

    def send_plain(self, op: int, flags: int, req_id: int, payload: bytes) -> None:
        frame = plain_frame(op, flags, req_id, payload)
        self.sock.sendall(frame)
        self.bytes_sent += len(frame)
        self.frames_sent += 1

    def _recv_exact(self, view: memoryview) -> None:
        """Fill ``view``. Small reads go through a read-ahead buffer, so a small frame (header,
        payload, tag) costs one recv syscall instead of three; big payloads are received straight
        into place."""
        n = view.nbytes
        got = min(n, self._rend - self._rstart)
        if got:
            view[:got] = self._rbuf[self._rstart : self._rstart + got]
            self._rstart += got
        while got < n:
            want = n - got
            if want >= _DIRECT_RECV:
                r = self.sock.recv_into(view[got:], want)
            else:
                r = self.sock.recv_into(self._rview, len(self._rbuf))
                self._rstart, self._rend = 0, r
            if r == 0:
                if got == 0 and view.obj is self._hdr:
                    raise ConnectionLost("peer closed the connection")
                raise ConnectionLost(f"peer closed the connection mid-frame ({got} of {n} bytes)")
            if want < _DIRECT_RECV:
                k = min(r, want)
                view[got : got + k] = self._rbuf[:k]
                self._rstart = k
                got += k
            else:
                got += r

    def recv(self) -> tuple[Header, memoryview]:
        """Next frame; its payload view is valid until the next recv()."""
        hview = memoryview(self._hdr)
        self._recv_exact(hview)
        header = decode_header(hview, self.max_frame)
        if len(self._buf) < header.length:
            self._buf = bytearray(max(header.length, 2 * len(self._buf)))
        payload = memoryview(self._buf)[: header.length]
        self._recv_exact(payload)
        if header.plain:
            if self.auth is not None and header.op != Op.ERROR:
                raise AuthError("unauthenticated frame after the handshake")
            self.bytes_received += HEADER.size + header.length
        else:
            if self.auth is None:
                raise ProtocolError("authenticated frame before the handshake")
            tag = memoryview(self._tag)
            self._recv_exact(tag)
            self.auth.verify(hview, payload, tag)
            self.bytes_received += HEADER.size + header.length + TAG_LEN
        self.frames_received += 1
        return header, payload

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def raise_error_frame(payload: memoryview) -> None:
    from rdmakv.errors import ERRORS_BY_CODE, MissingChunksError

    code, message, missing = msg.dec_error(payload)
    cls = ERRORS_BY_CODE.get(code, RdmakvError)
    if cls is MissingChunksError:
        raise MissingChunksError(message, missing.tolist())
    raise cls(message)


def client_handshake(fs: FramedSocket, key: bytes, namespace: str) -> dict:
    """HELLO exchange, key derivation, then one authenticated AUTH round trip each way."""
    nonce = os.urandom(NONCE_BYTES)
    fs.send_plain(Op.HELLO, 0, 0, msg.enc_hello(nonce, namespace))
    header, payload = fs.recv()
    if header.op == Op.ERROR:
        raise_error_frame(payload)
    if header.op != Op.HELLO or not header.flags & FLAG_RESPONSE:
        raise ProtocolError(f"expected HELLO from the server, got opcode {header.op}")
    server_nonce, _ = msg.dec_hello(payload)
    c2s, s2c = derive_session_keys(key, nonce, server_nonce, namespace)
    fs.auth = FrameAuth(c2s, s2c)
    fs.send(Op.AUTH, 0, 0, [])
    try:
        header, payload = fs.recv()
    except AuthError as e:
        raise AuthError("server failed to authenticate (it holds a different key)") from e
    if header.op == Op.ERROR:
        raise_error_frame(payload)
    if header.op != Op.AUTH:
        raise ProtocolError(f"expected AUTH from the server, got opcode {header.op}")
    info = msg.dec_json(payload)
    return info if isinstance(info, dict) else {}


def server_handshake(fs: FramedSocket, key: bytes, info: dict) -> str:
    """Returns the authenticated namespace; raises AuthError (after telling the client)."""
    header, payload = fs.recv()
    if header.op != Op.HELLO or not header.plain:
        raise ProtocolError(f"expected HELLO, got opcode {header.op}")
    client_nonce, namespace = msg.dec_hello(payload)
    if not namespace or len(namespace.encode()) > 255 or "/" in namespace:
        raise ProtocolError(f"bad namespace {namespace!r}")
    nonce = os.urandom(NONCE_BYTES)
    fs.send_plain(Op.HELLO, FLAG_RESPONSE, header.req_id, msg.enc_hello(nonce, namespace))
    c2s, s2c = derive_session_keys(key, client_nonce, nonce, namespace)
    fs.auth = FrameAuth(s2c, c2s)
    try:
        header, _ = fs.recv()
    except AuthError:
        fs.auth = None
        fs.send_plain(
            Op.ERROR,
            FLAG_RESPONSE,
            0,
            msg.enc_error(AuthError.code, "authentication failed: the client's key does not match the server's"),
        )
        raise AuthError("client failed to authenticate (wrong key)") from None
    if header.op != Op.AUTH:
        raise ProtocolError(f"expected AUTH, got opcode {header.op}")
    fs.send(Op.AUTH, FLAG_RESPONSE, header.req_id, [msg.enc_json(info)])
    return namespace


__all__ = ["FramedSocket", "client_handshake", "server_handshake", "send_all", "raise_error_frame", "FLAG_PLAIN"]
