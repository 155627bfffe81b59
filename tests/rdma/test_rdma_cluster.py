"""A cluster session restored by RDMA on real rxe: a real etcd and 3 `rdmakv serve` nodes in
the guest; each node's share of a session comes by READs over that node's own QP, all nodes at
once, and a killed node's share comes from the replicas, still by READ."""

from __future__ import annotations

import os
import signal

import pytest

from rdmakv.cluster.client import ClusterStore
from rdmakv.cluster.etcd_server import Etcd, free_port
from rdmakv.cluster.membership import members

from ..conftest import KEY_HEX, ServerProcess
from ..test_cluster_membership import wait_for
from ..test_cluster_store import session

pytestmark = pytest.mark.rdma
pytest.importorskip("etcd3gw")


def test_each_nodes_share_comes_by_read_and_a_dead_nodes_from_its_replicas(tmp_path):
    etcd = Etcd(tmp_path / "etcd").start()
    url = f"etcd://{etcd.url}/c1"
    nodes = []
    try:
        for i in range(3):
            port = free_port()
            nodes.append(ServerProcess(str(tmp_path / f"n{i}"), "64MiB", "--cluster", url, "--advertise",
                                       f"127.0.0.1:{port}", "--lease-ttl", "2", port=port).start())  # fmt: skip
            assert nodes[-1].rdma
        wait_for(lambda: len(members(url)) == 3, 10)
        kvs = {f"s{i}": session(i, 256) for i in range(3)}
        with ClusterStore(url, "tenant", key=KEY_HEX, transport="rdma") as st:
            for name, kv in kvs.items():
                st.save(name, kv)
            for name, kv in kvs.items():
                back, rep = st.restore(name, report=True)
                assert back.equals(kv)
                assert rep.transport == "rdma" and rep.nodes >= 2, rep
                assert {p["transport"] for p in rep.per_node.values()} == {"rdma"}, rep.per_node
            os.kill(nodes[0].pid(), signal.SIGKILL)
            st.members = [f"127.0.0.1:{n.port}" for n in nodes]  # still listed: found dead mid-restore
            for name, kv in kvs.items():
                back, rep = st.restore(name, report=True)
                assert back.equals(kv) and rep.transport == "rdma", rep
                assert {p["transport"] for p in rep.per_node.values()} == {"rdma"}, rep.per_node
            assert f"127.0.0.1:{nodes[0].port}" in st.down
    finally:
        for n in nodes:
            n.stop()
        etcd.stop()
