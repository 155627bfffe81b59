"""One client connection on the server: its handshake, its frames, its replies.

The event loop (``server``) reads; this object turns bytes into frames (``FrameReader``, with
the HELLO-sized limit until the client has authenticated), answers the two handshake frames
itself, and hands each request to a worker thread, which runs it and sends the reply. While a
request runs the loop does not read the connection, so requests are served in order and a
client that floods is simply not read. Sends are non-blocking with a deadline: a client that
stops reading is dropped instead of holding a worker.

Every request's bytes are charged to the server's in-flight budget (``inflight``) from its
header on; one that does not fit is read and dropped and answered BUSY. A request whose bytes
arrive slower than ``min_frame_rate`` (after ``frame_grace``) ends its connection: the server's
sweep checks ``message_since`` against what has arrived.
"""

from __future__ import annotations

import os
import secrets
import select
import socket
import ssl
import time
from collections.abc import Sequence
from typing import cast

from ...errors import AuthError, BusyError, CodecError, ConnectionLost, ProtocolError, RdmakvError, ServerError
from ...wire import messages as msg
from ...wire.auth import NONCE_BYTES, derive_session_keys
from ...wire.frames import Frame, FrameReader, MessageAssembler
from ...wire.iovec import IOV_MAX, advance, byte_views
from ...wire.keyring import KeyEntry
from ...wire.protocol import (
    FLAG_MORE,
    FLAG_RESPONSE,
    HEADER,
    HELLO_MAX,
    MAC_NAMES,
    OLD_SERVER_MAC_REFUSAL,
    STREAM_MIN,
    FrameAuth,
    Header,
    Op,
    payload_size,
    plain_frame,
)
from ..engine.admission import SaveMustWait
from ..logs import log_safe
from .context import ServerContext
from .handlers import Handlers, Parked
from .inflight import SMALL_FRAME


