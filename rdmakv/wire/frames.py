"""Incremental frame parsing (sans-IO): bytes in as they arrive, whole verified frames out.

The server's event loop feeds whatever a non-blocking socket gave it; ``FrameReader`` says how
many more bytes the current frame needs, checks each header (size limit first) before a byte
of its payload is buffered, verifies the MAC once the frame is whole, and never holds more
than one frame plus a small read-ahead. After a large frame its buffer shrinks back, so an
idle connection costs a few KiB however big its last request was.

A message larger than one frame travels as several frames with ``FLAG_MORE`` on all but the
last (same op and request id); ``MessageAssembler`` joins them up to a limit checked before
each part is copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import AuthError, ProtocolError, TooLargeError
from .protocol import FLAG_MORE, HEADER, TAG_LEN, FrameAuth, Header, Op, decode_header

SMALL_BUFFER = 4 << 10  # what an idle connection keeps
READ_AHEAD = 64 << 10  # bytes asked of the socket beyond the current frame, at most
READ_STEP = 1 << 20  # a large frame's buffer grows by what arrives, at most this per read


@dataclass(slots=True)
class Frame:
    header: Header
    payload: memoryview  # valid until the reader is fed again


class FrameReader:
    def __init__(self, max_frame: int, auth: FrameAuth | None = None) -> None:
        self.max_frame = max_frame
        self.auth = auth
        self._buf = bytearray(SMALL_BUFFER)
        self._start = 0  # first unconsumed byte
        self._end = 0  # end of valid data
        self._header: Header | None = None

    @property
    def buffered(self) -> int:
        return self._end - self._start

    @property
    def capacity(self) -> int:
        return len(self._buf)

    def _frame_size(self) -> int:
        if self._header is None:
            return HEADER.size
        return HEADER.size + self._header.length + (0 if self._header.plain else TAG_LEN)

    def wanted(self) -> int:
        """Bytes to ask the socket for now: the rest of the current frame (a step of it at a time,
        so a header's claim alone allocates nothing), plus a little read-ahead for small frames."""
        need = max(1, self._frame_size() - self.buffered)
        if need >= READ_AHEAD:
            return min(need, READ_STEP)
        return need + min(READ_AHEAD, SMALL_BUFFER)

    def buffer(self) -> memoryview:
        """A writable view to receive into (``recv_into``), at least ``wanted()`` bytes long."""
        want = self.wanted()
        if len(self._buf) - self._end < want:
            self._compact(want)
        return memoryview(self._buf)[self._end : self._end + want]

    def received(self, n: int) -> None:
        """``n`` bytes were written into the view ``buffer()`` returned."""
        self._end += n

    def feed(self, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        while data.nbytes:
            view = self.buffer()
            n = min(view.nbytes, data.nbytes)
            view[:n] = data[:n]
            self.received(n)
            data = data[n:]

    def _compact(self, want: int) -> None:
        live = self.buffered
        size = len(self._buf)
        if live + want > size:
            # grow geometrically (amortised copies), never past what the frame needs
            size = max(live + want, min(2 * size, self._frame_size() + SMALL_BUFFER), SMALL_BUFFER)
        if size != len(self._buf) or self._start:
            new = bytearray(size)
            new[:live] = self._buf[self._start : self._end]
            self._buf = new
            self._start, self._end = 0, live

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive. Raises ProtocolError,
        TooLargeError or AuthError for a frame that must end the connection."""
        if self._header is None:
            if self.buffered < HEADER.size:
                self._maybe_shrink()
                return None
            self._header = decode_header(memoryview(self._buf)[self._start : self._start + HEADER.size], self.max_frame)
        h = self._header
        size = self._frame_size()
        if self.buffered < size:
            return None
        base = self._start
        view = memoryview(self._buf)
        payload = view[base + HEADER.size : base + HEADER.size + h.length]
        if h.plain:
            if self.auth is not None and h.op != Op.ERROR:
                raise AuthError("unauthenticated frame after the handshake")
        else:
            if self.auth is None:
                raise ProtocolError("authenticated frame before the handshake")
            self.auth.verify(view[base : base + HEADER.size], payload, view[base + size - TAG_LEN : base + size])
        self._start += size
        self._header = None
        return Frame(h, payload)

    def _maybe_shrink(self) -> None:
        """Called between frames: give back a large buffer once nothing big is pending."""
        if len(self._buf) > SMALL_BUFFER and self.buffered <= SMALL_BUFFER // 2:
            live = bytes(self._buf[self._start : self._end])
            self._buf = bytearray(SMALL_BUFFER)
            self._buf[: len(live)] = live
            self._start, self._end = 0, len(live)

    def frames(self) -> Iterator[Frame]:
        while (f := self.next_frame()) is not None:
            yield f


class MessageAssembler:
    """Joins FLAG_MORE frames into one message of at most ``max_message`` bytes."""

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._parts: bytearray | None = None
        self._first: Header | None = None

    @property
    def pending(self) -> bool:
        return self._first is not None

    def add(self, h: Header, payload: memoryview) -> tuple[Header, memoryview] | None:
        """The whole message once its last frame arrived; None while parts are pending."""
        if self._first is None:
            if not h.flags & FLAG_MORE:
                return h, payload  # the common case: one frame, no copy
            self._first = h
            self._parts = bytearray()
        elif h.op != self._first.op or h.req_id != self._first.req_id:
            raise ProtocolError(f"frame of request {h.req_id} (op {h.op}) inside a continued message of "
                                f"request {self._first.req_id}")  # fmt: skip
        assert self._parts is not None
        if len(self._parts) + h.length > self.max_message:
            raise TooLargeError(f"continued message exceeds the limit of {self.max_message} bytes")
        self._parts += payload
        if h.flags & FLAG_MORE:
            return None
        first, parts = self._first, self._parts
        self._first, self._parts = None, None
        return Header(first.op, first.flags & ~FLAG_MORE, first.req_id, len(parts)), memoryview(parts)
