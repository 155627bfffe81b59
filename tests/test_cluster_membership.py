"""Cluster membership against a real etcd and real `rdmakv serve` processes: nodes register
under a lease, leave at once on a clean stop and within the lease TTL when killed, and keep
serving (and register again) through an etcd outage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import rdmakv
from rdmakv import kvgen
from rdmakv.cluster.etcd_server import Etcd, free_port
from rdmakv.cluster.membership import ClusterError, members, parse_cluster_url

from .conftest import KEY_HEX, ServerProcess

pytest.importorskip("etcd3gw")


def node(tmp_path, etcd: Etcd, i: int, *extra: str, ttl: int = 2, port: int | None = None) -> ServerProcess:
    port = port or free_port()
    return ServerProcess(str(tmp_path / f"n{i}"), "64MiB", "--fsync", "never", "--transport", "tcp",
                         "--cluster", f"etcd://{etcd.url}/c1", "--advertise", f"127.0.0.1:{port}",
                         "--lease-ttl", str(ttl), *extra, port=port).start()  # fmt: skip


def wait_for(pred, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


def test_nodes_join_leave_cleanly_and_a_killed_one_drops_out_within_its_lease(tmp_path, etcd):
    url = f"etcd://{etcd.url}/c1"
    a, b = node(tmp_path, etcd, 0), node(tmp_path, etcd, 1)
    try:
        wait_for(lambda: len(members(url)) == 2, 10)
        assert {m["addr"] for m in members(url).values()} == set(members(url))
        out = subprocess.run([sys.executable, "-m", "rdmakv", "cluster", "status", "--cluster", url, "--json"],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "RDMAKV_AUTH_KEY": KEY_HEX})  # fmt: skip
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)["members"]
        assert len(rows) == 2 and all(r["reachable"] for r in rows.values())

        os.kill(a.pid(), signal.SIGKILL)  # no goodbye: the lease (2 s) runs out
        took = wait_for(lambda: len(members(url)) == 1, 10)
        assert took <= 2 + 1.5, took
        b.stop()  # SIGTERM: the lease is revoked at once
        assert wait_for(lambda: len(members(url)) == 0, 1.5) < 1.5
    finally:
        a.stop()
        b.stop()


def test_an_etcd_outage_stops_membership_not_service(tmp_path, etcd):
    url = f"etcd://{etcd.url}/c1"
    n = node(tmp_path, etcd, 0)
    try:
        wait_for(lambda: len(members(url)) == 1, 10)
        etcd.stop()
        with pytest.raises(ClusterError, match="unreachable"):
            members(url)
        kv = kvgen.generate(kvgen.token_stream(1, 32), kvgen.QWEN25_05B)
        with rdmakv.connect(n.url("x"), key=KEY_HEX, transport="tcp") as st:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3:  # longer than the lease: keepalives fail meanwhile
                st.save("s", kv)  # the node serves on
                assert st.restore("s").equals(kv)
        etcd.start()  # same data dir: its old lease may have lapsed meanwhile; the node registers again
        wait_for(lambda: len(members(url)) == 1, 15)
        log = "".join(n.log)
        assert "etcd unreachable" in log and "still serving" in log, log[-2000:]
    finally:
        n.stop()


def test_cluster_urls_are_checked():
    assert parse_cluster_url("etcd://h:1234/name").port == 1234
    assert parse_cluster_url("etcd://h/name").port == 2379
    for bad in ("http://h/name", "etcd://h/", "etcd:///n", "etcd://h/a/b"):
        with pytest.raises(ValueError, match="etcd://HOST"):
            parse_cluster_url(bad)
