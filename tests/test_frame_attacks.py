"""What an on-path party or a misbehaving peer can do to a session's frames, each against a real
server process through a small frame-aware relay in the test: a plaintext frame slipped toward
the server after AUTH, HELLO's MAC byte rewritten (a downgrade, or an id nobody knows), a
request trickled in a byte at a time; and a reply that answers another request."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

import rdmakv
from fallback_tcp.framed import FramedSocket
from fallback_tcp.transport import TcpChannel
from rdmakv import kvgen
from rdmakv.errors import AuthError, ConnectionLost, NotFoundError, ProtocolError
from rdmakv.kvgen import ModelShape
from rdmakv.wire import messages as msg
from rdmakv.wire.auth import derive_session_keys, parse_key
from rdmakv.wire.protocol import FLAG_PLAIN, FLAG_RESPONSE, HEADER, MAC_BLAKE3, TAG_LEN, FrameAuth, Op, plain_frame

from .conftest import KEY_HEX

SHAPE = ModelShape("atk", 2, 64, 64)

# (index of the client's frame, its bytes) -> the bytes to pass on in its place
Rewrite = Callable[[int, bytes], bytes]


class FrameRelay:
    """A TCP relay between one client and the server that cuts the client's stream into frames
    (so a test can rewrite one, or add one after it) and can pass the client's bytes on slowly
    once the handshake is through. When the server hangs up, the client gets the server's last
    bytes and then end-of-stream, while what it still sends is read and dropped."""

    def __init__(self, port: int, rewrite: Rewrite | None = None, drip: tuple[int, float] | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = port
        self.rewrite = rewrite
        self.drip = drip  # (bytes, seconds): after the two handshake frames, this many bytes per tick
        threading.Thread(target=self._run, daemon=True).start()

    def url(self, ns: str) -> str:
        return f"rdmakv://127.0.0.1:{self.port}/{ns}"

    def _run(self) -> None:
        c, _ = self.listener.accept()
        s = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._client_to_server, args=(c, s), daemon=True).start()
        try:
            while data := s.recv(65536):
                c.sendall(data)
        except OSError:
            pass
        try:
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _client_to_server(self, c: socket.socket, s: socket.socket) -> None:
        buf = b""
        n = 0
        try:
            while data := c.recv(65536):
                buf += data
                while len(buf) >= HEADER.size and (n < 2 or self.drip is None):
                    _, _, _, flags, _, length = HEADER.unpack(buf[: HEADER.size])
                    size = HEADER.size + length + (0 if flags & FLAG_PLAIN else TAG_LEN)
                    if len(buf) < size:
                        break
                    frame, buf = buf[:size], buf[size:]
                    s.sendall(self.rewrite(n, frame) if self.rewrite else frame)
                    n += 1
                if n >= 2 and self.drip is not None and buf:
                    step, tick = self.drip
                    while buf:
                        s.sendall(buf[:step])
                        buf = buf[step:]
                        time.sleep(tick)
        except OSError:
            pass


def _kv(seed: int, n: int = 64) -> rdmakv.KVState:
    return kvgen.generate(kvgen.token_stream(seed, n), SHAPE)


def _log_has(server, text: str, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in server.log):
            return True
        time.sleep(0.05)
    return False


def test_a_plaintext_frame_slipped_toward_the_server_after_auth_ends_the_connection(server, ns):
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        st.save("real", _kv(1))
    forged = plain_frame(Op.ERROR, FLAG_RESPONSE, 1, msg.enc_error(7, "no manifest named 'real'"))

    def inject_after_auth(i: int, frame: bytes) -> bytes:
        return frame + forged if i == 1 else frame  # frame 1 is the client's AUTH

    relay = FrameRelay(server.port, inject_after_auth)
    with rdmakv.connect(relay.url(ns), key=KEY_HEX, transport="tcp") as st:
        # the server closed the connection on the forged frame and said why (a MAC'd error with
        # request id 0: about the whole connection); the client raises that, and no reply of
        # the server's to the forged frame ("unknown opcode 127") is taken for the restore's
        with pytest.raises(AuthError, match=r"unauthenticated frame \(opcode 127\) after the handshake"):
            st.restore("real")
        with pytest.raises(AuthError, match="unauthenticated frame"):  # closed, not out of step
            st.list()
    assert _log_has(server, "unauthenticated frame (opcode 127)")
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        assert st.restore("real").equals(_kv(1))


def _set_mac(mac: int) -> Rewrite:
    def rewrite(i: int, frame: bytes) -> bytes:
        return frame[:-1] + bytes([mac]) if i == 0 else frame  # HELLO's last byte: the MAC it asks for

    return rewrite


def test_a_hello_rewritten_to_downgrade_the_mac_is_refused_by_the_client(server, ns):
    relay = FrameRelay(server.port, _set_mac(1))  # blake3 (2) asked for, hmac-sha256 (1) delivered
    with pytest.raises(AuthError, match="chose the hmac-sha256 frame MAC, not the blake3"):
        rdmakv.connect(relay.url(ns), key=KEY_HEX, transport="tcp", mac="blake3")
    relay = FrameRelay(server.port, _set_mac(1))  # asked for hmac-sha256 itself: nothing altered
    with rdmakv.connect(relay.url(ns), key=KEY_HEX, transport="tcp", mac="hmac-sha256") as st:
        st.save("ok", _kv(2))


def test_an_unknown_mac_id_is_refused_by_the_server(server, ns):
    relay = FrameRelay(server.port, _set_mac(7))
    with pytest.raises(ProtocolError, match="unknown frame MAC algorithm id 7"):
        rdmakv.connect(relay.url(ns), key=KEY_HEX, transport="tcp", mac="blake3")  # (no Poly1305 fallback)


def test_a_request_trickled_in_is_dropped_with_its_connection(fresh_server, ns):
    srv = fresh_server("64MiB", "--idle-timeout", "2")  # bytes keep coming: the idle timeout never fires
    relay = FrameRelay(srv.port, drip=(64, 0.05))  # ~1.3 KB/s once authenticated
    t0 = time.monotonic()
    with rdmakv.connect(relay.url(ns), key=KEY_HEX, transport="tcp", timeout=15) as st:
        with pytest.raises((ProtocolError, ConnectionLost)):
            st.save("slow", _kv(3, 512))  # 256 KiB of chunks: minutes at this rate
    took = time.monotonic() - t0
    assert took < 6, took  # the floor (1 MiB/s after 2 s) ends it, not the client's timeout
    assert _log_has(srv, "request bytes arrive too slowly")
    with rdmakv.connect(srv.url(ns), key=KEY_HEX, transport="tcp") as st:  # the server serves on
        st.save("fast", _kv(4))
        assert st.stats()["store"]["slow_requests_closed"] == 1


def test_a_reply_that_answers_another_request_is_never_acted_on(ns):
    """The client checks a reply's request id before anything in it, errors included. A real
    server cannot be made to send such a reply (it refuses injected frames), so the peer here
    is a scripted one speaking the real handshake and MAC: it answers the first request with an
    authenticated NOT_FOUND error naming another request."""
    key = parse_key(KEY_HEX)
    listener = socket.create_server(("127.0.0.1", 0))

    def peer() -> None:
        conn, _ = listener.accept()
        fs = FramedSocket(conn)
        _, hello = fs.recv()
        client_nonce, space, _, mac = msg.dec_hello(hello)
        nonce = os.urandom(32)
        fs.send_plain(Op.HELLO, FLAG_RESPONSE, 0, msg.enc_hello(nonce, space, bytes(16), mac))
        c2s, s2c = derive_session_keys(key, client_nonce, nonce, space, mac)
        fs.auth = FrameAuth(s2c, c2s, mac)
        fs.recv()  # AUTH
        fs.send(Op.AUTH, FLAG_RESPONSE, 0, [msg.enc_json({"server": "rdmakv", "max_frame": 1 << 20})])
        fs.handshake_done = True
        header, _ = fs.recv()
        fs.send(Op.ERROR, FLAG_RESPONSE, header.req_id + 7, [msg.enc_error(7, "no manifest named 'x'")])
        time.sleep(1)
        fs.close()

    threading.Thread(target=peer, daemon=True).start()
    ch = TcpChannel("127.0.0.1", listener.getsockname()[1], ns, key, mac=MAC_BLAKE3, timeout=5)
    with pytest.raises(ProtocolError, match="does not answer request 1") as e:
        ch.get_manifest("x")
    assert not isinstance(e.value, NotFoundError)
    with pytest.raises(ProtocolError, match="out of step and was closed"):
        ch.stats()  # the connection is closed, never read out of step
    ch.close()
