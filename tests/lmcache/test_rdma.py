"""The plugin on real rxe (in the guest): a retrieve READs straight into the MemoryObjs LMCache
allocated, inside LMCache's buffer registered once, with no request to the server; saves WRITE."""

from __future__ import annotations

import pytest
import torch

from rdmakv.lmcache.cpu_engine import Model, kv_for, prompt, remote_connector, same_bytes

from ..conftest import ServerProcess, request_counts

pytestmark = pytest.mark.rdma
SMALL = Model(layers=4)
SERVER_OPS = ("GET_MANIFEST", "GET_MANIFESTS", "HAS_MANIFESTS", "GET_CHUNKS", "LOCATE", "EXISTS")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = ServerProcess(str(tmp_path_factory.mktemp("lmc") / "d"), "512MiB", "--fsync", "never").start()
    assert s.rdma
    yield s
    s.stop()


def test_a_retrieve_reads_by_rdma_into_lmcache_buffer_and_asks_the_server_nothing(srv, engines):
    url = srv.url("lmc-rdma")
    writer = engines(url + "?transport=rdma", SMALL)
    tokens = prompt(31, 1000)
    kv = kv_for(tokens, SMALL)
    writer.store(tokens, kv=kv)
    wconn = remote_connector(writer)
    assert wconn.wait_saves(4, timeout=60)
    # the three full chunks WRITE their pieces (the partial one's mixed piece sizes take more slab
    # runs than a reservation has windows: the server answers it over TCP)
    assert wconn.counters["values_sent_by_rdma"] >= 3, wconn.stats()

    eng = engines(url + "?transport=rdma", SMALL)
    conn = remote_connector(eng)
    for attempt in range(3):
        before = request_counts(url)
        assert eng.lookup(tokens) == 1000
        out = torch.zeros_like(kv)
        assert int(eng.retrieve(tokens, kv=out).sum()) == 1000
        after = request_counts(url)
        assert same_bytes(out, kv)
        rep = conn.last_get
        assert rep.transport == "rdma"
        assert rep.fallback_chunks == 0 and rep.reads_posted >= 1
        assert conn.counters["values_retrieved_rdma"] == 4 * (attempt + 1)
        assert conn.counters.get("values_retrieved_tcp", 0) == 0
        # one-sided: neither the lookups nor the retrieve reached the server
        assert {op: after.get(op, 0) - before.get(op, 0) for op in SERVER_OPS} == dict.fromkeys(SERVER_OPS, 0)
    assert conn.counters["buffer_registrations"] == 1  # LMCache's buffer: registered once, not per object
    assert conn.counters["contains_one_sided"] >= 3 * 4


def test_a_tcp_connection_in_the_same_guest_says_tcp(srv, engines):
    url = srv.url("lmc-tcp")
    eng = engines(url + "?transport=tcp", SMALL)
    tokens = prompt(32, 512)
    kv = kv_for(tokens, SMALL)
    eng.store(tokens, kv=kv)
    conn = remote_connector(eng)
    assert conn.wait_saves(2, timeout=60)
    out = torch.zeros_like(kv)
    assert int(eng.retrieve(tokens, kv=out).sum()) == 512 and same_bytes(out, kv)
    assert conn.last_get.transport == "tcp" and conn.counters.get("values_retrieved_rdma", 0) == 0
    assert conn.counters.get("buffer_registrations", 0) == 0
