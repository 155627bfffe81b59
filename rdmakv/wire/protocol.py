"""Wire frames and their authentication (sans-IO: bytes in, objects out).

Frame = header | payload | tag. The header is fixed-size; the tag is a MAC (HMAC-SHA256, keyed
BLAKE3 or Poly1305, chosen in HELLO) under the direction's key of
(u64 sequence number || header || payload); for Poly1305 the sequence number picks the frame's
one-time key instead (keyed BLAKE3 of it under the direction's key). The
sequence number is implicit (each side counts frames per direction), so a
replayed, dropped or reordered frame fails the MAC, and a frame reflected back
to its sender fails because each direction has its own key. Only the two
handshake frames and a handshake-failure error travel without a tag
(``FLAG_PLAIN``), never once the handshake is done. ``FLAG_MORE`` marks a frame whose
message continues in the next one (a chunk larger than the frame limit).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from typing_extensions import Buffer  # typing-only (collections.abc.Buffer is 3.12+)

import blake3
from cryptography.hazmat.primitives import poly1305

from ..errors import AuthError, ProtocolError, TooLargeError

MAGIC = b"RDKV"
VERSION = 2  # 2: save options (pin, TTL), restore tiers, PIN and COMPACT
HEADER = struct.Struct("<4sBBHII")  # magic, version, opcode, flags, request id, payload length
TAG_LEN = 32
DEFAULT_MAX_FRAME = 64 << 20
_SEQ = struct.Struct("<Q")

FLAG_RESPONSE = 0x1
FLAG_PLAIN = 0x2
FLAG_MORE = 0x4
_KNOWN_FLAGS = FLAG_RESPONSE | FLAG_PLAIN | FLAG_MORE
HELLO_MAX = 512  # a HELLO is a few hundred bytes: anything larger is refused before it is read

MAC_HMAC_SHA256 = 1
MAC_BLAKE3 = 2
MAC_POLY1305 = 3
MAC_NAMES = {MAC_HMAC_SHA256: "hmac-sha256", MAC_BLAKE3: "blake3", MAC_POLY1305: "poly1305"}
# What a client asks for unless told otherwise: the cheapest per byte. Measured on this project's
# 2-core VM over 8 MiB: Poly1305 (OpenSSL, through cryptography) 6.3 GB/s, keyed BLAKE3 on one
# thread 3.4 GB/s, HMAC-SHA256 1.6 GB/s; every restored or saved byte is MAC'd on both ends.
DEFAULT_MAC = MAC_POLY1305
# How a server that does not know the MAC a client asked for says so (the same words since 0.1): a
# client that asked for Poly1305 then asks again for BLAKE3 (fallback_tcp.transport.TcpChannel).
OLD_SERVER_MAC_REFUSAL = "unknown frame MAC algorithm id"
MAC_BY_NAME = {v: k for k, v in MAC_NAMES.items()}


class Op(IntEnum):
    HELLO = 1
    AUTH = 2
    EXISTS = 3
    PUT_CHUNKS = 4
    GET_CHUNKS = 5
    PUT_MANIFEST = 6
    GET_MANIFEST = 7
    DELETE_MANIFEST = 8
    LIST = 9
    STATS = 10
    RDMA_CONNECT = 11
    LOCATE = 12
    PIN = 13
    COMPACT = 14
    COMMIT = 15  # a save whose missing chunks were written by RDMA into its reservation
    HAS_MANIFESTS = 16  # which of these names are committed sessions (one round trip for many)
    PUT_MANIFESTS = 17  # commit many manifests, each if all its chunks are present (one round trip)
    GET_MANIFESTS = 18  # look many sessions up (manifests, optionally locations), held together
    ERROR = 127


@dataclass(frozen=True, slots=True)
class Header:
    op: int
    flags: int
    req_id: int
    length: int

    @property
    def plain(self) -> bool:
        return bool(self.flags & FLAG_PLAIN)


def encode_header(op: int, flags: int, req_id: int, length: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, op, flags, req_id & 0xFFFFFFFF, length)


def decode_header(data: bytes | memoryview, max_frame: int = DEFAULT_MAX_FRAME) -> Header:
    """Validate a header before anything is allocated for its payload."""
    if len(data) != HEADER.size:
        raise ProtocolError(f"truncated frame header ({len(data)} of {HEADER.size} bytes)")
    magic, version, op, flags, req_id, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"not an rdmakv frame (magic {bytes(magic)!r})")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this build speaks {VERSION})")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown frame flags 0x{flags:04x}")
    if length > max_frame:
        raise TooLargeError(f"frame payload of {length} bytes exceeds the limit of {max_frame}")
    return Header(op, flags, req_id, length)


def payload_size(parts: Sequence[bytes | memoryview]) -> int:
    return sum(memoryview(p).nbytes for p in parts)


def mac_alg(name_or_id: str | int) -> int:
    if isinstance(name_or_id, int) and name_or_id in MAC_NAMES:
        return name_or_id
    alg = MAC_BY_NAME.get(str(name_or_id).lower())
    if alg is None:
        raise ValueError(f"mac must be one of {sorted(MAC_BY_NAME)}, got {name_or_id!r}")
    return alg


_blake3_threads_ok = True  # BLAKE3's thread pool does not survive fork: a child that used it would hang


def _no_blake3_threads() -> None:
    global _blake3_threads_ok
    _blake3_threads_ok = False


os.register_at_fork(after_in_child=_no_blake3_threads)


class FrameMac(Protocol):
    """The MAC of one frame: fed the frame's bytes, then asked for its tag (TAG_LEN bytes)."""

    def update(self, data: Buffer, /) -> object: ...
    def digest(self) -> bytes: ...


