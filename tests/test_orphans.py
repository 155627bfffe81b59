"""Chunks that outlive their last manifest, as cache: kept and readable by key after an overwrite,
the first to go under memory and disk pressure, charged to their namespace and quota, freed at once
(with every earlier version's) by a delete. Real `rdmakv serve` processes."""

from __future__ import annotations

import numpy as np

import rdmakv
from rdmakv import kvgen
from rdmakv.hashing import KEY_OPAQUE_XXH3, keys_array, opaque_key
from rdmakv.kvgen import ModelShape
from rdmakv.wire import manifest as mf

from .conftest import KEY_HEX

SHAPE = ModelShape("orphan", 4, 128, 128)  # 2 KiB per token per layer pair: 200 tokens = 400 KiB


def _kv(seed: int, n: int = 200) -> rdmakv.KVState:
    return kvgen.generate(kvgen.token_stream(seed, n), SHAPE)


def _connect(srv, ns: str) -> rdmakv.Store:
    return rdmakv.connect(srv.url(ns), key=KEY_HEX, transport="tcp", window=32)


def _blocks(st: rdmakv.Store, name: str, keys: list[bytes], size: int = 64 << 10) -> list[bytes]:
    """An engine's blocks under opaque keys, each committed alone under ``name`` (a sentinel that
    is rewritten every time); returns the blocks' bytes."""
    out = []
    for i, k in enumerate(keys):
        data = np.random.default_rng(i).bytes(size)
        key = opaque_key(k)
        st.channel.put_chunks([key], [data])
        m = mf.Manifest(mf.KIND_ENGINE, b"", keys_array([key], KEY_OPAQUE_XXH3), [size], [0], KEY_OPAQUE_XXH3)
        assert len(st.put_manifest(name, m)) == 0
        out.append(data)
    return out


def test_an_overwrite_keeps_the_old_chunks_readable_by_key(fresh_server):
    srv = fresh_server("64MiB")
    with _connect(srv, "o") as st:
        old, new = _kv(1), _kv(2)
        st.save("s", old)
        old_keys = st.get_manifest("s").keys
        st.save("s", new)
        new_keys = st.get_manifest("s").keys  # this lookup lets go of the one that held the old version
        stats = st.stats()
        assert stats["orphan_chunks"] == len(set(old_keys.tolist()) - set(new_keys.tolist()))
        assert stats["orphan_chunks"] > 0 and stats["orphan_bytes"] > 0 and stats["orphans_kept"] > 0
        got = st.get_chunks(old_keys.tolist())
        assert all(g is not None for g in got)  # every old chunk, verified against its key
        st.save("s", old)  # the old version again: its chunks are live, not orphans, and were not re-sent
        stats2 = st.stats()
        assert stats2["orphans_reused"] > 0 and stats2["chunks_stored"] == stats["chunks_stored"]
        assert st.restore("s").equals(old)


def test_orphans_lose_memory_before_any_session_is_demoted(fresh_server):
    srv = fresh_server("4MiB", "--disk-capacity", "64MiB")
    with _connect(srv, "m") as st:
        keep = {f"s{i}": _kv(10 + i) for i in range(3)}  # 1.2 MiB of sessions that must stay resident
        for name, kv in keep.items():
            st.save(name, kv)
        for v in range(5):  # 4 replaced versions: 1.6 MiB of orphans
            st.save("churn", _kv(100 + v))
        for i in range(2):  # more sessions: memory must come from the orphans
            st.save(f"t{i}", _kv(200 + i))
        stats = st.stats()
        assert stats["orphans_shed"] > 0 and stats["demotions"] == 0, stats
        for name, kv in keep.items():
            got, rep = st.restore(name, report=True)
            assert got.equals(kv) and rep.tier == "memory"


