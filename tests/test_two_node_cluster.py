"""A cluster across the two-node rxe harness: etcd and a node in guest 0, a node in guest 1; a
client in guest 0 restores sessions whose chunks sit on both nodes, by READs across the link
(bench/two_node.py is the guest side). About 40 s on 2 cores."""

from __future__ import annotations

import os
import pathlib

import pytest

from bench import two_node

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(bool(os.environ.get("RDMAKV_IN_GUEST")), reason="already inside the rxe guest"),
]
pytest.importorskip("etcd3gw")

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_a_client_in_guest_0_reads_node_1s_share_by_rdma_across_the_link():
    res = two_node.run(3, REPO / "bench" / "out" / "two-node-test.json", timeout=300)
    assert res["members"] == ["192.0.2.1:7070", "192.0.2.2:7070"]
    rdma = [r for r in res["restores"] if r["client"] == "rdma"]
    assert len(rdma) == 3
    for r in rdma:  # every restore: both nodes served a share, each by READ; none failed over
        assert r["transport"] == "rdma" and r["failovers"] == 0, r
        assert set(r["per_node"]) == set(res["members"]), r
        assert {p["transport"] for p in r["per_node"].values()} == {"rdma"}, r
        assert all(p["chunks"] > 0 for p in r["per_node"].values()), r
    assert {r["transport"] for r in res["restores"] if r["client"] == "tcp"} == {"tcp"}