class Mac(FrameMac, Protocol):
    """What a frame MAC needs of hmac's and blake3's hashers: a keyed state copied per frame."""

    def copy(self) -> Mac: ...


class _Poly1305Frame:
    """Poly1305 over one frame. Poly1305 must never use a key twice, so each frame gets its own:
    keyed BLAKE3 of the frame's sequence number under the direction's key (each direction's key is
    new per connection, and its sequence numbers never repeat). The 16-byte tag is padded with
    zeros to TAG_LEN, so frames keep one layout whatever the MAC."""

    def __init__(self, direction_key: bytes, seq: int) -> None:
        one_time_key = blake3.blake3(b"rdmakv/2 poly1305 frame " + _SEQ.pack(seq), key=direction_key).digest()
        self._poly = poly1305.Poly1305(one_time_key)

    def update(self, data: Buffer, /) -> None:
        self._poly.update(data)  # type: ignore[arg-type]  # (any contiguous buffer, as for blake3)

    def digest(self) -> bytes:
        return self._poly.finalize() + bytes(TAG_LEN - 16)


THREADED_PART = 1 << 20  # a MAC update at least this large goes to BLAKE3's thread pool
# A frame at least STREAM_MIN bytes long is sent as it is hashed and checked as it arrives, in
# pieces of STREAM_PIECE (FrameAuth.seal_stream, FramedSocket.recv_verified): the server hashes
# piece n+1 while the client receives and hashes piece n, each on its own core, instead of one
# whole-frame pass after the other. bench throughput (host, 2 cores, 8 MiB GET_CHUNKS replies):
# 4k-token restore 59-69 -> 48-56 ms, 16k 224-292 -> 183-212 ms; pieces of 512 KiB to 1 MiB were
# best (128-256 KiB: more calls, no gain). The pieces are hashed on one thread: BLAKE3's pool
# only takes the core the peer is using (measured: 1 MiB pieces on the pool, either end or both,
# no faster and noisier).
STREAM_MIN = 1 << 20
STREAM_PIECE = 1 << 20


def _mac_base(key: bytes, alg: int, threaded: bool = False) -> Mac:
    if alg == MAC_BLAKE3:
        # Large updates are hashed on several cores (BLAKE3's tree). Small ones stay on this one:
        # a hasher made with max_threads=AUTO is 3-5x slower on 16 KiB updates (bench throughput).
        threads = blake3.blake3.AUTO if threaded and _blake3_threads_ok else 1
        return blake3.blake3(key=key, max_threads=threads)
    return hmac.new(key, digestmod=hashlib.sha256)


def _big_parts(parts: Sequence[bytes | memoryview]) -> bool:
    return any(memoryview(p).nbytes >= THREADED_PART for p in parts)


