"""The RDMA restore path on real rxe (runs inside the guest: `rdmakv rxe-vm -- pytest -m rdma`)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import rdmakv
from rdmakv import kvgen, rdma
from rdmakv.errors import RdmakvError
from rdmakv.kvgen import ModelShape

from ..conftest import KEY_HEX, run_concurrently

pytestmark = pytest.mark.rdma

QWEN = kvgen.QWEN25_05B


def _rdma(server, ns, window=64, **kw):
    st = rdmakv.connect(server.url(ns), key=KEY_HEX, transport="rdma", window=window, **kw)
    assert st.active_transport == "rdma", st.rdma_reason
    return st


@pytest.mark.parametrize(
    "shape,n,w,vt",
    [
        (QWEN, 256, 64, False),
        (QWEN, 257, 64, False),
        (QWEN, 300, 8, False),  # many small chunks
        (ModelShape("vt", 4, 64, 64), 130, 32, True),  # transposed V: one big chunk per layer
        (ModelShape("odd", 3, 40, 24, "<f4"), 77, 16, False),  # slot slack -> scratch SGEs
        (ModelShape("tiny", 1, 8, 8), 1, 1, False),
    ],
)
def test_restore_over_rdma_bit_exact(server, ns, shape, n, w, vt):
    kv = kvgen.generate(kvgen.token_stream(n + w, n), shape, v_trans=vt)
    with _rdma(server, ns, w) as st:
        st.save("s", kv)
        got, rep = st.restore("s", report=True)
        st.rdma.one_sided = False  # the lookup over TCP (GET_MANIFEST with locations), as before the index
        got_tcp, rep_tcp = st.restore("s", report=True)
    assert got.equals(kv) and got_tcp.equals(kv)
    assert (rep.transport, rep.lookup, rep.round_trips, rep.fallback_chunks) == ("rdma", "one-sided", 0, 0), rep
    assert (rep_tcp.transport, rep_tcp.lookup, rep_tcp.round_trips, rep_tcp.fallback_chunks) == ("rdma", "tcp", 1, 0)
    assert 0 < rep.reads_posted - 2 < rep.chunks or rep.chunks <= 2, rep  # adjacent chunks merged (+ index, blob)


def test_fresh_save_is_a_handful_of_reads(server, ns):
    kv = kvgen.generate(kvgen.token_stream(1, 256), QWEN)
    with _rdma(server, ns, 64) as st:
        st.save("s", kv)
        _, rep = st.restore("s", report=True)
    assert rep.chunks == 192 and rep.reads_posted <= 4 + 2, rep  # + the index entries and the blob


def test_long_session_16k_tokens(server, ns):
    shape = ModelShape("long", 8, 64, 64)
    kv = kvgen.generate(kvgen.token_stream(16, 16384), shape)
    with _rdma(server, ns, 256) as st:
        st.save("long", kv)
        got, rep = st.restore("long", report=True)
        assert got.equals(kv)
        assert rep.transport == "rdma" and rep.reads_posted < rep.chunks // 4, rep
        # restored arrays are views of the registered pool: no copy after the READ
        assert got.k[0].base is not None and not got.k[0].flags.owndata


def test_server_cpu_rdma_is_a_small_fraction_of_tcp(fresh_server, capsys):
    srv = fresh_server("256MiB", "--fsync", "never")
    kv = kvgen.generate(kvgen.token_stream(2, 256), QWEN)
    with _rdma(srv, "cpu") as rd, rdmakv.connect(srv.url("cpu"), key=KEY_HEX, transport="tcp") as tcp:
        rd.save("s", kv)
        rd.restore("s")
        tcp.restore("s")
        c0 = srv.cpu_ticks()
        for _ in range(100):
            tcp.restore("s")
        c1 = srv.cpu_ticks()
        for _ in range(100):
            rd.restore("s")
        c2 = srv.cpu_ticks()
    tcp_ticks, rdma_ticks = c1 - c0, c2 - c1
    with capsys.disabled():
        print(f"\n[server CPU] 100 TCP restores: {tcp_ticks} ticks; 100 RDMA restores: {rdma_ticks} ticks; "
              f"ratio {rdma_ticks / max(tcp_ticks, 1):.3f} (CLK_TCK={os.sysconf('SC_CLK_TCK')})")
    assert tcp_ticks >= 10, "TCP restores should cost the server measurable CPU"
    assert rdma_ticks <= 0.5 * tcp_ticks


def test_tenant_isolation_foreign_rkey_is_a_remote_access_error(server, ns):
    secret = kvgen.generate(kvgen.token_stream(3, 64), QWEN)
    with _rdma(server, ns + "-b", 64) as b, _rdma(server, ns + "-a", 64) as a:
        b.save("secret", secret)
        _, loc, _ = b.channel.get_manifest("secret", want_locations=True)
        region = loc.regions[0]
        slot = loc.slots[0]
        dest, daddr, dlkey = a.rdma.pool.alloc(4096)
        dest[:] = 0xAB
        op = (int(region["addr"]) + int(slot["offset"]), int(region["rkey"]), [(daddr, 4096, dlkey)])
        with pytest.raises(rdma.WorkCompletionError) as err:
            a.rdma.requester.read([op], timeout=30)
        assert "REM_ACCESS" in err.value.status_name.upper() or "remote access" in str(err.value).lower()
        assert (dest == 0xAB).all(), "a byte of tenant B reached tenant A"
        # A's own data path still works (a new connection: the failed QP is dead)
    with _rdma(server, ns + "-a", 64) as a2:
        a2.save("mine", secret)
        assert a2.restore("mine").equals(secret)


def test_stale_location_is_detected_and_retried(server, ns):
    a = kvgen.generate(kvgen.token_stream(41, 256), QWEN)
    b = kvgen.generate(kvgen.token_stream(42, 256), QWEN)
    with _rdma(server, ns, 64) as reader, rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp", window=64) as w:
        w.save("A", a)
        w.save("other", b)

        def reuse_slots() -> None:  # between LOCATE and READ: free A's slots, fill them with B, move A
            reader.channel.get_manifest("other")  # the reader's lookup of A no longer holds it
            w.delete_manifest("A")
            w.delete_manifest("other")
            w.save("B", b)
            w.save("A", a)

        got, rep = reader.restore("A", report=True, after_locate=reuse_slots)
    assert got.equals(a)
    assert rep.retried_chunks > 0 and rep.transport == "rdma", rep


def test_a_lookup_holds_its_version_while_the_reads_run(server, ns):
    """The restore's lookup holds version A: a delete and re-save racing the READs cannot reuse
    its slots, so the READs need no retry at all."""
    a = kvgen.generate(kvgen.token_stream(43, 256), QWEN)
    b = kvgen.generate(kvgen.token_stream(44, 256), QWEN)
    with _rdma(server, ns, 64) as reader, rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp", window=64) as w:
        w.save("A", a)

        def overwrite() -> None:
            w.delete_manifest("A")
            w.save("B", b)
            w.save("A", b)

        got, rep = reader.restore("A", report=True, after_locate=overwrite)
        assert got.equals(a)  # the version it looked up, whole
        assert rep.transport == "rdma" and rep.retried_chunks == 0 and rep.fallback_chunks == 0, rep
        assert reader.restore("A").equals(b)  # and the next lookup sees the new one


def test_server_killed_mid_restore(fresh_server):
    srv = fresh_server("256MiB")
    kv = kvgen.generate(kvgen.token_stream(5, 512), QWEN)
    with _rdma(srv, "k", 64) as st:
        st.save("s", kv)
        with pytest.raises(RdmakvError) as err:
            st.restore("s", after_locate=srv.kill9)
        assert "connection" in str(err.value).lower() or "lost" in str(err.value).lower()
    srv.start()  # after a restart: restore works again, bit-exact (RDMA on a new connection)
    with _rdma(srv, "k", 64) as st:
        got, rep = st.restore("s", report=True)
        assert got.equals(kv) and rep.transport == "rdma"


def test_fallback_when_the_server_has_no_rdma(fresh_server):
    srv = fresh_server("128MiB", "--transport", "tcp")
    kv = kvgen.generate(kvgen.token_stream(6, 100), QWEN)
    with rdmakv.connect(srv.url("f"), key=KEY_HEX, transport="auto", window=64) as st:
        st.save("s", kv)
        got, rep = st.restore("s", report=True)
    assert got.equals(kv) and rep.transport == "tcp" and "server has no RDMA" in rep.fallback_reason
    with pytest.raises(RdmakvError, match="RDMA is unavailable"):
        rdmakv.connect(srv.url("f"), key=KEY_HEX, transport="rdma")


def test_fallback_when_the_client_has_no_device(server, ns, monkeypatch):
    monkeypatch.setenv("RDMAKV_RDMA_DEVICE", "no_such_dev0")
    kv = kvgen.generate(kvgen.token_stream(7, 100), QWEN)
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="auto", window=64) as st:
        st.save("s", kv)
        got, rep = st.restore("s", report=True)
    assert got.equals(kv) and rep.transport == "tcp" and "no_such_dev0" in rep.fallback_reason


def test_work_completion_error_latches_tcp(server, ns):
    kv = kvgen.generate(kvgen.token_stream(8, 64), QWEN)
    with _rdma(server, ns, 64) as st:
        st.save("s", kv)
        # break the QP with a READ the responder must refuse (bogus rkey)
        dest, daddr, dlkey = st.rdma.pool.alloc(64)
        with pytest.raises(rdma.WorkCompletionError):
            st.rdma.requester.read([(0x1000, 0xDEAD, [(daddr, 64, dlkey)])], timeout=30)
        got, rep = st.restore("s", report=True)
        assert got.equals(kv) and rep.transport == "tcp" and "RDMA" in rep.fallback_reason, rep
        assert st.active_transport == "tcp"


def test_concurrent_rdma_restores(server, ns):
    kvs = [kvgen.generate(kvgen.token_stream(60 + i, 128), QWEN) for i in range(4)]

    def worker(i: int) -> None:
        with _rdma(server, ns, 64) as st:
            st.save(f"s{i}", kvs[i])
            for _ in range(5):
                assert st.restore(f"s{i}").equals(kvs[i])

    errors = run_concurrently(worker, 4)
    assert not errors, errors


def test_pool_memory_is_reused_not_reregistered(server, ns):
    kv = kvgen.generate(kvgen.token_stream(9, 256), QWEN)
    with _rdma(server, ns, 64) as st:
        st.save("s", kv)
        for _ in range(30):
            assert st.restore("s").equals(kv)
        assert len(st.rdma.pool.arenas) == 1
        assert np.isfinite(0)
