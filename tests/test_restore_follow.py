"""A TCP restore in one round trip: the session's first chunks follow its manifest
(messages.GET_WITH_CHUNKS), against a real server process."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rdmakv
from rdmakv import kvgen
from rdmakv.errors import CodecError
from rdmakv.kvgen import ModelShape
from rdmakv.wire import manifest as mf
from rdmakv.wire import messages as msg

from .conftest import KEY_HEX, request_counts

QWEN = ModelShape("qwen", 24, 128, 128)


def _kv(seed: int, n: int, shape: ModelShape = QWEN):
    return kvgen.generate(kvgen.token_stream(seed, n), shape)


@given(st.binary(max_size=64), st.sampled_from(msg.TIERS), st.booleans())
def test_the_manifest_reply_says_whether_chunks_follow(manifest, tier, follows):
    data = b"".join(bytes(p) for p in msg.enc_manifest_reply(manifest, None, tier, follows=follows))
    got, loc, tier2, follows2 = msg.dec_manifest_reply(data)
    assert (bytes(got), loc, tier2, follows2) == (manifest, None, tier, follows)


def test_chunks_never_follow_a_reply_with_locations():
    from rdmakv.wire.locations import LOCATION_DTYPE, REGION_DTYPE

    loc = msg.Locations(np.zeros(0, dtype=REGION_DTYPE), np.zeros(0, dtype=LOCATION_DTYPE))
    with pytest.raises(ValueError):
        msg.enc_manifest_reply(b"m", loc, "memory", follows=True)
    forged = bytearray(b"".join(bytes(p) for p in msg.enc_manifest_reply(b"m", loc, "memory")))
    forged[4 + 1] |= msg.FOLLOWS
    with pytest.raises(CodecError):
        msg.dec_manifest_reply(forged)


def test_a_small_session_is_restored_in_one_round_trip(server, ns):
    kv = _kv(1, 256)
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as s:
        s.save("one", kv)
        before = request_counts(server.url(ns))
        got, rep = s.restore("one", report=True)
        after = request_counts(server.url(ns))
    assert got.equals(kv)
    assert rep.round_trips == 1 and rep.transport == "tcp"
    assert after["GET_MANIFEST"] - before.get("GET_MANIFEST", 0) == 1
    assert after.get("GET_CHUNKS", 0) == before.get("GET_CHUNKS", 0)  # no second request


def test_a_session_larger_than_what_follows_fetches_the_rest(fresh_server):
    srv = fresh_server("256MiB", "--max-frame", "1MiB")  # what follows fits one frame: < 1 MiB
    kv = _kv(2, 1024)  # 12 MiB
    with rdmakv.connect(srv.url("big"), key=KEY_HEX, transport="tcp") as s:
        s.save("big", kv)
        got, rep = s.restore("big", report=True)
        assert got.equals(kv) and rep.round_trips >= 2  # (GET_CHUNKS replies of < 1 MiB each, too)
        again = s.restore("big")  # the stream stayed in step
    assert again.equals(kv)


def test_chunks_nobody_took_are_read_past(server, ns):
    """A lookup whose restore never came to its fill (the caller stopped, or filled something
    else): the next request reads past the chunks that followed, and the connection goes on."""
    kv, other = _kv(3, 128), _kv(4, 64)
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as s:
        s.save("a", kv)
        s.save("b", other)
        ch = s.channel
        ch.get_manifest_with_chunks("a")
        assert ch.following
        assert ch.exists(np.zeros(1, dtype=np.uint64)).tolist() == [False]  # read past them first
        assert not ch.following
        ch.get_manifest_with_chunks("a")
        m = mf.decode(ch.get_manifest("b")[0])  # (this request read past them too)
        ch.get_manifest_with_chunks("a")
        keys = list(dict.fromkeys(m.keys.tolist()))
        lengths = [int(m.lengths[m.keys.tolist().index(k)]) for k in keys]
        buf = memoryview(bytearray(sum(lengths)))
        offsets = np.cumsum([0, *lengths[:-1]]).tolist()
        assert ch.take_following(keys, lengths, buf, offsets) == set()  # not b's: none taken
        assert s.restore("a").equals(kv) and s.restore("b").equals(other)


def test_a_demoted_session_comes_back_without_chunks_following(fresh_server):
    srv = fresh_server("16MiB")
    first = _kv(5, 512)  # 6 MiB: the next two saves demote it to disk
    with rdmakv.connect(srv.url("d"), key=KEY_HEX, transport="tcp") as s:
        s.save("first", first)
        s.save("x", _kv(6, 512))
        s.save("y", _kv(7, 512))
        before = request_counts(srv.url("d"))
        got, rep = s.restore("first", report=True)
        after = request_counts(srv.url("d"))
    assert got.equals(first) and rep.tier == "disk"
    assert after["GET_CHUNKS"] > before.get("GET_CHUNKS", 0)  # asked for, as they are read from the log
