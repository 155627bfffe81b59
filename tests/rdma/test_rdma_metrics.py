"""Metrics of a server with real rxe: the QP gauge, saves by RDMA WRITE counted as rdma, and
lookups that came over TCP for an RDMA restore counted as rdma."""

from __future__ import annotations

import time

import pytest

import rdmakv
from rdmakv import kvgen
from rdmakv.cluster.etcd_server import free_port

from ..conftest import KEY_HEX, ServerProcess
from ..test_operations import scrape, value

pytestmark = pytest.mark.rdma


def test_qps_and_rdma_saves_and_lookups_are_counted(tmp_path):
    port = free_port()
    srv = ServerProcess(str(tmp_path / "d"), "64MiB", "--metrics-listen", f"127.0.0.1:{port}").start()
    try:
        assert srv.rdma
        kv = kvgen.generate(kvgen.token_stream(4, 128), kvgen.QWEN25_05B)
        with rdmakv.connect(srv.url("t"), key=KEY_HEX, transport="rdma", window=64) as st:
            save = st.save("s", kv)
            back, rep = st.restore("s", report=True)
            assert back.equals(kv) and rep.transport == "rdma"
            m = scrape(port)
            assert value(m, "rdmakv_rdma_qps") == 1
            assert value(m, "rdmakv_saves_total", namespace="t", transport=save.transport) == 1
            assert save.transport == "rdma"  # the chunks went by RDMA WRITE
            seen = value(m, "rdmakv_restores_total", namespace="t", transport="rdma", tier="memory")
            assert seen == (0 if rep.lookup == "one-sided" else 1)  # a one-sided lookup never reaches it
        deadline = time.monotonic() + 5
        while value(scrape(port), "rdmakv_rdma_qps") != 0:  # the QP goes with the connection
            assert time.monotonic() < deadline, "the QP gauge did not drop after the client closed"
            time.sleep(0.05)
    finally:
        srv.stop()
