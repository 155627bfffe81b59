"""The lifecycle on real rxe: deleted KV is gone from registered memory, and restores keep
returning right bytes while other clients delete, overwrite and churn until slots are reused."""

from __future__ import annotations

import threading
import time

import pytest

import rdmakv
from rdmakv import kvgen
from rdmakv.kvgen import ModelShape

from ..conftest import KEY_HEX

pytestmark = pytest.mark.rdma

SHAPE = ModelShape("churn", 4, 128, 128)


def _kv(seed: int, n: int = 128) -> rdmakv.KVState:
    return kvgen.generate(kvgen.token_stream(seed, n), SHAPE)


def test_deleted_means_gone_from_registered_memory(server, ns):
    """A READ of a deleted session's old locations finds zeros (its slots were wiped), never its KV."""
    kv = _kv(1)
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="rdma", window=32) as st:
        assert st.active_transport == "rdma", st.rdma_reason
        st.save("gone", kv)
        st.save("keep", _kv(2))  # keeps the region alive, so its rkey stays valid
        _, loc, _ = st.channel.get_manifest("gone", want_locations=True)
        st.channel.get_manifest("keep")  # let go of the lookup of "gone"
        st.delete_manifest("gone")
        regions = {int(r["id"]): r for r in loc.regions}
        total = wiped = 0
        for slot in loc.slots:
            region = regions[int(slot["region"])]
            dest, daddr, lkey = st.rdma.pool.alloc(int(slot["size"]))
            dest[:] = 0xAB
            st.rdma.requester.read(
                [(int(region["addr"]) + int(slot["offset"]), int(region["rkey"]), [(daddr, int(slot["size"]), lkey)])],
                timeout=30,
            )
            total += 1
            wiped += int(not dest.any())
        assert total == len(loc.slots) == 32
        assert wiped == total, f"{total - wiped} of {total} deleted chunks still readable"


def test_restores_under_churn_return_no_wrong_bytes(server, ns):
    """One connection restores in a loop over RDMA while another deletes, overwrites and churns
    sessions in a small store until slots are reused. Every restore is one whole version."""
    versions = {f"hot{i}": [_kv(100 + 10 * i + v) for v in range(2)] for i in range(3)}
    stop = threading.Event()
    churned = [0]
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp", window=32) as w:
                i = 0
                while not stop.is_set():
                    name = f"hot{i % 3}"
                    w.save(name, versions[name][(i // 3) % 2])
                    w.save(f"junk{i % 5}", _kv(1000 + i))  # new chunks land in freed slots
                    if i % 4 == 3:
                        w.delete_manifest(f"junk{i % 5}")
                    i += 1
                    churned[0] = i
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp", window=32) as w:
        for name, vs in versions.items():
            w.save(name, vs[0])
    t = threading.Thread(target=churn)
    t.start()
    restores = wrong = retried = fallback = 0
    rdma_restores = 0
    try:
        with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="rdma", window=32) as r:
            assert r.active_transport == "rdma", r.rdma_reason
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                name = f"hot{restores % 3}"
                got, rep = r.restore(name, report=True)
                restores += 1
                rdma_restores += rep.transport == "rdma"
                retried += rep.retried_chunks
                fallback += rep.fallback_chunks
                if not any(got.equals(v) for v in versions[name]):
                    wrong += 1
                if restores % 3 == 0:
                    r.channel.get_manifest("hot0")  # drop the hold now and then: slots may move under us
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    print(f"\n[churn] {restores} restores ({rdma_restores} over RDMA), {churned[0]} churn rounds, "
          f"{retried} chunks retried, {fallback} fetched over TCP, {wrong} wrong")
    assert wrong == 0
    assert restores > 50 and churned[0] > 20 and rdma_restores == restores
