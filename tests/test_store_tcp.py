"""Save/restore against a real server process over loopback TCP."""

from __future__ import annotations

import numpy as np
import pytest

import rdmakv
from rdmakv import kvgen
from rdmakv.kvgen import ModelShape

from .conftest import run_concurrently


def _store(server, ns, key, **kw):
    return rdmakv.connect(server.url(ns), key=key, transport="tcp", **kw)


SHAPES = [
    (ModelShape("tiny", 1, 8, 8), 1, 1, False),
    (ModelShape("tiny", 2, 16, 32, "<f4"), 7, 3, False),
    (ModelShape("qwen", 24, 128, 128), 256, 64, False),
    (ModelShape("qwen", 24, 128, 128), 257, 64, False),
    (ModelShape("odd", 3, 40, 24), 100, 256, False),  # W larger than the session
    (ModelShape("vt", 4, 64, 64), 130, 32, True),  # transposed V
    (ModelShape("bf", 2, 96, 96, "<u2"), 33, 8, True),
    (ModelShape("f64", 2, 5, 3, "<f8"), 19, 4, False),
]


@pytest.mark.parametrize("shape,n,w,vt", SHAPES)
def test_save_restore_bit_exact(server, ns, key, shape, n, w, vt):
    kv = kvgen.generate(kvgen.token_stream(n, n), shape, v_trans=vt)
    with _store(server, ns, key, window=w) as st:
        rep = st.save("s", kv)
        assert rep.chunks_total > 0 and rep.chunks_sent + rep.chunks_skipped == len(
            np.unique(st.get_manifest("s").keys)
        )
        got, rrep = st.restore("s", report=True)
    assert got.equals(kv)
    assert got.v_trans == vt and got.k[0].dtype == kv.k[0].dtype
    assert rrep.transport == "tcp" and rrep.chunks == rep.chunks_total and rrep.bytes > kv.nbytes


