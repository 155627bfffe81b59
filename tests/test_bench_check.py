"""bench/check.py fails a results.json in which an operation labelled RDMA ran over TCP."""

from __future__ import annotations

import copy

from bench import check

FULL = {
    "environment": {k: 1 for k in ("kernel", "accel", "cpus", "packages", "rdma")},
    "seed_scenarios": {k: 1 for k in ("bytes_on_wire", "chat_storage", "shared_prompt_storage")},
    "walls": {k: 1 for k in ("cold_save", "warm_save", "restore_tcp", "v1_save", "v1_restore", "kv_bytes",
                             "restore_rdma")},  # fmt: skip
    "scaling": {"by_size": [{"tokens": 256, "tcp": {}, "rdma": {}}], "by_window": []},
    "server_cpu": {"tcp": 1, "rdma": 1, "rdma_over_tcp": 1},
    "concurrency": {"rows": []},
    "tuning": {"hash_throughput": 1, "rdma_no_merge": 1, "per_wr_cost_us": 1},
    "tcp_limit": {"raw_socket": 1, "variants": 1, "restore_default_over_raw": 1},
    "limits": {"perftest": {}, "raw_pyverbs": 1, "rdma_restore_over_raw_pyverbs": 1},
    "saves": {"by_size": [{"tokens": 256, "tcp": {}, "rdma": {}}], "server_cpu": {}, "restore_under_save_load": {}},
    "targets": {},
    "rdma_used": True,
    "op_transports": {
        "walls.restore_tcp": {"expected": "tcp", "seen": {"tcp": 5}},
        "walls.restore_rdma": {"expected": "rdma", "seen": {"rdma": 5}},
    },
}


def test_a_complete_run_passes():
    assert check.problems(FULL, need_rdma=True) == []


def test_an_rdma_labelled_restore_that_ran_over_tcp_fails():
    r = copy.deepcopy(FULL)
    r["op_transports"]["walls.restore_rdma"]["seen"] = {"rdma": 3, "tcp": 2}
    assert check.problems(r, need_rdma=True) == ["walls.restore_rdma: labelled rdma but 2 of 5 ran over tcp"]
    r["op_transports"]["walls.restore_rdma"]["seen"] = {"tcp": 5}
    assert "no timed operation reported rdma" in check.problems(r, need_rdma=True)


def test_results_without_per_op_transports_fail():
    r = copy.deepcopy(FULL)
    del r["op_transports"]
    assert any("op_transports" in p for p in check.problems(r, need_rdma=False))
