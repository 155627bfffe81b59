"""Restores with no server CPU on real rxe: the session is looked up by READ in the namespace's
index, then its chunks are READ; overwrites, deletes and a full index fall back to TCP, whole."""

from __future__ import annotations

import threading

import pytest

import rdmakv
from rdmakv import kvgen
from rdmakv.errors import NotFoundError
from rdmakv.rdma.errors import RdmaError
from rdmakv.rdma.requester import ReadOp, Sge

from ..conftest import KEY_HEX, ServerProcess, request_counts

pytestmark = pytest.mark.rdma


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = ServerProcess(str(tmp_path_factory.mktemp("o") / "d"), "256MiB", "--fsync", "never",
                      "--index-entries", "16").start()  # fmt: skip
    assert s.rdma
    yield s
    s.stop()


def session(seed: int, tokens: int = 64) -> rdmakv.KVState:
    return kvgen.generate(kvgen.token_stream(seed, tokens), kvgen.QWEN25_05B)


def test_a_restore_asks_the_server_nothing(srv):
    kv = session(1, 256)
    with rdmakv.connect(srv.url("o1"), key=KEY_HEX, transport="rdma", window=64) as st:
        st.save("chat", kv)
        before = request_counts(srv.url("o1"))
        c0 = srv.cpu_ticks()
        for _ in range(100):
            back, rep = st.restore("chat", report=True)
            assert (rep.transport, rep.lookup, rep.round_trips) == ("rdma", "one-sided", 0)
        busy = srv.cpu_ticks() - c0
        assert back.equals(kv)
        after = request_counts(srv.url("o1"))
    assert after.get("GET_MANIFEST", 0) == before.get("GET_MANIFEST", 0)  # the server saw no request
    c0 = srv.cpu_ticks()
    threading.Event().wait(0.5)  # an idle server over a similar stretch, for the noise
    idle = srv.cpu_ticks() - c0
    print(f"[one-sided] server CPU over 100 restores: {busy} ticks; idle 0.5 s: {idle} ticks")
    assert busy <= max(2, 4 * idle)


def test_restores_racing_overwrite_delete_and_resave_are_never_a_mix(srv):
    a, b = session(2), session(3)
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn():
        try:
            with rdmakv.connect(srv.url("o2"), key=KEY_HEX, transport="rdma", window=64) as w:
                while not stop.is_set():
                    w.save("s", a)
                    w.save("s", b)
                    w.delete_manifest("s")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with rdmakv.connect(srv.url("o2"), key=KEY_HEX, transport="rdma", window=64) as st:
        st.save("s", a)
        t = threading.Thread(target=churn)
        t.start()
        seen = {"a": 0, "b": 0, "gone": 0, "one-sided": 0}
        try:
            for _ in range(1000):
                try:
                    kv, rep = st.restore("s", report=True)
                except NotFoundError:
                    seen["gone"] += 1
                    continue
                seen["one-sided"] += rep.lookup == "one-sided"
                if kv.equals(a):
                    seen["a"] += 1
                elif kv.equals(b):
                    seen["b"] += 1
                else:
                    raise AssertionError("a restore returned a mix of two versions")
        finally:
            stop.set()
            t.join(60)
    assert not errors, errors
    print(f"[one-sided race] {seen}")
    assert seen["a"] + seen["b"] + seen["gone"] == 1000 and seen["a"] and seen["b"]


def test_a_full_index_still_saves_and_looks_up_over_tcp(srv):
    kvs = [session(100 + i, 16) for i in range(40)]  # 40 names in a 16-entry index
    with rdmakv.connect(srv.url("o3"), key=KEY_HEX, transport="rdma", window=16) as st:
        for i, kv in enumerate(kvs):
            st.save(f"n{i}", kv)
        lookups = []
        for i, kv in enumerate(kvs):
            back, rep = st.restore(f"n{i}", report=True)
            assert back.equals(kv) and rep.transport == "rdma"
            lookups.append(rep.lookup)
    assert "tcp" in lookups and "one-sided" in lookups


def test_reads_past_the_index_or_into_another_namespaces_index_fail(srv):
    with rdmakv.connect(srv.url("o4"), key=KEY_HEX, transport="rdma") as other:
        other.save("x", session(9, 16))
        foreign = (other.rdma.index.addr, other.rdma.index.rkey)
    with rdmakv.connect(srv.url("o5"), key=KEY_HEX, transport="rdma") as st:
        idx = st.rdma.index
        past = (idx.addr + (idx.entries + idx.probe) * 64, idx.rkey)  # the first byte after it
    for target, rkey in (past, foreign):
        with rdmakv.connect(srv.url("o5"), key=KEY_HEX, transport="rdma") as st:
            r = st.rdma
            with pytest.raises(RdmaError, match="REM_ACCESS_ERR"):
                r.requester.read([ReadOp(target, rkey, [Sge(r.scratch_addr, 64, r.scratch_lkey)])])


def test_many_lookups_in_two_postings_find_what_single_lookups_find(srv):
    from rdmakv.client.reports import RestoreReport

    with rdmakv.connect(srv.url("o-many"), key=KEY_HEX, transport="rdma", window=64) as st:
        for i in range(6):
            st.save(f"s{i}", session(40 + i))
        st.delete_manifest("s2")
        st.save("s4", session(99))  # overwritten: its entry names the new blob
        names = [f"s{i}" for i in range(7)]  # s2 deleted, s6 never saved
        idx = st.rdma.index
        rep = RestoreReport()
        reads = rep.reads_posted
        many = idx.lookup_many(names, rep)
        single = [idx.lookup(n, RestoreReport()) for n in names]
        assert [m is None for m in many] == [False, False, True, False, False, False, True]
        assert [m and m[0] for m in many] == [s and s[0] for s in single]
        assert rep.reads_posted - reads >= 1 and rep.index_misses == 2
        rep2 = RestoreReport()
        again = idx.lookup_many(names, rep2)  # every blob remembered now: one posting
        assert [a and a[0] for a in again] == [m and m[0] for m in many]