def test_multi_turn_chat_dedups_all_but_the_new_tail(server, ns, key):
    full = kvgen.generate(kvgen.token_stream(5, 320))
    w = 64
    with _store(server, ns, key, window=w) as st:
        prev = 0
        for n in (64, 130, 256, 320):
            kv = rdmakv.KVState([k[:n] for k in full.k], [v[:n] for v in full.v], full.tokens[:n])
            rep = st.save(f"turn{n}", kv)
            # only windows at or after the previous turn's last full window are new
            first_new = prev // w
            n_windows = -(-n // w)
            assert rep.chunks_sent == 2 * 24 * (n_windows - first_new), (n, rep)
            prev = n
            assert st.restore(f"turn{n}").equals(kv)


def test_cross_session_prefix_dedup(server, ns, key):
    prompt = kvgen.token_stream(9, 25)
    a = kvgen.generate(np.concatenate([prompt, kvgen.token_stream(10, 40)]))
    b = kvgen.generate(np.concatenate([prompt, kvgen.token_stream(11, 40)]))
    with _store(server, ns, key, window=8) as st:
        st.save("a", a)
        rep = st.save("b", b)
        # 25 shared tokens = 3 full windows of 8, for K and V of 24 layers
        assert rep.chunks_skipped == 3 * 2 * 24
        assert st.restore("a").equals(a) and st.restore("b").equals(b)
    with _store(server, ns + "-w64", key, window=64) as st:
        st.save("a", a)
        assert st.save("b", b).chunks_skipped == 0  # W larger than the prefix: nothing shared


def test_warm_save_is_one_round_trip(server, ns, key):
    kv = kvgen.generate(kvgen.token_stream(3, 256))
    with _store(server, ns, key, window=64) as st:
        st.save("s", kv)
        fs = st.channel.fs
        frames_out, frames_in = fs.frames_sent, fs.frames_received
        rep = st.save("s", kv)
        assert (fs.frames_sent - frames_out, fs.frames_received - frames_in) == (1, 1)
        assert rep.round_trips == 1 and rep.chunks_sent == 0 and rep.chunks_skipped == 2 * 24 * 4
        assert rep.bytes_on_wire < 8 << 10
        # a save under a new name of the same KV is warm too
        assert st.save("other-name", kv).round_trips == 1


def test_cold_save_round_trips_and_report(server, ns, key):
    kv = kvgen.generate(kvgen.token_stream(4, 256))
    with _store(server, ns, key, window=64) as st:
        rep = st.save("s", kv)
    assert rep.round_trips == 3  # commit attempt -> pipelined puts -> commit
    assert rep.chunks_total == 192 and rep.chunks_sent == 192 and rep.chunks_skipped == 0
    assert rep.bytes_on_wire > kv.nbytes and rep.wall_s > 0


def test_low_level_calls(server, ns, key):
    with _store(server, ns, key) as st:
        keys = st.put_chunks([b"alpha" * 10, b"beta" * 100])
        assert st.exists(keys + [123]).tolist() == [True, True, False]
        assert st.get_chunks(keys + [123]) == [b"alpha" * 10, b"beta" * 100, None]
        assert st.prefetch(keys) == 450
        r = st.put_blob("blob", b"x" * 1000)
        assert st.get_blob("blob") == b"x" * 1000 and r.round_trips == 3
        names = [e["name"] for e in st.list()]
        assert names == ["blob"]
        st.delete_manifest("blob")
        assert st.list() == []
        with pytest.raises(rdmakv.NotFoundError):
            st.get_manifest("blob")
        stats = st.stats()
        assert stats["namespace"] == ns and stats["manifests"] == 0


def test_namespaces_do_not_see_each_other(server, ns, key):
    kv = kvgen.generate(kvgen.token_stream(1, 16), ModelShape("t", 1, 8, 8))
    with _store(server, ns + "-a", key) as a, _store(server, ns + "-b", key) as b:
        a.save("secret", kv)
        assert b.list() == []
        with pytest.raises(rdmakv.NotFoundError):
            b.restore("secret")
        # chunks are per namespace too: B cannot fetch A's chunk by key
        key0 = int(a.get_manifest("secret").keys[0])
        assert b.get_chunks([key0]) == [None]


def test_many_concurrent_clients(server, ns, key):
    def worker(i: int) -> None:
        kv = kvgen.generate(kvgen.token_stream(1000 + i, 64 + i), ModelShape("c", 4, 32, 32))
        with _store(server, ns, key, window=16) as st:
            for j in range(5):
                st.save(f"w{i}-{j}", kv)
                assert st.restore(f"w{i}-{j}").equals(kv)

    errors = run_concurrently(worker, 12)
    assert not errors, errors


def test_stats_count_the_bytes_each_namespace_received_and_sent(server, ns, key):
    kv = kvgen.generate(kvgen.token_stream(3, 64), kvgen.QWEN25_05B)
    with _store(server, ns, key) as st:
        s0 = st.stats()
        st.save("s", kv)
        st.restore("s")
        s1 = st.stats()
    assert s1["bytes_received"] - s0["bytes_received"] >= kv.nbytes  # the chunks came in once
    assert s1["bytes_sent"] - s0["bytes_sent"] >= kv.nbytes  # and went out once


def test_has_manifests_answers_many_names_in_one_request_and_touches_nothing(server, ns, key):
    from rdmakv.errors import CodecError

    from .conftest import request_counts

    with _store(server, ns, key) as st:
        for i in range(0, 64, 3):
            st.put_blob(f"n{i}", b"x" * (i + 1))
        before = request_counts(server.url(ns))
        got = st.has_manifests([f"n{i}" for i in range(64)])
        after = request_counts(server.url(ns))
        assert got.tolist() == [i % 3 == 0 for i in range(64)]
        assert after["HAS_MANIFESTS"] - before.get("HAS_MANIFESTS", 0) == 1
        assert after.get("GET_MANIFEST", 0) == before.get("GET_MANIFEST", 0)
        assert st.stats()["restores"] == 0  # a probe is not a restore
        st.delete_manifest("n0")
        assert st.has_manifests(["n0", "n3"]).tolist() == [False, True]
        assert st.has_manifests([]).tolist() == []
        with pytest.raises(CodecError):
            st.has_manifests(["bad\nname"])
        assert st.has_manifests(["n3"]).tolist() == [True]  # the connection is still in step
