"""Cluster races against a real etcd and real `rdmakv serve` nodes: a delete issued while a
repair pass runs (the session must stay deleted), an etcd watch whose stream ended (etcd
restarted) or stalled (open, silent) between checks, and a keys-mode cluster whose nodes repair
with a node key and hold no tenant key."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time

import pytest

import rdmakv
from rdmakv.cluster.client import ClusterStore
from rdmakv.cluster.membership import MemberWatch, members
from rdmakv.cluster.repair import repair, repair_session
from rdmakv.errors import AuthError, NotFoundError, SessionChangedError
from rdmakv.wire import chunking

from .conftest import KEY_HEX
from .test_cluster_membership import node, wait_for
from .test_cluster_ops import addr, three  # noqa: F401 - the fixture
from .test_cluster_store import session

pytest.importorskip("etcd3gw")

ROUNDS = int(os.environ.get("RDMAKV_DELETE_RACE_ROUNDS", "100"))


def _gone(st: ClusterStore, name: str) -> bool:
    try:
        st.whole_manifest(name)
    except NotFoundError:
        return True
    return False


def test_a_delete_during_a_repair_pass_stays_deleted(tmp_path, etcd, three):  # noqa: F811
    """ROUNDS times: a session is saved, a repair reads it, the session is deleted, the repair
    commits what it read (every other round the delete and a whole repair pass race on threads
    instead). Its chunks outlive the delete (another session shares them), so a repair's commit
    would succeed in one round trip: not one session comes back, and no node keeps a part with
    chunks of one."""
    url, nodes = three
    st = ClusterStore(url, "tenant", key=KEY_HEX)
    fixer = ClusterStore(url, "tenant", key=KEY_HEX)  # the repair's own connections
    kv = session(700, 32)
    st.save("keeper", kv)  # shares every chunk (a system prompt): a delete leaves the chunks in place
    refused = back = 0
    for i in range(ROUNDS):
        name = f"d{i}"
        st.save(name, kv)
        if i % 2 == 0:  # the delete lands after the repair read the session, before its commits
            whole, _ = fixer.whole_manifest(name)
            read_at = time.monotonic()
            st.delete(name)
            try:
                repair_session(fixer, name, whole, fixer.live(), read_at)
            except SessionChangedError:
                refused += 1
        else:  # a whole pass and the delete on two threads, the delete at a random moment
            t = threading.Thread(target=repair, args=(fixer, [name]))
            t.start()
            time.sleep(random.uniform(0, 0.02))
            st.delete(name)
            t.join()
        back += not _gone(st, name)
    held = []
    for n in nodes:
        with rdmakv.connect(n.url("tenant"), key=KEY_HEX, transport="tcp") as s:
            held += [r["name"] for r in s.list() if r["chunks"] and r["name"] != "keeper"]
    print(f"[cluster] {ROUNDS} deletes during repairs: {back} came back, {refused} repair commits refused, "
          f"{len(held)} parts with chunks left")  # fmt: skip
    assert back == 0 and not held
    assert st.list() == ["keeper"]  # the markers are not sessions
    assert refused >= ROUNDS // 2 - 1
    st.save("after", kv)  # a name saved again after its delete is a session like any other
    st.delete("after")
    st.save("after", kv)
    assert st.restore("after").equals(kv)
    st.close()
    fixer.close()


class _FreezingProxy:
    """A TCP relay in front of etcd whose open connections can be frozen: bytes stop flowing on
    them (a watch stream that stays open and says nothing), while new connections relay."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.generation = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.generation += 1

    def _accept(self) -> None:
        while True:
            c, _ = self.listener.accept()
            s = socket.create_connection(self.target)
            gen = self.generation
            for a, b in ((c, s), (s, c)):
                threading.Thread(target=self._pump, args=(a, b, gen), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, gen: int) -> None:
        try:
            while data := src.recv(65536):
                if self.generation != gen:
                    continue  # frozen: swallowed, the connection stays open
                dst.sendall(data)
        except OSError:
            pass


def _join_and_leave(tmp_path, etcd, url: str, leaver, i: int):
    """A node joins and another leaves: the member count stays the same. Returns (the new
    node, the new member set, when etcd itself showed it)."""
    joiner = node(tmp_path, etcd, i)
    leaver.stop()  # SIGTERM: its lease is revoked at once
    want = {addr(n) for n in (joiner,)} | set(members(url)) - {addr(leaver)}
    wait_for(lambda: set(members(url)) == want, 10)
    return joiner, want, time.monotonic()


def test_a_watch_whose_stream_ended_with_an_etcd_restart_is_replaced(tmp_path, etcd, three):  # noqa: F811
    url, nodes = three
    view = MemberWatch(url).start(required=True)
    try:
        assert len(view.members) == 3 and view.check_s == 2  # the nodes' lease TTL (2 s)
        time.sleep(0.5)
        etcd.stop()  # between two checks: the watch's stream ends with it
        etcd.start()
        wait_for(lambda: len(members(url)) == 3, 15)
        joiner, want, t0 = _join_and_leave(tmp_path, etcd, url, nodes[0], 3)
        nodes.append(joiner)
        wait_for(lambda: set(view.members) == want, 2 * 2)  # within 2x the lease TTL
        print(f"[cluster] after an etcd restart, a join and a leave at 3 members reached the watch "
              f"{time.monotonic() - t0:.2f} s after etcd had them; watches replaced: {view.rewatches}")
    finally:
        view.close()


