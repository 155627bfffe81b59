"""The kv_store_v1 library on real rxe: a restore's prefetch is one READ plan, with no GET_CHUNKS
at the server, from the Python backend and from the C consumer."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from bench import kvstore_abi as ka
from rdmakv.llama.kvstore_backend import KV_OK, KVStoreBackend

from ..conftest import KEY_HEX, ServerProcess, request_counts

pytestmark = pytest.mark.rdma


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = ServerProcess(str(tmp_path_factory.mktemp("kvs") / "d"), "128MiB", "--fsync", "never").start()
    assert s.rdma
    yield s
    s.stop()


def test_backend_prefetch_is_one_read_plan(srv, monkeypatch):
    monkeypatch.setenv("RDMAKV_AUTH_KEY", KEY_HEX)
    uri = srv.url("kvs-py") + "?transport=rdma"
    chunks = ka.session_chunks(7)
    hashes = [ka.engine_hash(c) for c in chunks]
    save = KVStoreBackend(uri)
    try:
        for h, c in zip(hashes, chunks):
            assert save.put_chunk(h, memoryview(c)) == KV_OK
        assert save.put_manifest("chat", b"ENGM body") == KV_OK
    finally:
        save.close()

    before = request_counts(srv.url("kvs-py"))
    b = KVStoreBackend(uri)
    try:
        assert b.store.active_transport == "rdma"
        assert b.get_manifest("chat") == b"ENGM body"
        assert b.prefetch_chunks(b"".join(hashes), len(hashes), 8) == len(hashes)
        rep = b.last_prefetch
        assert rep.transport == "rdma" and rep.fallback_chunks == 0 and rep.reads_posted >= 1
        assert rep.chunks == len(chunks)
        for h, c in zip(hashes, chunks):
            assert bytes(b.get_chunk(h)) == bytes(c)  # from the cache, byte for byte
    finally:
        b.close()
    after = request_counts(srv.url("kvs-py"))
    assert after.get("GET_CHUNKS", 0) == before.get("GET_CHUNKS", 0)  # every byte came by READ
    assert after["GET_MANIFEST"] == before.get("GET_MANIFEST", 0) + 1


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
    from rdmakv.kvstate import RestoreReport
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
