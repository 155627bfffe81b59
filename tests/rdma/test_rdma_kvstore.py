"""The kv_store_v1 library on real rxe: a restore's prefetch is one READ plan, with no GET_CHUNKS
at the server, from the Python backend and from the C consumer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import kvstore_abi as ka
from rdmakv.client.reports import RestoreReport
from rdmakv.llama.kvstore_backend import KV_OK, KVStoreBackend, Pending

from ..conftest import KEY_HEX, ServerProcess, request_counts

pytestmark = pytest.mark.rdma
CHAIN = Path(__file__).resolve().parents[1] / "kvstore_abi" / "chain_consumer.py"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = ServerProcess(str(tmp_path_factory.mktemp("kvs") / "d"), "128MiB", "--fsync", "never").start()
    assert s.rdma
    yield s
    s.stop()


def _pending(b: KVStoreBackend, hashes: list[bytes], chunks: list) -> Pending:
    """What the C side hands put_manifest: the engine's keys, lengths, offsets into one arena."""
    arena = b"".join(bytes(c) for c in chunks)
    lengths = np.array([len(c) for c in chunks], dtype=np.uint32)
    offsets = np.zeros(len(chunks), dtype=np.uint64)
    offsets[1:] = np.cumsum(lengths[:-1], dtype=np.uint64)
    keys = b.store_keys(b"".join(hashes), len(hashes), len(hashes[0]))
    return Pending(keys, lengths, offsets, memoryview(arena))


def test_backend_prefetch_is_one_read_plan(srv, monkeypatch):
    monkeypatch.setenv("RDMAKV_AUTH_KEY", KEY_HEX)
    uri = srv.url("kvs-py") + "?transport=rdma"
    chunks = ka.session_chunks(7)
    hashes = [ka.engine_hash(c) for c in chunks]
    save = KVStoreBackend(uri)
    try:
        assert save.put_manifest("chat", b"ENGM body", _pending(save, hashes, chunks)) == KV_OK
    finally:
        save.close()

    before = request_counts(srv.url("kvs-py"))
    b = KVStoreBackend(uri)
    try:
        assert b.store.active_transport == "rdma"
        assert b.get_manifest("chat") == b"ENGM body"
        keys = b.store_keys(b"".join(hashes), len(hashes), 8)
        (fetched,) = b.prefetch(keys)
        rep = b.last_prefetch
        assert rep.transport == "rdma" and rep.fallback_chunks == 0 and rep.reads_posted >= 1
        assert rep.chunks == len(chunks)
        view = memoryview(fetched.buffer)
        for i, c in enumerate(chunks):  # in one buffer, byte for byte, as the C side serves them
            o, n = int(fetched.offsets[i]), int(fetched.lengths[i])
            assert bytes(view[o : o + n]) == bytes(c)
    finally:
        b.close()
    after = request_counts(srv.url("kvs-py"))
    assert after.get("GET_CHUNKS", 0) == before.get("GET_CHUNKS", 0)  # every byte came by READ
    assert after["GET_MANIFEST"] == before.get("GET_MANIFEST", 0) + 1


