"""The sans-IO frame reader and the hardened codecs: byte streams cut anywhere give back the
same frames, buffers stay bounded, crafted manifests and bodies fail before they allocate."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdmakv.errors import AuthError, ManifestError, TooLargeError
from rdmakv.llama import slotfile
from rdmakv.llama.slotfile import SlotFileError
from rdmakv.wire import chunking
from rdmakv.wire import manifest as mf
from rdmakv.wire.frames import SMALL_BUFFER, FrameReader, MessageAssembler
from rdmakv.wire.protocol import (
    FLAG_MORE,
    HEADER,
    MAC_BLAKE3,
    MAC_NAMES,
    MAC_POLY1305,
    TAG_LEN,
    FrameAuth,
    Op,
    plain_frame,
)


def _pair(alg):
    k1, k2 = bytes(range(32)), bytes(range(32, 64))
    return FrameAuth(k1, k2, alg), FrameAuth(k2, k1, alg)


@settings(max_examples=60, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=3000), min_size=1, max_size=8),
    cuts=st.lists(st.integers(1, 700), min_size=1, max_size=40),
    alg=st.sampled_from(sorted(MAC_NAMES)),
)
def test_frames_come_back_whole_however_the_stream_is_cut(payloads, cuts, alg):
    tx, rx = _pair(alg)
    stream = b"".join(b"".join(bytes(p) for p in tx.seal(Op.PUT_CHUNKS, 0, i, [pl])) for i, pl in enumerate(payloads))
    reader = FrameReader(1 << 20, rx)
    got, pos, i = [], 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        reader.feed(stream[pos : pos + n])
        pos += n
        i += 1
        got += [(f.header.req_id, bytes(f.payload)) for f in reader.frames()]
        assert reader.capacity <= SMALL_BUFFER + 3000 + 4096  # one frame plus read-ahead, never more
    assert got == list(enumerate(payloads))


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=0, max_size=6),
    piece=st.integers(1, 4096),
    alg=st.sampled_from(sorted(MAC_NAMES)),
)
def test_a_streamed_frame_is_the_sealed_frame_in_pieces(sizes, piece, alg):
    parts = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    a, _ = _pair(alg)
    b, _ = _pair(alg)
    a.seal(Op.LIST, 0, 1, [b"x"])  # both at sequence number 1
    b.seal(Op.LIST, 0, 1, [b"x"])
    sealed = b"".join(bytes(p) for p in a.seal(Op.GET_CHUNKS, 1, 7, parts))
    groups = list(b.seal_stream(Op.GET_CHUNKS, 1, 7, parts, piece))
    assert b"".join(bytes(p) for g in groups for p in g) == sealed
    assert all(sum(memoryview(p).nbytes for p in g[1 if i == 0 else 0 :]) <= piece for i, g in enumerate(groups[:-1]))
    assert b.send_seq == a.send_seq == 2


@pytest.mark.parametrize("alg", sorted(MAC_NAMES))
def test_every_mac_refuses_a_tampered_replayed_reordered_or_reflected_frame(alg):
    def frames(tx, n):
        return [b"".join(bytes(p) for p in tx.seal(Op.GET_CHUNKS, 0, i, [b"payload %d" % i])) for i in range(n)]

    def refused(rx, stream):
        r = FrameReader(1 << 20, rx)
        r.feed(stream)
        with pytest.raises(AuthError):
            while r.next_frame() is not None:
                pass

    f0, f1 = frames(_pair(alg)[0], 2)
    tampered = bytearray(f0)
    tampered[HEADER.size] ^= 1  # a payload bit
    refused(_pair(alg)[1], bytes(tampered))
    refused(_pair(alg)[1], f1)  # reordered: frame 1 first
    refused(_pair(alg)[1], f0 + f0)  # replayed
    refused(_pair(alg)[0], f0)  # reflected back to its sender (the other direction's key)
    r = FrameReader(1 << 20, _pair(alg)[1])
    r.feed(f0 + f1)
    assert [bytes(r.next_frame().payload) for _ in range(2)] == [b"payload 0", b"payload 1"]


def test_poly1305_frames_use_a_key_of_their_own_and_keep_the_tag_length():
    tx, _ = _pair(MAC_POLY1305)
    a = tx.seal(Op.LIST, 0, 1, [b"same"])[-1]
    b = tx.seal(Op.LIST, 0, 1, [b"same"])[-1]  # the same frame at the next sequence number
    assert len(a) == len(b) == TAG_LEN and a != b and a[16:] == b[16:] == bytes(16)


def test_a_tampered_or_plain_frame_after_keys_is_refused():
    tx, rx = _pair(MAC_BLAKE3)
    frame = bytearray(b"".join(bytes(p) for p in tx.seal(Op.GET_CHUNKS, 0, 1, [b"abc"])))
    frame[-1] ^= 1
    r = FrameReader(1 << 20, rx)
    r.feed(frame)
    with pytest.raises(AuthError):
        r.next_frame()
    r2 = FrameReader(1 << 20, _pair(MAC_BLAKE3)[1])
    r2.feed(plain_frame(Op.GET_CHUNKS, 0, 1, b""))
    with pytest.raises(AuthError, match="unauthenticated"):
        r2.next_frame()


def test_the_size_limit_is_checked_on_the_header_and_the_buffer_shrinks_back():
    tx, rx = _pair(MAC_BLAKE3)
    r = FrameReader(512, None)
    r.feed(plain_frame(Op.HELLO, 0, 0, b"x" * 600)[:16])
    with pytest.raises(TooLargeError):
        r.next_frame()
    r = FrameReader(8 << 20, rx)
    big = b"".join(bytes(p) for p in tx.seal(Op.PUT_CHUNKS, 0, 1, [b"y" * (4 << 20)]))
    r.feed(big[:100])
    assert r.next_frame() is None and r.partial() == (100, len(big))  # moved to a buffer of its own size
    r.feed(big[100:])
    assert bytes(r.next_frame().payload) == b"y" * (4 << 20) and r.capacity == SMALL_BUFFER
    r.feed(b"".join(bytes(p) for p in tx.seal(Op.STATS, 0, 2, [])))
    assert r.next_frame().header.req_id == 2
    assert r.next_frame() is None and r.capacity == SMALL_BUFFER and r.partial() is None


def test_bytes_after_a_large_frame_wait_for_it_to_be_taken_out():
    """What arrives after a large frame is whole (TLS hands over all it decrypted at once) goes to
    the shared buffer: the reader always has room, and the frames come out in order."""
    tx, rx = _pair(MAC_BLAKE3)
    r = FrameReader(8 << 20, rx)
    stream = b"".join(bytes(p) for i, n in enumerate((2 << 20, 10, 3 << 20, 5))
                      for p in tx.seal(Op.PUT_CHUNKS, 0, i, [bytes([i]) * n]))  # fmt: skip
    r.feed(stream[:100])
    assert r.next_frame() is None  # the first frame's header is in: it gets its own buffer
    r.feed(stream[100:])  # the rest at once, without taking anything out in between
    got = [(f.header.req_id, bytes(f.payload)) for f in r.frames()]
    assert got == [(i, bytes([i]) * n) for i, n in enumerate((2 << 20, 10, 3 << 20, 5))]


def test_a_refused_frame_is_read_and_dropped_with_its_mac_checked():
    from rdmakv.errors import BusyError

    tx, rx = _pair(MAC_BLAKE3)

    def admit(h):
        if h.req_id == 1:
            raise BusyError("server busy")

    r = FrameReader(8 << 20, rx, admit=admit)
    big = b"".join(bytes(p) for p in tx.seal(Op.PUT_CHUNKS, 0, 1, [b"z" * (2 << 20)]))
    for i in range(0, len(big), 50_000):
        r.feed(big[i : i + 50_000])
        f = r.next_frame()
        assert r.capacity <= SMALL_BUFFER + 128 << 10  # never buffered whole
    assert f is not None and isinstance(f.refused, BusyError) and f.payload.nbytes == 0
    r.feed(b"".join(bytes(p) for p in tx.seal(Op.STATS, 0, 2, [b"ok"])))  # the stream stays in step
    assert bytes(r.next_frame().payload) == b"ok"
    bad = bytearray(b"".join(bytes(p) for p in tx.seal(Op.PUT_CHUNKS, 0, 1, [b"z" * 100_000])))
    bad[5000] ^= 1  # a refused frame's MAC is still checked
    r.feed(bad)
    with pytest.raises(AuthError):
        r.next_frame()


def test_a_large_first_part_is_handed_to_the_message_not_copied():
    tx, rx = _pair(MAC_BLAKE3)
    r = FrameReader(4 << 20, rx)
    a = MessageAssembler(16 << 20)
    parts = [bytes([i]) * (3 << 20) for i in range(3)]
    for i, p in enumerate(parts):
        r.feed(b"".join(bytes(x) for x in tx.seal(Op.PUT_CHUNKS, FLAG_MORE if i < 2 else 0, 9, [p])))
        f = r.next_frame()
        owned = r.detach(f) if i == 0 else None
        assert (owned is not None) == (i == 0)
        whole = a.add(f.header, f.payload, owned)
        assert (whole is None) == (i < 2) and a.size == (0 if i == 2 else (i + 1) * (3 << 20))
    h, body = whole
    assert h.req_id == 9 and h.length == 9 << 20 and bytes(body) == b"".join(parts)


@pytest.mark.parametrize("kept", ["frame", "a slice of its payload"])
def test_a_handed_over_first_part_may_still_be_referenced_while_the_message_grows(kept):
    """The server's worker keeps the first frame (its call's arguments) while it takes the next
    ones that are already buffered: the buffer handed to the message must still grow (the
    payload's view is released; a slice taken of it before makes the message move instead)."""
    tx, rx = _pair(MAC_POLY1305)
    r = FrameReader(4 << 20, rx)
    a = MessageAssembler(16 << 20)
    parts = [bytes([i + 1]) * (2 << 20) for i in range(3)]
    for i, p in enumerate(parts):
        r.feed(b"".join(bytes(x) for x in tx.seal(Op.PUT_CHUNKS, FLAG_MORE if i < 2 else 0, 4, [p])))
    first = r.next_frame()
    assert first is not None
    pinned = first.payload[:10] if kept != "frame" else None
    owned = r.detach(first)
    assert owned is not None
    whole = a.add(first.header, first.payload, owned)
    while whole is None:
        f = r.next_frame()
        assert f is not None
        whole = a.add(f.header, f.payload)
    assert first is not None  # still alive here, as in the worker
    assert bytes(whole[1]) == b"".join(parts)
    assert pinned is None or bytes(pinned) == parts[0][:10]
    assert (whole[1].obj is owned[0]) == (pinned is None)  # grown in place unless a slice pins it


def test_continued_messages_are_joined_up_to_their_limit():
    from rdmakv.wire.protocol import Header

    a = MessageAssembler(10)
    assert a.add(Header(Op.PUT_CHUNKS, FLAG_MORE, 5, 4), memoryview(b"abcd")) is None
    h, body = a.add(Header(Op.PUT_CHUNKS, 0, 5, 3), memoryview(b"efg"))
    assert bytes(body) == b"abcdefg" and h.length == 7 and not h.flags & FLAG_MORE
    a.add(Header(Op.PUT_CHUNKS, FLAG_MORE, 6, 8), memoryview(b"12345678"))
    with pytest.raises(TooLargeError):
        a.add(Header(Op.PUT_CHUNKS, 0, 6, 8), memoryview(b"12345678"))


def test_a_kv_manifest_whose_lengths_would_truncate_is_refused():
    """The crafted case: a 2,049-token window of 2^20-element rows is 4 GiB + 2 MiB per chunk,
    which a u32 cast turns into 2 MiB: the manifest matched its shape and a restore allocated 8 GiB."""
    n = 2049
    body = chunking._BODY.pack(0, 3, b"<f2", 2, 1, n, n)
    body += np.array([[1 << 20, 1 << 20]], "<u4").tobytes() + bytes(4 * n)
    truncated = (n * (1 << 21)) & 0xFFFFFFFF
    m = mf.Manifest(mf.KIND_KV, body, [1, 2], [truncated, truncated], [0, 1 << 32])
    with pytest.raises(ManifestError, match="u32 limit"):
        chunking.decode_layout(mf.decode(m.encode()))


def test_a_slot_body_that_inflates_past_its_file_is_refused():
    head = struct.pack("<4sBBHQQ", b"RKSF", 1, 1, 0, 100, 0)  # a 100-byte file...
    bomb = zlib.compress(b"\0" * (64 << 20), 9)  # ...whose body inflates to 64 MiB
    with pytest.raises(SlotFileError, match="inflates past"):
        slotfile.rebuild(head + bomb, [])


def test_a_forked_child_can_still_seal_large_blake3_frames():
    """BLAKE3's thread pool is gone in a fork's child; sealing there must not wait for it forever."""
    import os
    import signal
    import time

    tx, _ = _pair(MAC_BLAKE3)
    big = bytes(4 << 20)
    tx.seal(Op.GET_CHUNKS, 0, 1, [big])  # starts the pool in this process
    pid = os.fork()
    if pid == 0:
        child, _ = _pair(MAC_BLAKE3)
        child.seal(Op.GET_CHUNKS, 0, 1, [big])
        os._exit(0)
    deadline = time.monotonic() + 20
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("sealing a large frame in a forked child hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0


@given(st.lists(st.binary(max_size=40), max_size=12), st.lists(st.integers(1, 60), min_size=1, max_size=30))
def test_partial_writes_resume_where_they_stopped(parts, steps):
    from rdmakv.wire.iovec import advance, byte_views

    views = byte_views(parts)
    out, i, k = bytearray(), 0, 0
    while i < len(views):  # a writer that takes at most steps[k] bytes per call
        room = steps[k % len(steps)]
        k += 1
        chunk = b"".join(bytes(v) for v in views[i:])[:room]
        out += chunk
        i = advance(views, i, len(chunk))
    assert bytes(out) == b"".join(parts)
