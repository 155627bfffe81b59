"""Cluster behaviour against a real etcd and 3 real `rdmakv serve` nodes: the rdmakv+etcd:// URL
and its member watch, stale member lists refused by nodes, an etcd outage, automatic repair
after a node is killed during saves, and the node rejoining."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import rdmakv
from rdmakv.cluster.client import ClusterStore, parse_connect_url
from rdmakv.cluster.membership import members
from rdmakv.errors import StaleMembersError
from rdmakv.wire import chunking

from .conftest import KEY_HEX
from .test_cluster_membership import node, wait_for
from .test_cluster_store import _copies, session

pytest.importorskip("etcd3gw")


@pytest.fixture
def three(tmp_path, etcd):
    """(cluster URL, 3 registered nodes); every node in the list at the end is stopped."""
    url = f"etcd://{etcd.url}/c1"
    nodes = [node(tmp_path, etcd, i) for i in range(3)]
    wait_for(lambda: len(members(url)) == 3, 10)
    yield url, nodes
    for n in nodes:
        n.stop()


def addr(n) -> str:
    return f"127.0.0.1:{n.port}"


def test_connect_url_reads_and_watches_the_member_list(tmp_path, etcd):
    nodes = [node(tmp_path, etcd, i) for i in range(2)]
    try:
        wait_for(lambda: len(members(f"etcd://{etcd.url}/c1")) == 2, 10)
        with rdmakv.connect(f"rdmakv+etcd://{etcd.url}/c1/tenant", key=KEY_HEX) as st:
            assert isinstance(st, ClusterStore) and st.members == sorted(addr(n) for n in nodes)
            kv = session(7, 128)
            st.save("a", kv)
            assert st.restore("a").equals(kv)
            nodes.append(node(tmp_path, etcd, 2))
            took = wait_for(lambda: addr(nodes[2]) in st.members, 5)  # the watch, no refresh call
            print(f"[cluster] a join reached the client's watch in {took * 1000:.0f} ms")
            nodes[0].stop()
            wait_for(lambda: addr(nodes[0]) not in st.members, 5)
            assert st.restore("a").equals(kv)  # the replica on the nodes left
    finally:
        for n in nodes:
            n.stop()
    for bad in ("rdmakv+etcd://h/c1", "rdmakv+etcd://h/c1/ns/x", "rdmakv://h/c1/ns"):
        with pytest.raises(ValueError, match="CLUSTER/NAMESPACE"):
            parse_connect_url(bad)


def test_a_node_refuses_a_save_placed_by_a_stale_member_list_and_the_client_refreshes(tmp_path, etcd, three):
    url, nodes = three
    st = ClusterStore(url, "tenant", key=KEY_HEX)
    kv = session(3, 128)
    m, chunks = chunking.split(kv, st.window)
    st.members = [addr(n) for n in nodes[:2]]  # a list from before the third node joined
    with pytest.raises(StaleMembersError, match="stale member list") as e:
        st.save_placed("s", m, chunks)
    assert sorted(e.value.members) == sorted(addr(n) for n in nodes)  # the node's own list: a redirect
    st.members = [addr(n) for n in nodes[:2]]
    rep = st.save("s", kv)  # refused, refreshed, placed again
    assert rep.stale_retries == 1 and rep.nodes == 3
    assert st.restore("s").equals(kv)
    stats = [rdmakv.connect(n.url("tenant"), key=KEY_HEX, transport="tcp").stats()["cluster"] for n in nodes]
    assert sum(s["stale_refused"] for s in stats) >= 2 and all(s["members"] == 3 for s in stats)
    st.close()


def test_an_etcd_outage_keeps_saves_and_restores_going_on_the_last_member_list(tmp_path, etcd, three):
    url, nodes = three
    st = ClusterStore(url, "tenant", key=KEY_HEX)
    etcd.stop()
    t0, n = time.monotonic(), 0
    while time.monotonic() - t0 < 3:  # past the lease TTL: keepalives fail meanwhile
        kv = session(200 + n, 64)
        st.save(f"o{n}", kv)
        assert st.restore(f"o{n}").equals(kv)
        n += 1
    assert not st.view.etcd_ok and len(st.members) == 3 and n > 3
    etcd.start()
    wait_for(lambda: st.view.etcd_ok and len(st.members) == 3, 15)
    st.close()


def test_kill_9_during_saves_loses_nothing_and_repair_is_automatic_then_the_node_rejoins(tmp_path, etcd, three):
    url, nodes = three
    st = ClusterStore(url, "tenant", key=KEY_HEX)
    acked: dict[str, int] = {}
    victim = nodes[1]
    killer = threading.Timer(1.0, lambda: os.kill(victim.pid(), signal.SIGKILL))
    killer.start()
    t0, i = time.monotonic(), 0
    while time.monotonic() - t0 < 4:  # saves before, during and after the kill
        try:
            st.save(f"k{i}", session(300 + i, 64))
            acked[f"k{i}"] = 300 + i
        except rdmakv.RdmakvError as e:
            print(f"[cluster] save k{i} not acknowledged: {e}")
        i += 1
    killer.join()
    live = [addr(n) for n in nodes if n is not victim]
    t_kill = time.monotonic()
    for name, seed in acked.items():  # every acknowledged session, bit-exact, from the replicas
        assert st.restore(name).equals(session(seed, 64)), name

    def back_to_r() -> bool:
        return all(set(_copies(url, live, name).values()) == {2} for name in acked)

    took = wait_for(back_to_r, 30)  # nobody called repair: the nodes did, on the change
    print(f"[cluster] {len(acked)} acknowledged sessions ({i} attempted); automatic repair back to R=2 "
          f"within {took:.1f} s after the kill was noticed")
    def status() -> dict:
        out = subprocess.run([sys.executable, "-m", "rdmakv", "cluster", "status", "--cluster", url,
                              "--namespace", "tenant", "--json"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "RDMAKV_AUTH_KEY": KEY_HEX})  # fmt: skip
        return json.loads(out.stdout)

    rows = status()
    while any(r.get("cluster", {}).get("repairing") for r in rows["members"].values()):
        time.sleep(0.5)  # a pass adds to the totals when it ends
        rows = status()
    assert rows["replication"]["under_replicated_sessions"] == 0 and not rows["replication"]["lost"]
    repaired = [r["cluster"]["repaired_total"] for r in rows["members"].values() if r.get("cluster")]
    assert sum(r.get("under_replicated", 0) for r in repaired) > 0, repaired

    nodes[1] = node(tmp_path, etcd, 1, port=victim.port)  # the node restarts, same data dir and address
    wait_for(lambda: len(st.members) == 3, 10)
    everyone = [addr(n) for n in nodes]
    wait_for(lambda: all(set(_copies(url, everyone, name).values()) == {2} for name in acked), 30)
    for name, seed in acked.items():
        assert st.restore(name).equals(session(seed, 64)), name
    print(f"[cluster] rejoin: back to exactly R=2 over 3 nodes {time.monotonic() - t_kill:.1f} s after the kill")
    st.close()


def test_with_one_copy_a_killed_node_does_lose_sessions(tmp_path, etcd):
    """The control for the test above: the same kill with R = 1 loses what lived on the node."""
    url = f"etcd://{etcd.url}/c1"
    nodes = [node(tmp_path, etcd, i, "--replicas", "1") for i in range(3)]
    try:
        wait_for(lambda: len(members(url)) == 3, 10)
        with ClusterStore(url, "tenant", key=KEY_HEX, replicas=1) as st:
            for i in range(6):
                st.save(f"one{i}", session(400 + i, 64))
            os.kill(nodes[0].pid(), signal.SIGKILL)
            st.members = [addr(n) for n in nodes]  # still listed: restores find it dead
            lost = 0
            for i in range(6):
                try:
                    st.restore(f"one{i}")
                except rdmakv.RdmakvError:
                    lost += 1
            assert lost > 0
    finally:
        for n in nodes:
            n.stop()


def test_a_repair_never_puts_back_an_older_version_of_a_session_saved_meanwhile(tmp_path, etcd, three):
    from rdmakv.cluster.repair import repair_session
    from rdmakv.errors import SessionChangedError
    from rdmakv.wire import manifest as mf
    from rdmakv.wire.cluster_part import dec_part_body, session_version

    url, nodes = three
    with ClusterStore(url, "tenant", key=KEY_HEX) as st:
        old, new = session(500, 128), session(501, 128)
        st.save("s", old)
        whole_old, _ = st.whole_manifest("s")  # what a repair read ...
        st.save("s", new)  # ... before the session was saved again
        whole_new, _ = st.whole_manifest("s")
        with pytest.raises(SessionChangedError, match="saved again while it was being repaired"):
            repair_session(st, "s", whole_old, st.live())
        for n in nodes:  # every part still belongs to the new version: its chunks stay referenced
            with rdmakv.connect(n.url("tenant"), key=KEY_HEX, transport="tcp") as s:
                part = s.get_manifest("s")
            assert part.kind == mf.KIND_PART and dec_part_body(part.body).version == session_version(whole_new)
        assert st.restore("s").equals(new)
        refused = sum(rdmakv.connect(n.url("tenant"), key=KEY_HEX, transport="tcp").stats()["cluster"]
                      ["repairs_of_old_versions_refused"] for n in nodes)  # fmt: skip
        assert refused >= 1