def test_blocks_read_by_key_are_located_once_and_read_with_every_read_verified(srv, monkeypatch):
    """The paged-prefix-cache pattern: chain keys, a sentinel manifest after every block, then a
    prefetch of keys no manifest read names: one LOCATE, one READ plan, each READ checked against
    the store's check of the block; a READ that does not match its check is not returned."""
    monkeypatch.setenv("RDMAKV_AUTH_KEY", KEY_HEX)
    sys.path.insert(0, str(CHAIN.parent))
    import chain_consumer as cc

    uri = srv.url("kvs-chain") + "?transport=rdma"
    items = cc.blocks(16)
    b = KVStoreBackend(uri)
    try:
        for key, data in items:
            assert b.put_manifest(cc.SENTINEL.decode(), b"", _pending(b, [key], [data])) == KV_OK
        before = request_counts(srv.url("kvs-chain"))
        keys = b.store_keys(b"".join(k for k, _ in items), len(items), 32)
        (fetched,) = b.prefetch(keys)
        rep = b.last_prefetch
        assert rep.transport == "rdma" and rep.chunks == 16 and rep.fallback_chunks == 0 and rep.retried_chunks == 0
        after = request_counts(srv.url("kvs-chain"))
        assert after["LOCATE"] == before.get("LOCATE", 0) + 1
        assert after.get("GET_CHUNKS", 0) == before.get("GET_CHUNKS", 0)
        view = memoryview(fetched.buffer)
        for i, (_, data) in enumerate(items):
            o, n = int(fetched.offsets[i]), int(fetched.lengths[i])
            assert bytes(view[o : o + n]) == data
        # the same READs against checks that do not match: every chunk is refused, re-located, and
        # then fetched over TCP (where the store's own check holds): never the unverified bytes
        loc = b.store.channel.locate(keys)
        loc.checks = loc.checks + np.uint64(1)
        buf, offsets = b.store.fetch_located(keys, loc.lengths, loc, np.arange(16), rep := RestoreReport())
        assert rep.retried_chunks == 16 and rep.fallback_chunks == 0  # re-located: the fresh checks hold
        assert bytes(memoryview(buf)[int(offsets[3]) : int(offsets[3]) + len(items[3][1])]) == items[3][1]
    finally:
        b.close()


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_the_chain_consumer_prefetches_by_read_from_c(srv, tmp_path):
    lib = subprocess.run([sys.executable, "-m", "rdmakv", "kvstore-lib", "build", "--out", str(tmp_path / "lib")],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    env = {**os.environ, "RDMAKV_AUTH_KEY": KEY_HEX, "KV_STORE_LIBRARY_PATH": str(Path(lib).parent)}
    uri = srv.url("kvs-chain-c") + "?transport=rdma"
    p = subprocess.run([sys.executable, str(CHAIN), uri, "64"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    before = request_counts(srv.url("kvs-chain-c"))
    p = subprocess.run([sys.executable, str(CHAIN), uri, "64", "--read-only", "--prefetch"], capture_output=True,
                       text=True, env=env, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr  # every block compared byte for byte
    after = request_counts(srv.url("kvs-chain-c"))
    assert after["LOCATE"] == before.get("LOCATE", 0) + 1
    assert after.get("GET_CHUNKS", 0) == before.get("GET_CHUNKS", 0)  # every block came by READ


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_c_consumer_restores_over_reads(srv, tmp_path):
    lib = subprocess.run([sys.executable, "-m", "rdmakv", "kvstore-lib", "build", "--out", str(tmp_path / "lib")],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    consumer = ka.compile_consumer(tmp_path / "consumer")
    sessions = ka.write_sessions(tmp_path / "s.bin", [ka.session_chunks(8)])
    env = {"RDMAKV_AUTH_KEY": KEY_HEX}
    uri = srv.url("kvs-c") + "?transport=rdma"
    lib_dir = tmp_path / "lib"
    assert lib.startswith(str(lib_dir))
    p = ka.run(consumer, lib_dir, "save", uri, "chat", str(sessions), env=env)
    assert p.returncode == 0, p.stderr
    before = request_counts(srv.url("kvs-c"))
    p = ka.run(consumer, lib_dir, "restore", uri, "chat", str(sessions), env=env)
    assert p.returncode == 0, p.stdout + p.stderr  # compared byte for byte in C
    after = request_counts(srv.url("kvs-c"))
    assert after.get("GET_CHUNKS", 0) == before.get("GET_CHUNKS", 0)
    assert after["GET_MANIFEST"] == before.get("GET_MANIFEST", 0) + 1


def test_proxy_restores_slot_files_over_reads(srv, monkeypatch):
    """The proxy's pooled connections fetch a slot file's chunks by READ; the parts it writes
    are the file, byte for byte."""
    from rdmakv.client.reports import RestoreReport
    from rdmakv.llama.slotstore import get_slotfile_parts, put_slotfile
    from rdmakv.llama.store_pool import StorePool

    from ..slot_writer import Block, prompt_cells, write_slot

    monkeypatch.setenv("RDMAKV_AUTH_KEY", KEY_HEX)
    tokens = list(range(1, 301))
    data = write_slot("v3", tokens, [Block([prompt_cells(tokens, ext=True)])])
    pool = StorePool(srv.url("kvs-proxy"), "rdma", 64, size=2)
    try:
        rep_save, err = pool.run(put_slotfile, "slot.bin", data)
        assert err == "" and rep_save.chunks_sent > 1  # parsed and chunked, not stored whole
        before = request_counts(srv.url("kvs-proxy"))
        rep = RestoreReport()
        # the parts are views of the connection's buffer: joined while it is still held
        got = pool.run(lambda s: b"".join(get_slotfile_parts(s, "slot.bin", rep)[0]))
        assert got == data
        assert rep.transport == "rdma" and rep.fallback_chunks == 0
        assert request_counts(srv.url("kvs-proxy")).get("GET_CHUNKS", 0) == before.get("GET_CHUNKS", 0)
    finally:
        pool.close()


def test_batched_lookups_carry_the_checks_of_opaque_keys(srv, monkeypatch):
    """GET_MANIFESTS with locations, for sessions of opaque keys: each found session comes with the
    store's check of every chunk, so the READs that follow are verified as a LOCATE's are."""
    monkeypatch.setenv("RDMAKV_AUTH_KEY", KEY_HEX)
    sys.path.insert(0, str(CHAIN.parent))
    import chain_consumer as cc

    b = KVStoreBackend(srv.url("kvs-batch") + "?transport=rdma")
    try:
        items = cc.blocks(6)
        for i in range(2):
            part = items[3 * i : 3 * i + 3]
            assert b.put_manifest(f"s{i}", b"body", _pending(b, [k for k, _ in part], [d for _, d in part])) == KV_OK
        found, regions = b.store.get_manifests(["s0", "s1", "absent"], want_locations=True)
        assert regions is not None and found[2].status != 0
        for i, f in enumerate(found[:2]):
            assert f.slots is not None and f.checks is not None and f.check_alg != 0
            keys = b.store_keys(b"".join(k for k, _ in items[3 * i : 3 * i + 3]), 3, 32)
            fresh = b.store.channel.locate(keys)
            assert f.checks.tobytes() == fresh.checks.tobytes()
            loc = type(fresh)(regions, f.slots, f.checks, f.check_alg)
            buf, offsets = b.store.fetch_located(keys, fresh.lengths, loc, np.arange(3), rep := RestoreReport())
            assert rep.transport == "rdma" and rep.retried_chunks == 0 and rep.fallback_chunks == 0
            data = items[3 * i + 1][1]
            assert bytes(memoryview(buf)[int(offsets[1]) : int(offsets[1]) + len(data)]) == data
    finally:
        b.close()
