"""Authenticated frames over a blocking stream socket: the client's socket edge.

Messages larger than the peer's frame limit go out as continuation frames (``FLAG_MORE``) and
are joined on receipt up to a message limit. Once the handshake is done, nothing unauthenticated
is accepted: an on-path party without the key cannot inject even an error.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Sequence

from rdmakv.errors import ERRORS_BY_CODE, AuthError, ConnectionLost, MissingChunksError, ProtocolError, RdmakvError
from rdmakv.wire import messages as msg
from rdmakv.wire.auth import NONCE_BYTES, derive_session_keys, fingerprint
from rdmakv.wire.frames import MessageAssembler
from rdmakv.wire.iovec import IOV_MAX, advance, byte_views
from rdmakv.wire.protocol import (
    DEFAULT_MAC,
    DEFAULT_MAX_FRAME,
    FLAG_MORE,
    FLAG_PLAIN,
    FLAG_RESPONSE,
    HEADER,
    MAC_NAMES,
    STREAM_PIECE,
    TAG_LEN,
    FrameAuth,
    Header,
    Op,
    decode_header,
    plain_frame,
)

_READ_AHEAD = 64 << 10
_DIRECT_RECV = 16 << 10  # reads at least this big skip the read-ahead buffer (no extra copy)
DEFAULT_MAX_MESSAGE = (1 << 31) + (1 << 20)  # the largest chunk a manifest can name, plus framing


def send_all(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> int:
    """Scatter-gather send of every byte of ``parts`` (no join, no copy)."""
    views = byte_views(parts)
    total = sum(v.nbytes for v in views)
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg over TLS: the record layer copies anyway
        for v in views:
            sock.sendall(v)
        return total
    i = 0
    while i < len(views):
        i = advance(views, i, sock.sendmsg(views[i : i + IOV_MAX]))
    return total


def split_message(parts: Sequence[bytes | memoryview], limit: int) -> list[list[memoryview]]:
    """Cut a message's parts into frames of at most ``limit`` payload bytes each."""
    frames: list[list[memoryview]] = [[]]
    room = limit
    for p in parts:
        v = memoryview(p).cast("B")
        while v.nbytes:
            if room == 0:
                frames.append([])
                room = limit
            take = v[:room]
            frames[-1].append(take)
            room -= take.nbytes
            v = v[take.nbytes :]
    return frames


class FramedSocket:
    """One connection's framing, authentication and byte counters."""

    def __init__(
        self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME, max_message: int = DEFAULT_MAX_MESSAGE
    ) -> None:
        self.sock = sock
        self.max_frame = max_frame  # what we accept per frame
        self.peer_max_frame = max_frame  # what the peer accepts (learnt in the handshake)
        self.auth: FrameAuth | None = None
        self.handshake_done = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_sent = 0
        self.frames_received = 0
        self._assembler = MessageAssembler(max_message)
        self._buf = bytearray(64 << 10)
        self._hdr = bytearray(HEADER.size)
        self._rbuf = bytearray(_READ_AHEAD)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        self._tag = bytearray(TAG_LEN)

    def send(self, op: int, flags: int, req_id: int, parts: Sequence[bytes | memoryview]) -> int:
        """One message: a frame, or continuation frames when it exceeds the peer's limit."""
        assert self.auth is not None
        size = msg_size(parts)
        frames: Sequence[Sequence[bytes | memoryview]]
        frames = [list(parts)] if size <= self.peer_max_frame else split_message(parts, self.peer_max_frame)
        n = 0
        for i, fparts in enumerate(frames):
            more = FLAG_MORE if i < len(frames) - 1 else 0
            n += send_all(self.sock, self.auth.seal(op, flags | more, req_id, fparts))
            self.frames_sent += 1
        self.bytes_sent += n
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

    def recv_header(self) -> Header:
        """The next frame's header, checked (size limit first); its payload follows."""
        hview = memoryview(self._hdr)
        self._recv_exact(hview)
        return decode_header(hview, self.max_frame)

    def recv_exact(self, view: memoryview) -> None:
        """Bytes of the current frame's payload, straight into ``view`` (no copy for big ones)."""
        self._recv_exact(view)

    def finish_frame(self, header: Header) -> memoryview:
        """The rest of the frame whose header was just read: payload, then tag and MAC check."""
        if len(self._buf) < header.length:
            self._buf = bytearray(max(header.length, 2 * len(self._buf)))
        elif len(self._buf) > (1 << 20) and header.length < (64 << 10):
            self._buf = bytearray(64 << 10)  # shrink back after a large frame
        payload = memoryview(self._buf)[: header.length]
        self._recv_exact(payload)
        if header.plain:
            if self.handshake_done:
                raise AuthError("unauthenticated frame after the handshake (dropped: it could be forged)")
            if self.auth is not None and header.op != Op.ERROR:
                raise AuthError("unauthenticated frame during the handshake")
            self.bytes_received += HEADER.size + header.length
        else:
            self.verify_tag(header, [payload])
        self.frames_received += 1
        return payload

    def verify_tag(self, header: Header, parts: Sequence[memoryview]) -> None:
        """Receive the frame's tag and check the MAC over the payload ``parts`` as received."""
        if self.auth is None:
            raise ProtocolError("authenticated frame before the handshake")
        tag = memoryview(self._tag)
        self._recv_exact(tag)
        self.auth.verify_parts(memoryview(self._hdr), parts, tag)
        self.bytes_received += HEADER.size + header.length + TAG_LEN

    def recv_verified(self, header: Header, done: Sequence[memoryview], rest: Sequence[memoryview]) -> None:
        """Receive the rest of a frame's payload straight into ``rest`` (its final places), then
        check the MAC over ``done`` (payload bytes read already) and ``rest``."""
        if self.auth is None:
            raise ProtocolError("authenticated frame before the handshake")
        # each piece is hashed as soon as it is in (cache-warm), while the server hashes and sends
        # the next one (see FrameAuth.seal_stream)
        mac = self.auth.verifier(memoryview(self._hdr))  # one thread: see STREAM_PIECE
        for d in done:
            mac.update(d)
        for v in rest:
            v = v.cast("B") if v.format != "B" or v.ndim != 1 else v
            for o in range(0, v.nbytes, STREAM_PIECE):
                piece = v[o : o + STREAM_PIECE]
                self._recv_exact(piece)
                mac.update(piece)
        tag = memoryview(self._tag)
        self._recv_exact(tag)
        self.auth.check(mac, tag)
        self.bytes_received += HEADER.size + header.length + TAG_LEN
        self.frames_received += 1

    def assemble(self, header: Header, payload: memoryview) -> tuple[Header, memoryview] | None:
        return (header, payload) if header.plain else self._assembler.add(header, payload)

    def recv(self) -> tuple[Header, memoryview]:
        """Next message (continuation frames joined); its payload is valid until the next recv()."""
        while True:
            header = self.recv_header()
            got = self.assemble(header, self.finish_frame(header))
            if got is not None:
                return got

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def msg_size(parts: Sequence[bytes | memoryview]) -> int:
    return sum(memoryview(p).nbytes for p in parts)


