"""Incremental frame parsing (sans-IO): bytes in as they arrive, whole verified frames out.

The server's event loop feeds whatever a non-blocking socket gave it; ``FrameReader`` says how
many more bytes the current frame needs, checks each header (size limit first) before a byte
of its payload is buffered, verifies the MAC once the frame is whole, and never holds more
than one frame plus a small read-ahead. After a large frame its buffer shrinks back, so an
idle connection costs a few KiB however big its last request was.

A frame the caller's ``admit`` hook refuses (the server's budget for bytes in flight is spent)
is not buffered: its payload is read and dropped as it arrives, its MAC checked over it on the
way, and it comes out as a ``Frame`` with an empty payload and ``refused`` set, so the server can
answer that request BUSY and keep the connection.

A message larger than one frame travels as several frames with ``FLAG_MORE`` on all but the
last (same op and request id); ``MessageAssembler`` joins them up to a limit checked before
each part is copied.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import AuthError, BusyError, ProtocolError, RdmakvError, TooLargeError
from .protocol import FLAG_MORE, HEADER, TAG_LEN, FrameAuth, FrameMac, Header, decode_header

SMALL_BUFFER = 4 << 10  # what an idle connection keeps
READ_AHEAD = 64 << 10  # bytes asked of the socket beyond the current frame, at most
READ_STEP = 1 << 20  # a large frame's buffer grows by what arrives, at most this per read
BIG_FRAME = 1 << 20  # a frame this large is received into a buffer of its own (see FrameReader)


def anonymous(size: int) -> mmap.mmap:
    """Private anonymous memory: pages backed only once written, grown in place by ``resize``
    (a shared anonymous mapping, mmap's default, cannot grow: its pages past the old end fault)."""
    return mmap.mmap(-1, max(1, size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


@dataclass(slots=True)
class Frame:
    header: Header
    payload: memoryview  # valid until the reader is fed again
    refused: RdmakvError | None = None  # read and dropped (payload empty): answer the request with this


def _unshared(buf: bytearray) -> bool:
    """Whether no view of ``buf`` is alive (the payload of a frame handed out earlier, still in
    use), so that its bytes may be moved. A bytearray with views refuses any change of size: pop
    one byte and put it back (O(1): no copy, no allocation)."""
    try:
        buf.append(buf.pop())
    except BufferError:
        return False
    return True


class FrameReader:
    """``admit``, when set, sees every authenticated header once it is checked and before a
    byte of its payload is buffered; raising BusyError or TooLargeError refuses the frame (it is
    read and dropped), any other error ends the connection.

    A frame of BIG_FRAME bytes or more is received into a buffer of its own, an anonymous
    mapping of its size: pages are only backed as bytes arrive (a header's claim alone costs
    nothing), it never grows by copying, and it goes back to the system when the last view of
    its payload is gone. Smaller frames share one buffer that grows and shrinks back."""

    def __init__(self, max_frame: int, auth: FrameAuth | None = None,
                 admit: Callable[[Header], None] | None = None) -> None:  # fmt: skip
        self.max_frame = max_frame
        self.auth = auth
        self.admit = admit
        self._buf = bytearray(SMALL_BUFFER)
        self._start = 0  # first unconsumed byte
        self._end = 0  # end of valid data
        self._header: Header | None = None
        self._big: mmap.mmap | None = None  # the current large frame's own buffer (header, payload, tag)
        self._big_got = 0  # bytes of it received
        self._handed: tuple[Frame, mmap.mmap] | None = None  # the last large frame returned, and its buffer
        self._refused: RdmakvError | None = None  # the current frame is being read and dropped
        self._skip_mac: FrameMac | None = None  # its MAC, fed the dropped payload as it arrives
        self._skipped = 0  # payload bytes of it dropped so far

    @property
    def buffered(self) -> int:
        return self._end - self._start

    @property
    def capacity(self) -> int:
        return len(self._buf)

    def partial(self) -> tuple[int, int] | None:
        """(bytes of the frame being received, its whole size, or the header's size while the
        header itself is incomplete); None when no byte of a next frame is buffered."""
        if self._big is not None:
            return self._big_got, len(self._big)
        if self._header is None and not self.buffered:
            return None
        if self._refused is not None:
            assert self._header is not None
            size = HEADER.size + self._header.length + TAG_LEN
            return min(HEADER.size + self._skipped + self.buffered, size), size
        size = self._frame_size()
        return min(self.buffered, size), size

    def _frame_size(self) -> int:
        if self._header is None:
            return HEADER.size
        if self._refused is not None:  # what is still buffered of it: the rest of its payload and its tag
            return self._header.length - self._skipped + TAG_LEN
        return HEADER.size + self._header.length + (0 if self._header.plain else TAG_LEN)

    def wanted(self) -> int:
        """Bytes to ask the socket for now: the rest of the current frame (a step of it at a time),
        plus a little read-ahead for small frames. A refused frame is dropped as it comes, a
        read-ahead's worth at a time."""
        if self._filling_big():
            assert self._big is not None
            return min(len(self._big) - self._big_got, READ_STEP)
        if self._big is not None:  # whole, not yet taken out: what comes next is the next frame's
            return HEADER.size + SMALL_BUFFER
        need = max(1, self._frame_size() - self.buffered)
        if self._refused is not None:
            return min(need, READ_AHEAD)
        if need >= READ_STEP:
            return READ_STEP
        # with the start of the next frame: back-to-back frames (a save's PUT_CHUNKS) then reuse
        # this buffer instead of shrinking it and growing it again for each one
        return need + min(READ_AHEAD, SMALL_BUFFER)

    def buffer(self) -> memoryview:
        """A writable view to receive into (``recv_into``), at least ``wanted()`` bytes long."""
        want = self.wanted()
        if self._filling_big():
            assert self._big is not None
            return memoryview(self._big)[self._big_got : self._big_got + want]
        if len(self._buf) - self._end < want:
            self._compact(want)
        return memoryview(self._buf)[self._end : self._end + want]

    def received(self, n: int) -> None:
        """``n`` bytes were written into the view ``buffer()`` returned."""
        if self._filling_big():
            self._big_got += n
        else:
            self._end += n

    def _filling_big(self) -> bool:
        return self._big is not None and self._big_got < len(self._big)

    def feed(self, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        while data.nbytes:
            view = self.buffer()
            n = min(view.nbytes, data.nbytes)
            view[:n] = data[:n]
            view.release()
            self.received(n)
            data = data[n:]

    def _compact(self, want: int) -> None:
        live = self.buffered
        size = len(self._buf)
        if live + want > size:
            # grow geometrically (amortised copies), never past what the frame needs
            size = max(live + want, min(2 * size, self._frame_size() + SMALL_BUFFER), SMALL_BUFFER)
        if size == len(self._buf) and self._start and _unshared(self._buf):
            view = memoryview(self._buf)  # room enough: move the live bytes to the front, no allocation
            view[:live] = view[self._start : self._end]  # (memoryview copies overlapping bytes safely)
            view.release()
            self._start, self._end = 0, live
        elif size != len(self._buf) or self._start:
            new = bytearray(size)
            new[:live] = memoryview(self._buf)[self._start : self._end]  # (a slice of the bytearray would copy)
            self._buf = new
            self._start, self._end = 0, live

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive. Raises ProtocolError,
        TooLargeError or AuthError for a frame that must end the connection."""
        self._handed = None
        if self._header is None:
            if self.buffered < HEADER.size:
                self._maybe_shrink()
                return None
            self._begin()
        h = self._header
        assert h is not None
        if self._big is not None:
            return self._big_frame(h)
        if self._refused is not None:
            return self._drop(h)
        size = self._frame_size()
        if self.buffered < size:
            return None
        base = self._start
        view = memoryview(self._buf)
        payload = view[base + HEADER.size : base + HEADER.size + h.length]
        if not h.plain:  # (which kind of frame may come was checked on the header)
            assert self.auth is not None
            self.auth.verify(view[base : base + HEADER.size], payload, view[base + size - TAG_LEN : base + size])
        self._start += size
        self._header = None
        return Frame(h, payload)

    def _begin(self) -> None:
        """Check the next frame's header (buffered whole), admit or refuse it; a large admitted
        frame moves to a buffer of its own size (backed only as it fills)."""
        h = decode_header(memoryview(self._buf)[self._start : self._start + HEADER.size], self.max_frame)
        if h.plain and self.auth is not None:  # a peer that has keys never sends plaintext: injected
            raise AuthError(f"unauthenticated frame (opcode {h.op}) after the handshake: refused, connection "
                            "closed")  # fmt: skip
        if not h.plain and self.auth is None:
            raise ProtocolError("authenticated frame before the handshake")
        if self.admit is not None and self.auth is not None:
            try:
                self.admit(h)
            except (BusyError, TooLargeError) as e:  # refused: drop its bytes, check its MAC over them
                self._refused, self._skipped = e, 0
                self._skip_mac = self.auth.verifier(memoryview(self._buf)[self._start : self._start + HEADER.size])
                self._start += HEADER.size
        self._header = h
        size = self._frame_size()
        if self._refused is None and size >= BIG_FRAME:
            self._big = anonymous(size)
            n = min(self.buffered, size)
            self._big[:n] = memoryview(self._buf)[self._start : self._start + n]
            self._start += n
            self._big_got = n
            self._maybe_shrink()

    def _big_frame(self, h: Header) -> Frame | None:
        big = self._big
        assert big is not None
        if self._big_got < len(big):
            return None
        view = memoryview(big)
        payload = view[HEADER.size : HEADER.size + h.length]
        assert self.auth is not None  # a large frame is an authenticated one
        self.auth.verify(view[: HEADER.size], payload, view[len(big) - TAG_LEN :])
        view.release()
        self._big, self._header = None, None
        frame = Frame(h, payload)
        self._handed = (frame, big)
        return frame

    def _drop(self, h: Header) -> Frame | None:
        """Consume what arrived of a refused frame; the frame (payload empty) once its tag is in
        and checked."""
        view = memoryview(self._buf)
        mac = self._skip_mac
        assert mac is not None  # set with _refused
        take = min(self.buffered, h.length - self._skipped)
        if take:
            mac.update(view[self._start : self._start + take])
            self._start += take
            self._skipped += take
        if self._skipped < h.length or self.buffered < TAG_LEN:
            view.release()
            self._maybe_shrink()
            return None
        assert self.auth is not None
        self.auth.check(mac, view[self._start : self._start + TAG_LEN])
        self._start += TAG_LEN
        refused, self._refused, self._skip_mac, self._header = self._refused, None, None, None
        return Frame(h, memoryview(b""), refused)

    def detach(self, frame: Frame) -> tuple[mmap.mmap, int] | None:
        """Hand over the buffer of ``frame`` (the large frame just returned) instead of letting
        the caller copy its payload out: (buffer, offset of the payload in it). None for a frame
        that shares the reader's buffer: copy that one."""
        if self._handed is None or self._handed[0] is not frame:
            return None
        big = self._handed[1]
        self._handed = None
        return big, HEADER.size

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
    """Joins FLAG_MORE frames into one message of at most ``max_message`` bytes, in an anonymous
    mapping that grows in place (mremap: nothing is copied as it grows, and it goes back to the
    system once the message is done). A message may start in the buffer of its first frame,
    handed over by the reader (``FrameReader.detach``), so that its first part is not copied."""

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._parts: mmap.mmap | None = None
        self._skip = 0  # bytes at the front of _parts that are not the message (a detached frame's header)
        self._size = 0  # bytes of the message in _parts
        self._first: Header | None = None

    @property
    def pending(self) -> bool:
        return self._first is not None

    @property
    def size(self) -> int:
        """Bytes of the continued message joined so far."""
        return self._size if self._first is not None else 0

    def drop(self) -> None:
        """Forget the message being joined (it was refused, or its connection is going)."""
        self._first, self._parts, self._size = None, None, 0

    def add(
        self, h: Header, payload: memoryview, owned: tuple[mmap.mmap, int] | None = None
    ) -> tuple[Header, memoryview] | None:
        """The whole message once its last frame arrived; None while parts are pending.
        ``owned``: (a buffer holding the payload from an offset on, that offset), taken over
        instead of copied when the frame starts a message."""
        if self._first is None:
            if not h.flags & FLAG_MORE:
                return h, payload  # the common case: one frame, no copy
            if h.length > self.max_message:
                raise TooLargeError(f"continued message exceeds the limit of {self.max_message} bytes")
            self._first = h
            if owned is not None:
                (self._parts, self._skip), self._size = owned, h.length
                payload.release()  # the caller's view goes with the buffer (a live view pins a mapping's size)
                return None
            self._parts, self._skip, self._size = anonymous(h.length), 0, 0
        elif h.op != self._first.op or h.req_id != self._first.req_id:
            raise ProtocolError(f"frame of request {h.req_id} (op {h.op}) inside a continued message of "
                                f"request {self._first.req_id}")  # fmt: skip
        assert self._parts is not None
        if self._size + h.length > self.max_message:
            raise TooLargeError(f"continued message exceeds the limit of {self.max_message} bytes")
        at = self._skip + self._size
        if len(self._parts) < at + h.length:
            self._grow(at + h.length)
        self._parts[at : at + h.length] = payload
        self._size += h.length
        if h.flags & FLAG_MORE:
            return None
        first, parts, skip, size = self._first, self._parts, self._skip, self._size
        self.drop()
        return Header(first.op, first.flags & ~FLAG_MORE, first.req_id, size), memoryview(parts)[skip : skip + size]

    def _grow(self, size: int) -> None:
        """Grow the message's mapping in place; if a view of it is still alive elsewhere (a slice
        of a handed-over first part), mremap is refused: move to a new mapping instead."""
        assert self._parts is not None
        try:
            self._parts.resize(size)
        except BufferError:
            moved = anonymous(size)
            moved[: len(self._parts)] = self._parts
            self._parts = moved