class FrameAuth:
    """Per-connection MAC state: one key and one sequence counter per direction."""

    def __init__(self, send_key: bytes, recv_key: bytes, alg: int = MAC_HMAC_SHA256) -> None:
        self.alg = alg
        self._send_key, self._recv_key = send_key, recv_key
        self._send = _mac_base(send_key, alg)
        self._recv = _mac_base(recv_key, alg)
        threaded = alg == MAC_BLAKE3  # (the same MACs, computed on the thread pool for large parts)
        self._send_mt = _mac_base(send_key, alg, True) if threaded else self._send
        self._recv_mt = _mac_base(recv_key, alg, True) if threaded else self._recv
        self.send_seq = 0
        self.recv_seq = 0

    def seal(
        self, op: int, flags: int, req_id: int, parts: Sequence[bytes | memoryview]
    ) -> list[bytes | memoryview]:
        """Header, payload parts and tag, ready for one scatter-gather send."""
        header = encode_header(op, flags, req_id, payload_size(parts))
        mac = self._begin(self._send_key, self._send_mt if _big_parts(parts) else self._send, self.send_seq)
        mac.update(header)
        for p in parts:
            mac.update(p)
        self.send_seq += 1
        return [header, *parts, mac.digest()]

    def seal_stream(
        self, op: int, flags: int, req_id: int, parts: Sequence[bytes | memoryview], piece: int = STREAM_PIECE
    ) -> Iterator[list[bytes | memoryview]]:
        """``seal``'s frame in groups of about ``piece`` payload bytes, each hashed just before it
        is given out: the sender sends a group while the next is hashed, and the reader (see
        ``FramedSocket.recv_verified``) hashes what has arrived meanwhile, on its own core. ``seal``
        hashes the whole payload before the first byte leaves. The tag ends the last group. The
        sequence number is taken at once: a stream not sent to its end leaves the connection out of
        step (as any partly sent frame does), which then closes."""
        header = encode_header(op, flags, req_id, payload_size(parts))
        mac = self._begin(self._send_key, self._send, self.send_seq)  # one thread: see STREAM_PIECE
        mac.update(header)
        self.send_seq += 1
        return _hashed_groups(mac, header, parts, piece)

    def verify(self, header: bytes | memoryview, payload: bytes | memoryview, tag: bytes | memoryview) -> None:
        self.verify_parts(header, [payload], tag)

    def verify_parts(
        self, header: bytes | memoryview, parts: Sequence[bytes | memoryview], tag: bytes | memoryview
    ) -> None:
        """Check a frame whose payload was received in pieces (straight into their places)."""
        mac = self.verifier(header, _big_parts(parts))
        for p in parts:
            mac.update(p)
        self.check(mac, tag)

    def verifier(self, header: bytes | memoryview, threaded: bool = False) -> FrameMac:
        """A MAC over the next received frame, fed its payload as it arrives (``update``); then
        ``check``. For a frame that is read and dropped rather than kept."""
        mac = self._begin(self._recv_key, self._recv_mt if threaded else self._recv, self.recv_seq)
        mac.update(header)
        return mac

    def _begin(self, key: bytes, base: Mac, seq: int) -> FrameMac:
        """The MAC of frame ``seq`` of one direction, before its header."""
        if self.alg == MAC_POLY1305:
            return _Poly1305Frame(key, seq)
        mac = base.copy()
        mac.update(_SEQ.pack(seq))
        return mac

    def check(self, mac: FrameMac, tag: bytes | memoryview) -> None:
        if not hmac.compare_digest(mac.digest(), bytes(tag)):
            raise AuthError(
                "frame authentication failed (wrong key, tampered, replayed or reordered frame)"
            )
        self.recv_seq += 1


def _hashed_groups(
    mac: FrameMac, header: bytes, parts: Sequence[bytes | memoryview], piece: int
) -> Iterator[list[bytes | memoryview]]:
    group: list[bytes | memoryview] = [header]
    size = 0
    for p in parts:
        v = memoryview(p).cast("B")
        while v.nbytes:
            take = v[: piece - size]
            mac.update(take)
            group.append(take)
            size += take.nbytes
            v = v[take.nbytes :]
            if size >= piece:
                yield group
                group, size = [], 0
    group.append(mac.digest())
    yield group


def plain_frame(op: int, flags: int, req_id: int, payload: bytes) -> bytes:
    return encode_header(op, flags | FLAG_PLAIN, req_id, len(payload)) + payload