def test_orphans_leave_the_disk_before_any_session_is_evicted(fresh_server):
    srv = fresh_server("4MiB", "--disk-capacity", "6MiB")
    with _connect(srv, "d") as st:
        keep = {f"s{i}": _kv(10 + i) for i in range(4)}  # 1.6 MiB
        for name, kv in keep.items():
            st.save(name, kv)
        for v in range(12):  # 11 replaced versions: 4.4 MiB of orphans, more than the disk tier has left
            st.save("churn", _kv(300 + v))
        stats = st.stats()
        assert stats["orphans_evicted"] > 0 and stats["evictions"] == 0, stats
        assert stats["disk_bytes"] <= 6 << 20
        for name, kv in keep.items():
            assert st.restore(name).equals(kv)


def test_a_quota_counts_orphans_and_a_namespace_sheds_its_own_first(fresh_server):
    srv = fresh_server("16MiB", "--quota", "q=2MiB", "--quota", "other=8MiB")
    with _connect(srv, "q") as st, _connect(srv, "other") as other:
        other.save("theirs", _kv(1))
        before = other.stats()["used_bytes"]
        blocks = _blocks(st, "idx", [b"block-%d" % i for i in range(24)])  # 1.5 MiB, 23 of them orphans
        stats = st.stats()
        assert stats["orphan_chunks"] == 23 and stats["used_bytes"] >= 23 * (64 << 10)  # charged to q
        for v in range(3):  # q goes over its quota: its own orphans go first, then its own sessions
            st.save(f"big{v}", _kv(400 + v))
        stats = st.stats()
        assert stats["used_bytes"] <= 2 << 20 and stats["orphans_shed"] > 0
        assert other.stats()["used_bytes"] == before  # another tenant's quota pressure never touched it
        got = st.get_chunks([opaque_key(b"block-0")])  # shed from memory, still on disk: readable
        assert got == [blocks[0]]


def test_a_delete_frees_its_chunks_and_the_orphans_of_its_earlier_versions(fresh_server, tmp_path):
    srv = fresh_server("64MiB", "--disk-capacity", "256MiB")
    secret_v1, secret_v2 = kvgen.token_stream(4242, 200), kvgen.token_stream(4343, 200)
    with _connect(srv, "del") as st:
        st.save("secret", kvgen.generate(secret_v1, SHAPE))
        v1_keys = st.get_manifest("secret").keys.tolist()
        st.save("secret", kvgen.generate(secret_v2, SHAPE))
        v2_keys = st.get_manifest("secret").keys.tolist()
        st.save("other", _kv(7))
        st.get_manifest("other")  # let go of the lookup of "secret"
        assert st.stats()["orphan_chunks"] > 0
        st.delete_manifest("secret")
        assert st.stats()["orphan_chunks"] == 0
        assert st.get_chunks(v1_keys + v2_keys) == [None] * len(v1_keys + v2_keys)
        st.compact()
    srv.stop()
    v1_bytes = kvgen.generate(secret_v1, SHAPE).k[0][:4].tobytes()
    v2_bytes = kvgen.generate(secret_v2, SHAPE).k[0][:4].tobytes()
    for p in (tmp_path / "data0").iterdir():
        data = p.read_bytes()
        assert v1_bytes not in data and v2_bytes not in data, f"a deleted version's KV is still in {p.name}"


def test_orphans_do_not_survive_a_restart_and_sessions_do(fresh_server):
    srv = fresh_server("64MiB", "--fsync", "always")
    with _connect(srv, "r") as st:
        _blocks(st, "idx", [b"k%d" % i for i in range(4)])
        assert st.stats()["orphan_chunks"] == 3
    srv.stop()
    srv.start()
    with _connect(srv, "r") as st:
        assert st.stats()["orphan_chunks"] == 0 and st.stats()["chunks"] == 1
        assert st.get_chunks([opaque_key(b"k3")])[0] is not None  # the sentinel's own block
        assert st.get_chunks([opaque_key(b"k0")]) == [None]