def test_a_stalled_watch_is_found_by_the_check_and_replaced(tmp_path, etcd, three):  # noqa: F811
    url, nodes = three
    proxy = _FreezingProxy(etcd.url)
    view = MemberWatch(f"etcd://{proxy.url}/c1").start(required=True)
    try:
        assert len(view.members) == 3
        time.sleep(0.5)
        proxy.freeze()  # the watch's stream stays open and goes silent
        joiner, want, t0 = _join_and_leave(tmp_path, etcd, url, nodes[0], 3)
        nodes.append(joiner)
        wait_for(lambda: set(view.members) == want, 2 * 2)
        print(f"[cluster] a stalled watch: a join and a leave at 3 members reached the view "
              f"{time.monotonic() - t0:.2f} s after etcd had them")
        assert view.rewatches >= 1
    finally:
        view.close()


NODE_KEY, TENANT_KEY, ADMIN_KEY = "4e" * 32, "7e" * 32, "ad" * 32


def _keys(path, *entries: str) -> str:
    text = {"tenant": f'[[key]]\nnamespace = "tenant"\nkey = "{TENANT_KEY}"\n\n',
            "node": f'[[key]]\nkey = "{NODE_KEY}"\nnode = true\n\n',
            "admin": f'[[key]]\nkey = "{ADMIN_KEY}"\nadmin = true\n\n'}  # fmt: skip
    path.write_text("".join(text[e] for e in entries))
    return str(path)


def test_a_keys_mode_cluster_repairs_with_a_node_key_and_no_tenant_key(tmp_path, etcd):
    """Sessions saved with a tenant key; then every node restarts with a keys file holding only
    the node key and an admin key. A node is killed: the others repair with the node key alone,
    until every chunk has its copies on both of them. The node key cannot read or save a session."""
    url = f"etcd://{etcd.url}/c1"
    with_tenant = _keys(tmp_path / "k1.toml", "tenant", "node", "admin")
    without = _keys(tmp_path / "k2.toml", "node", "admin")
    nodes = [node(tmp_path, etcd, i, "--keys", with_tenant) for i in range(3)]
    try:
        wait_for(lambda: len(members(url)) == 3, 10)
        kvs = {f"k{i}": session(800 + i, 64) for i in range(6)}
        with ClusterStore(url, "tenant", key=TENANT_KEY) as st:
            for name, kv in kvs.items():
                st.save(name, kv)
        ports = [n.port for n in nodes]
        for n in nodes:
            n.stop()
        nodes = [node(tmp_path, etcd, i, "--keys", without, port=p) for i, p in enumerate(ports)]
        wait_for(lambda: len(members(url)) == 3, 10)
        with pytest.raises(AuthError, match="not one this server knows"):
            rdmakv.connect(nodes[0].url("tenant"), key=TENANT_KEY, transport="tcp")
        with rdmakv.connect(nodes[0].url("tenant"), key=NODE_KEY, transport="tcp") as s:
            for call in (lambda: s.restore("k0"), lambda: s.save("x", kvs["k0"]), s.list):
                with pytest.raises(AuthError, match="node key"):
                    call()

        os.kill(nodes[2].pid(), signal.SIGKILL)
        survivors = nodes[:2]
        keys = {k for kv in kvs.values() for k in chunking.split(kv, chunking.DEFAULT_WINDOW)[0].keys.tolist()}

        def repaired() -> bool:
            for n in survivors:
                with rdmakv.connect(n.url("tenant"), key=NODE_KEY, transport="tcp") as s:
                    if not s.exists(sorted(keys)).all():
                        return False
                with rdmakv.connect(n.url("tenant"), key=ADMIN_KEY, transport="tcp") as s:
                    if {r["name"] for r in s.list()} != set(kvs):
                        return False
            return True

        took = wait_for(repaired, 40)

        def sent() -> int:  # a pass adds to the totals when it ends
            total = 0
            for n in survivors:
                with rdmakv.connect(n.url("tenant"), key=ADMIN_KEY, transport="tcp") as s:
                    total += s.stats()["cluster"]["repaired_total"]["chunks_sent"]
            return total

        wait_for(lambda: sent() > 0, 20)
        print(f"[cluster] keys mode, no tenant key on the nodes: repaired to R=2 on the 2 survivors in {took:.1f} s "
              f"({sent()} chunks sent with the node key)")  # fmt: skip

        for n in survivors[1:]:  # one node left, with the tenant's key again: everything restores from it
            n.stop()
        last = survivors[0]
        last.stop()
        nodes = [node(tmp_path, etcd, 0, "--keys", with_tenant, port=ports[0])]
        wait_for(lambda: len(members(url)) == 1, 10)
        with ClusterStore(url, "tenant", key=TENANT_KEY) as st:
            for name, kv in kvs.items():
                assert st.restore(name).equals(kv), name
    finally:
        for n in nodes:
            n.stop()
