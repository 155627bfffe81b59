"""Pure codecs: manifest container, KV body, frames, messages — round trips and rejection."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from rdmakv import kvgen
from rdmakv.client.reports import KVState
from rdmakv.errors import AuthError, CodecError, ManifestError, ProtocolError, TooLargeError
from rdmakv.hashing import (
    HASH_BLAKE3_256,
    HASH_XXH3_64,
    KEY_OPAQUE_BLAKE3,
    KEY_OPAQUE_XXH3,
    check_of,
    engine_key,
    key_alg,
    key_hex,
    keys_array,
    opaque_key,
)
from rdmakv.store.engine import records as rec
from rdmakv.wire import chunking
from rdmakv.wire import manifest as mf
from rdmakv.wire import messages as msg
from rdmakv.wire.protocol import HEADER, TAG_LEN, FrameAuth, Op, decode_header, encode_header

DTYPES = ["<f2", "<f4", "<u2", "u1", "<f8"]


@st.composite
def kv_states(draw):
    n_layer = draw(st.integers(1, 4))
    n = draw(st.integers(0, 70))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    v_trans = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    k, v = [], []
    for _ in range(n_layer):
        ek, ev = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        k.append(np.frombuffer(rng.bytes(n * ek * dtype.itemsize), dtype).reshape(n, ek))
        vv = np.frombuffer(rng.bytes(n * ev * dtype.itemsize), dtype)
        v.append(vv.reshape((ev, n) if v_trans else (n, ev)))
    tokens = rng.integers(0, 2**32, n, dtype=np.uint32)
    return KVState(k, v, tokens, v_trans)


def _restore_locally(m: mf.Manifest, chunks) -> KVState:
    layout = chunking.decode_layout(m)
    _, lengths, offsets = layout.chunk_table()
    buf = np.zeros(layout.total_bytes, np.uint8)
    for off, c in zip(offsets.tolist(), chunks):
        buf[off : off + len(c)] = np.frombuffer(c, np.uint8)
    return chunking.assemble(layout, buf)


@settings(max_examples=150, deadline=None)
@given(kv=kv_states(), window=st.integers(1, 100))
def test_kv_manifest_round_trip(kv, window):
    m, chunks = chunking.split(kv, window)
    data = m.encode()
    m2 = mf.decode(data)
    assert m2 == m and m2.encode() == data
    assert _restore_locally(m2, chunks).equals(kv)
    # partial last window and W larger than the session are both just shorter chunks
    layout = chunking.decode_layout(m2)
    n_windows = -(-kv.n_tokens // window)
    per_layer_v = (1 if kv.n_tokens else 0) if kv.v_trans else n_windows
    assert m2.n_chunks == kv.n_layer * (n_windows + per_layer_v)
    assert layout.window == window and layout.v_trans == kv.v_trans


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from([mf.KIND_KV, mf.KIND_OPAQUE, mf.KIND_SLOTFILE]),
    body=st.binary(max_size=200),
    rows=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(1, 2**31), st.integers(0, 2**64 - 1)), max_size=50),
)
def test_container_round_trip(kind, body, rows):
    keys = [r[0] for r in rows]
    m = mf.Manifest(kind, body, keys, [r[1] for r in rows], [r[2] for r in rows])
    m2 = mf.decode(m.encode())
    assert m2.kind == kind and m2.body == body and m2.keys.tolist() == keys


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_container_rejects_garbage(data):
    try:
        mf.decode(data)
    except ManifestError:
        return
    raise AssertionError("garbage decoded")  # checksummed: random bytes never decode


@settings(max_examples=100, deadline=None)
@given(kv=kv_states(), pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_bit_flip_in_a_manifest_is_detected(kv, pos, bit):
    data = bytearray(chunking.split(kv, 16)[0].encode())
    data[pos % len(data)] ^= 1 << bit
    with pytest.raises(ManifestError):
        mf.decode(bytes(data))


def test_kv_body_validation_rejects_inconsistent_tables():
    kv = kvgen.generate(kvgen.token_stream(1, 20), kvgen.ModelShape("t", 2, 4, 4))
    m, _ = chunking.split(kv, 8)
    bad = mf.Manifest(m.kind, m.body, m.keys, m.lengths + 1, m.tags)
    with pytest.raises(ManifestError, match="chunk table does not match"):
        chunking.decode_layout(mf.decode(bad.encode()))
    bad_body = mf.Manifest(m.kind, m.body[:-1], m.keys, m.lengths, m.tags)
    with pytest.raises(ManifestError, match="body is"):
        chunking.decode_layout(mf.decode(bad_body.encode()))
    opaque = mf.Manifest(mf.KIND_OPAQUE, b"", [1], [1], [0])
    with pytest.raises(ManifestError, match="not a KV session"):
        chunking.decode_layout(opaque)


def test_manifest_rejects_unknown_version_and_kind():
    m = mf.Manifest(mf.KIND_OPAQUE, b"", [1], [5], [0])
    data = bytearray(m.encode())
    data[4] = 9
    with pytest.raises(ManifestError, match="version 9"):
        mf.decode(bytes(data))
    with pytest.raises(ManifestError, match="unknown manifest kind"):
        mf.Manifest(77, b"", [], [], []).encode()


# -- frames ---------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    op=st.integers(0, 255),
    flags=st.sampled_from([0, 1]),
    req=st.integers(0, 2**32 - 1),
    payload=st.lists(st.binary(max_size=100), max_size=5),
    seq=st.integers(0, 5),
)
def test_frame_round_trip(op, flags, req, payload, seq):
    k1, k2 = b"a" * 32, b"b" * 32
    sender, receiver = FrameAuth(k1, k2), FrameAuth(k2, k1)
    for _ in range(seq):  # both sides advance in step
        parts = sender.seal(1, 0, 0, [])
        receiver.verify(parts[0], b"", parts[-1])
    parts = sender.seal(op, flags, req, payload)
    wire = b"".join(bytes(p) for p in parts)
    h = decode_header(wire[: HEADER.size])
    assert (h.op, h.flags, h.req_id, h.length) == (op, flags, req, sum(map(len, payload)))
    body = wire[HEADER.size : HEADER.size + h.length]
    assert body == b"".join(payload)
    receiver.verify(wire[: HEADER.size], body, wire[-TAG_LEN:])


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(min_size=1, max_size=64), pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_frame_tamper_replay_reflection_detected(payload, pos, bit):
    k1, k2 = b"c" * 32, b"d" * 32
    sender, receiver = FrameAuth(k1, k2), FrameAuth(k2, k1)
    wire = bytearray(b"".join(bytes(p) for p in sender.seal(Op.EXISTS, 0, 1, [payload])))
    good = bytes(wire)
    wire[pos % len(wire)] ^= 1 << bit
    with pytest.raises(AuthError):
        receiver.verify(wire[: HEADER.size], wire[HEADER.size : -TAG_LEN], wire[-TAG_LEN:])
    receiver.verify(good[: HEADER.size], good[HEADER.size : -TAG_LEN], good[-TAG_LEN:])
    with pytest.raises(AuthError):  # replay: the implicit sequence number has moved on
        receiver.verify(good[: HEADER.size], good[HEADER.size : -TAG_LEN], good[-TAG_LEN:])
    with pytest.raises(AuthError):  # reflection: our own frame back to us
        FrameAuth(k1, k2).verify(good[: HEADER.size], good[HEADER.size : -TAG_LEN], good[-TAG_LEN:])


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=HEADER.size, max_size=HEADER.size))
def test_header_decoder_never_crashes(data):
    try:
        decode_header(data, max_frame=1 << 20)
    except ProtocolError:
        pass


def test_header_limits():
    with pytest.raises(TooLargeError, match="exceeds the limit"):
        decode_header(encode_header(Op.PUT_CHUNKS, 0, 1, 2 << 20), max_frame=1 << 20)
    with pytest.raises(ProtocolError, match="magic"):
        decode_header(b"X" * HEADER.size)
    with pytest.raises(ProtocolError, match="truncated"):
        decode_header(b"RDKV")


# -- message payloads --------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=50), max_size=10))
def test_put_and_get_chunk_payloads_round_trip(chunks):
    for alg, key in ((HASH_XXH3_64, lambda i: i), (HASH_BLAKE3_256, lambda i: bytes([i]) * 32),
                     (KEY_OPAQUE_XXH3, lambda i: opaque_key(bytes([i]) * (1 + i % 64))),
                     (KEY_OPAQUE_BLAKE3, lambda i: opaque_key(b"k%d" % i, KEY_OPAQUE_BLAKE3))):  # fmt: skip
        keys = [key(i) for i in range(len(chunks))]
        payload = b"".join(bytes(p) for p in msg.enc_put_chunks(keys, chunks))
        assert [(k, bytes(v)) for k, v in msg.dec_put_chunks(payload)] == list(zip(keys, chunks))
        absent = [key(200), key(201)]
        checks = [check_of(k, c) for k, c in zip(keys, chunks)]
        reply = msg.enc_chunks(list(zip(keys, chunks)), absent, alg, checks=checks)
        served, gone = msg.dec_chunks(b"".join(bytes(p) for p in reply))
        assert [(k, bytes(v), c) for k, v, c in served] == list(zip(keys, chunks, checks)) and gone == absent
        for k, v, c in served:
            if c is not None:  # an opaque key's chunk verifies against the store's check
                msg.verify_chunk(k, v, check=c)


@settings(max_examples=100, deadline=None)
@given(key=st.binary(min_size=1, max_size=64), blake=st.booleans())
def test_opaque_keys_round_trip_and_never_meet_content_keys(key, blake):
    alg = KEY_OPAQUE_BLAKE3 if blake else KEY_OPAQUE_XXH3
    k = opaque_key(key, alg)
    assert len(k) == 65 and engine_key(k) == key and key_alg(k) == alg and key_hex(k) == key.hex()
    arr = keys_array([k], alg)
    assert msg.dec_keys(msg.enc_keys(arr)).tolist() == [k]
    assert msg.alg_of(arr) == alg and msg.alg_of([k]) == alg
    assert k != opaque_key(key, KEY_OPAQUE_XXH3 if blake else KEY_OPAQUE_BLAKE3)  # the check kind is identity


def test_malformed_opaque_keys_and_lengths_are_refused():
    for bad in (b"", b"x" * 65):
        with pytest.raises(ValueError, match="1..64"):
            opaque_key(bad)
    good = opaque_key(b"abc")
    for raw in (bytes([0]) + good[1:], bytes([65]) + good[1:], good[:10] + b"\x01" + good[11:],
                bytes([3 | 0x80]) + good[1:]):  # fmt: skip
        payload = bytes([KEY_OPAQUE_XXH3]) + (1).to_bytes(4, "little") + raw
        with pytest.raises(CodecError, match="malformed opaque key"):
            msg.dec_keys(payload)
    m = mf.Manifest(mf.KIND_ENGINE, b"", keys_array([good], KEY_OPAQUE_XXH3), [4], [0], KEY_OPAQUE_XXH3)
    data = bytearray(m.encode())
    assert mf.decode(bytes(data)).keys.tolist() == [good]
    data[mf._HEADER.size + 5] = 1  # a nonzero byte in the key's padding (checksum fixed up below)
    data[-8:] = xxhash.xxh3_64_intdigest(bytes(data[:-8])).to_bytes(8, "little")
    with pytest.raises(ManifestError, match="malformed opaque key"):
        mf.decode(bytes(data))
    with pytest.raises(CodecError, match="needs the store's check"):
        msg.enc_chunks([(good, b"data")], [], KEY_OPAQUE_XXH3, checks=[None])


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 20), blake=st.booleans(), with_checks=st.booleans())
def test_locations_round_trip_with_and_without_checks(n, blake, with_checks):
    alg = KEY_OPAQUE_BLAKE3 if blake else KEY_OPAQUE_XXH3
    regions = msg.make_regions([(1, 4096, 1 << 20, 7)])
    slots = np.zeros(n, dtype=msg.LOCATION_DTYPE)
    slots["region"], slots["offset"] = 1, np.arange(n) * 64
    checks = None
    if with_checks:
        checks = (np.arange(n, dtype=np.uint64) if not blake else
                  np.frombuffer(b"".join(bytes([i]) * 32 for i in range(n)), "V32"))  # fmt: skip
    loc = msg.Locations(regions, slots, checks, alg if with_checks else 0)
    got = msg.dec_locations(loc.encode())
    assert got.slots.tobytes() == slots.tobytes() and got.check_alg == loc.check_alg
    assert got.check_list() == loc.check_list()
    assert got.subset(np.arange(n)[::2]).check_list() == loc.check_list()[::2]


def test_opaque_chunk_records_round_trip_with_their_check():
    for alg in (KEY_OPAQUE_XXH3, KEY_OPAQUE_BLAKE3):
        k = opaque_key(b"\x00chain", alg)
        data = b"some kv bytes"
        parts = rec.chunk_parts("ns", k, data, check_of(k, data))
        payload = memoryview(b"".join(bytes(p) for p in parts))
        r = rec.decode_payload(rec.Header(rec.REC_CHUNK, len(payload), 0, 24), payload)
        assert r.key == k and r.check == check_of(k, data) and bytes(r.body) == data
        with pytest.raises(CodecError, match="needs its check"):
            rec.chunk_parts("ns", k, data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=80))
def test_payload_decoders_raise_codec_errors_only(data):
    for dec in (msg.dec_keys, msg.dec_put_chunks, msg.dec_chunks, msg.dec_bitmap, msg.dec_manifest_reply,
                msg.dec_get_manifest, msg.dec_name_only, msg.dec_put_manifest, msg.dec_locations, msg.dec_hello,
                msg.dec_list, msg.dec_pin, msg.dec_error, msg.dec_manifest_result, msg.dec_put_result,
                msg.dec_names):
        try:
            dec(data)
        except CodecError:
            pass


def test_bitmap_and_names():
    flags = np.array([True, False, True, True, False, False, False, False, True])
    assert msg.dec_bitmap(msg.enc_bitmap(flags)).tolist() == flags.tolist()
    assert msg.dec_name_only(msg.enc_name_only("sess/ü 1")) == "sess/ü 1"
    with pytest.raises(CodecError):
        msg.enc_name("")


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 64), st.integers(1, 16), st.booleans()), max_size=20))
def test_contiguous_runs_cover_every_item_once_and_join_only_back_to_back(items):
    from rdmakv.wire.runs import contiguous_runs

    groups, starts, lengths, joinable = (list(x) for x in zip(*items)) if items else ([], [], [], [])
    runs = contiguous_runs(groups, starts, lengths, joinable)
    assert sum(n for _, _, n in runs) == sum(lengths)
    i = 0
    for g, s, n in runs:  # each run is a prefix of the remaining items, each joined one back to back
        assert (groups[i], starts[i]) == (g, s)
        end, covered = s + lengths[i], lengths[i]
        i += 1
        while covered < n:
            assert groups[i] == g and starts[i] == end and joinable[i - 1]
            end, covered = end + lengths[i], covered + lengths[i]
            i += 1
    assert i == len(items)