class Connection:
    HELLO, AUTH, OPEN, CLOSED = "hello", "auth", "open", "closed"

    def __init__(self, server: ServerContext, sock: socket.socket, peer: tuple) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = f"{peer[0]}:{peer[1]}"
        self.source = peer[0]
        self.state = self.HELLO
        self.reader = FrameReader(HELLO_MAX, admit=self._admit)
        self.assembler = MessageAssembler(server.limits.max_message)
        self.frame_charge = 0  # in-flight bytes charged for the frame being received or served
        self.message_charge = 0  # ... and for the parts of a continued message joined so far
        self.refusing: tuple[int, int, RdmakvError] | None = None  # (op, request id, why): a message being dropped
        self.message_since: float | None = None  # when the first byte of the request being received came
        self.message_paused = 0.0  # ... and how long since then a worker held the connection (unread)
        self._busy_at: float | None = None
        self.message_done = 0  # bytes of the frames of a continued request received whole so far
        self.uncounted_in = 0  # bytes of frames received, not yet counted in the namespace's figures
        self.auth: FrameAuth | None = None
        self.handlers: Handlers | None = None
        self.ns = ""
        self.busy = False
        self.wait_until = 0.0  # a parked save's deadline (monotonic): then it is answered BUSY
        self.close_requested = False
        now = time.monotonic()
        self.deadline = now + server.limits.handshake_timeout
        self.last_active = now
        self._entry: KeyEntry | None = None  # the key the client proved, at HELLO
        self.bytes_in = self.bytes_out = 0
        self.tls: ssl.SSLObject | None = None
        self._tls_ready = False
        if server.tls is not None:
            self._tls_in, self._tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = server.tls.wrap_bio(self._tls_in, self._tls_out, server_side=True)

    # -- sending ------------------------------------------------------------------------------
    def _send_all(self, parts: Sequence[bytes | memoryview], timeout: float) -> int:
        if self.tls is not None:
            for p in parts:
                if memoryview(p).nbytes:
                    self.tls.write(p)
            return self._send_raw([self._tls_out.read()], timeout)
        return self._send_raw(parts, timeout)

    def _send_raw(self, parts: Sequence[bytes | memoryview], timeout: float) -> int:
        views = byte_views(parts)
        total = sum(v.nbytes for v in views)
        deadline = time.monotonic() + timeout
        poller = None
        i = 0
        while i < len(views):
            try:
                sent = self.sock.sendmsg(views[i : i + IOV_MAX])
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectionLost(f"{self.peer}: client stopped reading its replies") from None
                if poller is None:
                    poller = select.poll()
                    poller.register(self.fd, select.POLLOUT)
                poller.poll(min(left, 1.0) * 1000)
                continue
            i = advance(views, i, sent)
        self.bytes_out += total
        return total

    def send(self, op: int, req_id: int, parts: Sequence[bytes | memoryview], timeout: float | None = None) -> int:
        """One authenticated reply, cut into continuation frames when it exceeds the frame limit."""
        assert self.auth is not None
        limit = self.server.limits.max_frame
        timeout = timeout if timeout is not None else self.server.limits.send_timeout
        size = sum(memoryview(p).nbytes for p in parts)
        if size <= limit:
            return self._send_frame(op, FLAG_RESPONSE, req_id, parts, size, timeout)
        from fallback_tcp.framed import split_message  # the one splitter both ends share

        frames = split_message(parts, limit)
        n = 0
        for i, fparts in enumerate(frames):
            more = FLAG_MORE if i < len(frames) - 1 else 0
            n += self._send_frame(op, FLAG_RESPONSE | more, req_id, fparts, payload_size(fparts), timeout)
        return n

    def _send_frame(self, op: int, flags: int, req_id: int, parts: Sequence[bytes | memoryview], size: int,
                    timeout: float) -> int:  # fmt: skip
        """One sealed frame. A large one leaves as it is hashed (``seal_stream``): the client
        receives and checks piece n while piece n+1 is hashed here."""
        assert self.auth is not None
        if size < STREAM_MIN or self.tls is not None:
            return self._send_all(self.auth.seal(op, flags, req_id, parts), timeout)
        deadline = time.monotonic() + timeout  # one deadline for the frame, as for a sealed one
        return sum(self._send_raw(group, max(deadline - time.monotonic(), 0.0))
                   for group in self.auth.seal_stream(op, flags, req_id, parts))  # fmt: skip

    def send_error(self, e: RdmakvError, req_id: int = 0, timeout: float = 1.0) -> None:
        """Tell the client why; sealed once keys exist (after that nothing plain is believed).
        Request id 0 says the error is about the whole connection, which then closes."""
        body = msg.enc_error(e.code, str(e), getattr(e, "missing", None))
        try:
            if self.auth is not None and self.state != self.AUTH:
                self.send(Op.ERROR, req_id, [body], timeout=timeout)
            else:
                self._send_all([plain_frame(Op.ERROR, FLAG_RESPONSE, req_id, body)], timeout)
        except (OSError, RdmakvError):
            pass

    def internal_error(self, e: BaseException, where: str) -> ServerError:
        """A bug met serving this connection: counted, and logged under an id with its detail
        (which may name paths, keys or internals); the client is told only the id."""
        self.server.internal_errors += 1
        error_id = secrets.token_hex(4)
        self.server.say(f"rdmakv: {self.peer}: internal error {error_id} {where}: {e!r}")
        return ServerError(f"internal error (id {error_id})")

    # -- the in-flight budget and the byte-rate floor -------------------------------------------
    def _admit(self, h: Header) -> None:
        """(FrameReader, on each authenticated header) Charge the frame to the in-flight budget
        before its payload is buffered; BusyError or TooLargeError refuse it (it is dropped)."""
        if self.refusing is not None and (h.op, h.req_id) == self.refusing[:2]:
            raise self.refusing[2]  # the rest of a refused continued message is dropped too
        continued = bool(h.flags & FLAG_MORE) or self.assembler.pending
        if self.state != self.OPEN or h.length <= SMALL_FRAME and not continued:
            return
        self.server.inflight.take(h.length, self.message_charge if continued else 0)
        self.frame_charge = h.length

    def _release_frame(self) -> None:
        self.server.inflight.give(self.frame_charge)
        self.frame_charge = 0

    def _release_message(self) -> None:
        self.assembler.drop()
        self.server.inflight.give(self.message_charge)
        self.message_charge = 0

    def received_so_far(self) -> int:
        """Bytes of the request being received: the parts of a continued message and the frame
        under way (for the byte-rate floor)."""
        p = self.reader.partial()
        return self.message_done + (p[0] if p is not None else 0)

    def too_slow(self, now: float) -> str | None:
        """Why the request under way must end its connection, if its bytes arrive slower than
        min_frame_rate once frame_grace is over (a slow drip holds a buffer and a share of the
        in-flight budget, and idle timeouts never fire for it); else None."""
        lim = self.server.limits
        since = self.message_since
        if not lim.min_frame_rate or since is None or now - since <= lim.frame_grace:
            return None
        # while a worker holds the connection nobody reads it: that time is the server's, not the
        # client's (a server short of CPU must not blame its clients for its own slowness)
        waited = now - since - self.message_paused
        if waited <= lim.frame_grace:
            return None
        got = self.received_so_far()
        if got >= lim.min_frame_rate * (waited - lim.frame_grace):
            return None
        return (f"request bytes arrive too slowly ({got} bytes in {waited:.1f} s of reading; the floor is "
                f"{lim.min_frame_rate} bytes/s after {lim.frame_grace:g} s): connection closed")  # fmt: skip

    def to_worker(self) -> None:
        """(event loop) A frame is in: a worker has the connection, nobody reads it meanwhile."""
        self.busy = True
        self._busy_at = time.monotonic()

    def from_worker(self) -> None:
        """The worker is done with the connection: reading resumes, and the time it held the
        connection does not count against a request still arriving."""
        self.busy = False
        if self._busy_at is not None and self.message_since is not None:
            self.message_paused += time.monotonic() - self._busy_at
        self._busy_at = None

    def _note_progress(self) -> None:
        """(owner thread, between frames) Start the request clock when a request's first bytes are
        in, stop it when no request is under way."""
        if self.state != self.OPEN:
            return
        if self.reader.partial() is None and not self.message_done:
            self.message_since = None
        elif self.message_since is None:
            self.message_since = time.monotonic()
            self.message_paused = 0.0

    # -- reading (event loop thread) ----------------------------------------------------------
    def on_readable(self) -> bool:
        """Read what the socket has; False when the connection is to be closed. When a whole
        request is in, the connection is handed to a worker (``busy``)."""
        if self.tls is not None:
            return self._tls_readable()
        try:
            n = self.sock.recv_into(self.reader.buffer())
        except BlockingIOError:
            return True
        except OSError:
            return False
        if n == 0:
            return False
        self.reader.received(n)
        self.bytes_in += n
        self.last_active = time.monotonic()
        return self.process()

    def _tls_readable(self) -> bool:
        """TLS: ciphertext from the socket into the TLS object, plaintext from it into the reader."""
        try:
            raw = self.sock.recv(min(self.reader.wanted() + 1024, 1 << 20))
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not raw:
            return False
        self._tls_in.write(raw)
        self.bytes_in += len(raw)
        self.last_active = time.monotonic()
        tls = self.tls
        assert tls is not None  # (only called with TLS)
        try:
            if not self._tls_ready:
                tls.do_handshake()
                self._tls_ready = True
            while True:
                n = cast(int, tls.read(self.reader.wanted(), self.reader.buffer()))  # (into a buffer: a count)
                if n == 0:
                    return False
                self.reader.received(n)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as e:
            self.server.say(f"rdmakv: {self.peer}: TLS failed: {e.reason or e}")
            return False
        finally:
            pending = self._tls_out.read()
            if pending:
                try:
                    self._send_raw([pending], 1.0)
                except (OSError, RdmakvError):
                    return False
        return self.process()

    def process(self) -> bool:
        """Handle buffered frames: handshake frames here, a request by a worker."""
        while True:
            try:
                frame = self.reader.next_frame()
            except RdmakvError as e:
                self.server.say(f"rdmakv: {self.peer} ns={log_safe(self.ns)}: closing: {e}")
                if self.state != self.OPEN:
                    self.server.auth_failures += 1
                self.send_error(e)
                return False
            if frame is None:
                self._note_progress()
                return True
            if self.state == self.OPEN:
                self.to_worker()
                self.server.submit(self, frame)
                return True
            try:
                self._handshake(frame.header, frame.payload)
            except RdmakvError as e:
                self.server.say(f"rdmakv: {self.peer}: handshake failed: {e}")
                self.server.auth_failures += 1
                self.send_error(e)
                return False

    def _handshake(self, h: Header, payload: memoryview) -> None:
        if self.state == self.HELLO:
            if h.op != Op.HELLO or not h.plain:
                raise ProtocolError(f"expected HELLO, got opcode {h.op}")
            client_nonce, ns, fp, mac = msg.dec_hello(payload)
            if mac not in MAC_NAMES:
                raise ProtocolError(f"{OLD_SERVER_MAC_REFUSAL} {mac} (this server knows "
                                    f"{', '.join(f'{k} {v}' for k, v in MAC_NAMES.items())})")  # fmt: skip
            entry = self.server.keyring.select(fp, ns)
            chosen = mac
            nonce = os.urandom(NONCE_BYTES)
            hello = msg.enc_hello(nonce, ns, bytes(16), chosen)
            self._send_all([plain_frame(Op.HELLO, FLAG_RESPONSE, h.req_id, hello)], 1.0)
            c2s, s2c = derive_session_keys(entry.key, client_nonce, nonce, ns, chosen)
            self.auth = FrameAuth(s2c, c2s, chosen)
            self.reader.auth = self.auth
            self.ns, self._entry = ns, entry
            self.state = self.AUTH
            return
        # AUTH: the first authenticated frame; the reader has checked its MAC
        if h.op != Op.AUTH or h.plain:
            raise ProtocolError(f"expected AUTH, got opcode {h.op}")
        assert self._entry is not None  # (set at HELLO)
        self.handlers = Handlers(self.server, self.ns, self._entry, self.server.single_key)
        self.state = self.OPEN
        self.reader.max_frame = self.server.limits.max_frame
        self.send(Op.AUTH, h.req_id, [msg.enc_json(self.handlers.info())], timeout=5.0)

    # -- requests (worker thread) -------------------------------------------------------------
    def serve(self, frame: Frame) -> bool | Parked:
        """Run one request (or take one more frame of a continued one) and reply; then any
        request already buffered. False when the connection must close; Parked when a request
        must wait for room (nothing more is read until it has run)."""
        assert self.handlers is not None
        while True:
            h = frame.header
            self.uncounted_in += HEADER.size + h.length  # the frame as it came (tag included)
            self.message_done = self.message_done + HEADER.size + h.length if h.flags & FLAG_MORE else 0
            if frame.refused is not None:
                self._refuse(h, frame.refused)
            else:
                took = self._take(frame)
                if took is not True:
                    return took
            nxt = self._next()
            if not isinstance(nxt, Frame):
                return nxt
            frame = nxt

    def resume(self, parked: Parked) -> bool | Parked:
        """Run a parked request again; then go on as ``serve`` does."""
        ran = self._finish(parked.header, parked.payload)
        if ran is not True:
            return ran
        nxt = self._next()
        return self.serve(nxt) if isinstance(nxt, Frame) else nxt

    def _next(self) -> Frame | bool:
        """The next buffered frame, True when there is none (the loop reads on), False to close."""
        try:
            frame = self.reader.next_frame()
        except RdmakvError as e:
            self.server.say(f"rdmakv: {self.peer} ns={log_safe(self.ns)}: closing: {e}")
            self.send_error(e)
            return False
        if frame is None:
            self._note_progress()
            return True
        return frame

    def _take(self, frame: Frame) -> bool | Parked:
        """One frame in: joined to its message, and the message run once whole."""
        h = frame.header
        # a large frame that starts a message keeps its buffer: the message's first part is not copied
        owned = self.reader.detach(frame) if h.flags & FLAG_MORE and not self.assembler.pending else None
        payload = frame.payload
        try:
            whole = self.assembler.add(h, payload, owned)
        except RdmakvError as e:
            self.send_error(e, h.req_id)
            return False
        if whole is None or whole[1] is not payload:  # copied into the message: its charge moves there
            self.message_charge += self.frame_charge
            self.frame_charge = 0
        if whole is None:
            return True
        self.message_since = None
        return self._finish(*whole)

    def _finish(self, h: Header, payload: memoryview) -> bool | Parked:
        """Run a whole message; its buffers (and their in-flight charge) go once it has run. A
        parked one keeps them: its payload is the request it will run again."""
        try:
            ran = self._run(h, payload)
        except BaseException:
            self._release_frame()
            self._release_message()
            raise
        if not isinstance(ran, Parked):
            self._release_frame()
            self._release_message()
        return ran

    def _count(self, counter: str, n: int) -> None:
        """Traffic is counted in the namespace once it holds something (a namespace is not made
        for the traffic of one that is only read)."""
        ns = self.server.engine.namespaces.get(self.ns)
        if ns is not None:
            ns.counters[counter] += n

    def _refuse(self, h: Header, why: RdmakvError) -> None:
        """A frame the in-flight budget refused (read and dropped): the request is answered BUSY
        (or too large) at once, and the rest of its message is dropped as it comes."""
        first = self.refusing is None or self.refusing[:2] != (h.op, h.req_id)
        self._release_message()
        self.refusing = (h.op, h.req_id, why) if h.flags & FLAG_MORE else None
        if not self.refusing:
            self.message_since = None
        if first:
            self.send_error(why, h.req_id)

    def _run(self, h: Header, payload: memoryview) -> bool | Parked:
        assert self.handlers is not None
        reply = None
        try:
            reply = self.handlers.dispatch(h.op, payload)
            op, parts = h.op, reply.parts
            self.wait_until = 0.0
        except SaveMustWait as e:
            now = time.monotonic()
            if not self.wait_until:
                self.wait_until = now + self.server.limits.admission_wait
            if now < self.wait_until:
                return Parked(h, payload)  # retried as room frees; the client waits for its reply
            self.wait_until = 0.0
            waited = self.server.limits.admission_wait
            op, parts = Op.ERROR, [msg.enc_error(e.code, f"{e} (waited {waited:g} s for room)")]
        except (CodecError, ProtocolError) as e:
            op, parts = Op.ERROR, [msg.enc_error(e.code, str(e))]
        except RdmakvError as e:
            self.wait_until = 0.0
            op, parts = Op.ERROR, [msg.enc_error(e.code, str(e), getattr(e, "missing", None))]
        except Exception as e:  # noqa: BLE001 - a bug must not end the server; it is counted and logged
            bug = self.internal_error(e, f"on op {h.op}")
            op, parts = Op.ERROR, [msg.enc_error(bug.code, str(bug))]
        try:
            sent = self.send(op, h.req_id, parts)
            if reply is not None and reply.then is not None:  # e.g. a restore's chunks after its manifest
                sent += self.send(reply.then[0], h.req_id, reply.then[1].parts)
        except (OSError, RdmakvError):
            return False
        else:
            self._count("bytes_sent", sent)
            self._count("bytes_received", self.uncounted_in)  # (after the request: its first write makes it)
            self.uncounted_in = 0
        finally:
            if reply is not None:
                reply.done()
        return True

    def close(self) -> None:
        if self.state == self.CLOSED:
            return
        self.state = self.CLOSED
        self._release_frame()
        self._release_message()
        if self.handlers is not None:
            self.handlers.close()
        try:
            self.sock.close()
        except OSError:
            pass


def refuse(sock: socket.socket, reason: str) -> None:
    """Tell a connection we will not serve why, without reading anything from it."""
    try:
        sock.setblocking(False)
        sock.send(plain_frame(Op.ERROR, FLAG_RESPONSE, 0, msg.enc_error(BusyError.code, reason)))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


__all__ = ["AuthError", "Connection", "Parked", "refuse"]