def raise_error_frame(payload: memoryview) -> None:
    code, message, missing = msg.dec_error(payload)
    cls = ERRORS_BY_CODE.get(code, RdmakvError)
    if cls is MissingChunksError:
        raise MissingChunksError(message, missing.tolist())
    raise cls(message)


def client_handshake(fs: FramedSocket, key: bytes, namespace: str, mac: int = DEFAULT_MAC) -> dict:
    """HELLO exchange, key derivation, then one authenticated AUTH round trip each way."""
    nonce = os.urandom(NONCE_BYTES)
    fs.send_plain(Op.HELLO, 0, 0, msg.enc_hello(nonce, namespace, fingerprint(key), mac))
    header, payload = fs.recv()
    if header.op == Op.ERROR:
        raise_error_frame(payload)
    if header.op != Op.HELLO or not header.flags & FLAG_RESPONSE or not header.plain:
        raise ProtocolError(f"expected HELLO from the server, got opcode {header.op}")
    server_nonce, ns, _, chosen = msg.dec_hello(payload)
    if ns != namespace or chosen not in MAC_NAMES:
        raise ProtocolError("the server's HELLO does not answer ours")
    if chosen != mac:  # a HELLO rewritten on the way (a downgrade): both ends would agree on it
        raise AuthError(f"the server chose the {MAC_NAMES[chosen]} frame MAC, not the {MAC_NAMES.get(mac, mac)} "
                        "this client asked for (a HELLO altered on the way?); refused")  # fmt: skip
    c2s, s2c = derive_session_keys(key, nonce, server_nonce, namespace, chosen)
    fs.auth = FrameAuth(c2s, s2c, chosen)
    fs.send(Op.AUTH, 0, 0, [])
    try:
        header, payload = fs.recv()
    except AuthError as e:
        raise AuthError("server failed to authenticate (it holds a different key)") from e
    if header.op == Op.ERROR:
        raise_error_frame(payload)
    if header.op != Op.AUTH or header.plain:
        raise ProtocolError(f"expected AUTH from the server, got opcode {header.op}")
    info = msg.dec_json(payload)
    fs.handshake_done = True
    info = info if isinstance(info, dict) else {}
    if isinstance(info.get("max_frame"), int) and info["max_frame"] > 0:
        fs.peer_max_frame = min(fs.peer_max_frame, info["max_frame"])
    return info


__all__ = ["FLAG_PLAIN", "FramedSocket", "client_handshake", "raise_error_frame", "send_all", "split_message"]
