"""Saves by RDMA WRITE on real rxe: reserved slots behind a memory window bound to the client's
QP, checked before they are committed; nothing else is ever writable."""

from __future__ import annotations

import time

import numpy as np
import pytest

import rdmakv
from rdmakv import kvgen
from rdmakv.errors import IntegrityError, NotFoundError
from rdmakv.rdma.errors import RdmaError
from rdmakv.rdma.save import write_reserved
from rdmakv.wire import chunking
from rdmakv.wire.messages import SaveOptions

from ..conftest import KEY_HEX, ServerProcess, request_counts

pytestmark = pytest.mark.rdma


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = ServerProcess(str(tmp_path_factory.mktemp("w") / "d"), "256MiB", "--fsync", "never",
                      "--reservation-timeout", "1").start()  # fmt: skip
    assert s.rdma
    yield s
    s.stop()


def session(seed: int, tokens: int = 128) -> rdmakv.KVState:
    return kvgen.generate(kvgen.token_stream(seed, tokens), kvgen.QWEN25_05B)


def reserve(st: rdmakv.Store, name: str, kv: rdmakv.KVState):
    """A save up to its reservation: (manifest bytes, missing keys, reservation, chunk of key)."""
    m, chunks = chunking.split(kv, st.window, st.hash_alg)
    data = m.encode()
    missing, res = st.channel.put_manifest_reserving(name, data, SaveOptions(reserve=True))
    assert res is not None and len(missing)
    return data, missing, res, dict(zip(m.keys.tolist(), chunks))


def test_a_cold_save_goes_by_write_and_restores_bit_exact(srv):
    kv = session(1, 256)
    with rdmakv.connect(srv.url("w1"), key=KEY_HEX, transport="rdma", window=64) as st:
        rep = st.save("chat", kv)
        assert rep.transport == "rdma" and rep.fallback_reason == "" and rep.chunks_sent == rep.chunks_total
        assert request_counts(srv.url("w1")).get("PUT_CHUNKS", 0) == 0  # no chunk byte went over TCP
        back, rrep = st.restore("chat", report=True)
        assert rrep.transport == "rdma" and back.equals(kv)
        warm = st.save("chat", kv)
        assert (warm.round_trips, warm.chunks_sent) == (1, 0)  # the warm save stays one round trip
        half = session(2, 256)
        rep = st.save("other", half)
        assert rep.transport == "rdma"
        assert st.restore("other").equals(half) and st.restore("chat").equals(kv)


def test_a_lying_write_is_refused_naming_the_keys_and_nothing_is_kept(srv):
    kv = session(3)
    with rdmakv.connect(srv.url("w2"), key=KEY_HEX, transport="rdma", window=64) as st:
        data, missing, res, chunk_of = reserve(st, "lie", kv)
        bad = {k: np.full(len(chunk_of[k]), 7, np.uint8) for k in chunk_of}
        write_reserved(st.rdma, res, missing.tolist(), bad)
        with pytest.raises(IntegrityError, match=r"chunks written by RDMA do not hash to their keys"):
            st.channel.commit_written(res.id, "lie", data, SaveOptions())
        with pytest.raises(NotFoundError):
            st.get_manifest("lie")
        assert st.save("lie", kv).transport == "rdma"  # the slots came back; an honest save works
        assert st.restore("lie").equals(kv)


def _write_fails(st, addr: int, rkey: int) -> None:
    buf, laddr, lkey = st.rdma.pool.alloc(64)
    with pytest.raises(RdmaError, match="REM_ACCESS_ERR"):
        st.rdma.requester.write([(addr, rkey, [(laddr, 64, lkey)])], timeout=5)


def test_nothing_outside_the_window_or_after_the_commit_is_writable(srv):
    keep = session(4)
    with rdmakv.connect(srv.url("w3"), key=KEY_HEX, transport="rdma", window=64) as st:
        st.save("keep", keep)
    for where in ("before", "after", "mr", "committed"):
        kv = session(10 + len(where))
        with rdmakv.connect(srv.url("w3"), key=KEY_HEX, transport="rdma", window=64) as st:
            data, missing, res, chunk_of = reserve(st, "x", kv)
            w = res.windows[0]
            if where == "committed":
                write_reserved(st.rdma, res, missing.tolist(), chunk_of)
                st.channel.commit_written(res.id, "x", data, SaveOptions())
                _write_fails(st, int(w["addr"]), int(w["rkey"]))
            elif where == "mr":  # the slab's own rkey never takes a WRITE
                _, loc, _ = st.channel.get_manifest("keep", want_locations=True)
                _write_fails(st, int(loc.regions[0]["addr"]), int(loc.regions[0]["rkey"]))
            else:
                addr = int(w["addr"]) - 64 if where == "before" else int(w["addr"] + w["length"])
                _write_fails(st, addr, int(w["rkey"]))
    with rdmakv.connect(srv.url("w3"), key=KEY_HEX, transport="rdma", window=64) as st:
        assert st.restore("keep").equals(keep)  # untouched


def test_a_reservation_not_committed_in_time_expires(srv):
    kv = session(20)
    with rdmakv.connect(srv.url("w4"), key=KEY_HEX, transport="rdma", window=64) as st:
        data, missing, res, chunk_of = reserve(st, "late", kv)
        time.sleep(2.0)  # the server's limit is 1 s here
        with pytest.raises(NotFoundError, match="expired after 1 s"):
            st.channel.commit_written(res.id, "late", data, SaveOptions())
        _write_fails(st, int(res.windows[0]["addr"]), int(res.windows[0]["rkey"]))
    with rdmakv.connect(srv.url("w4"), key=KEY_HEX, transport="rdma", window=64) as st:
        assert st.save("late", kv).transport == "rdma" and st.restore("late").equals(kv)
