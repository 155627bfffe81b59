"""`rdmakv bench throughput`'s pure parts: the profile's top entries, the report and the
before/after table, the disk limit, and InfiniStore skipped with its reason when absent."""

from __future__ import annotations

from bench import throughput, throughput_peer, throughput_profile, throughput_report


def test_top_entries_leave_out_idle_workers(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "process 1;thread 2;_bootstrap (threading.py:995);_worker (thread.py:81) 60\n"
        "process 1;thread 3;serve (server.py:10);put_chunks (engine.py:274) 30\n"
        "process 1;thread 3;serve (server.py:10);append_many (segment_log.py:380) 10\n"
    )
    top = throughput_profile.top_entries(str(raw))
    assert top["samples"] == 40 and top["waiting_samples"] == 60
    assert top["own"][0] == {"frame": "put_chunks (engine.py:274)", "pct": 75.0}
    assert {"frame": "serve (server.py:10)", "pct": 100.0} in top["inclusive"]


def _result(save_ms: float, restore_ms: float) -> dict:
    row = {"tokens": 4096, "bytes": 50_331_648, "runs": 3,
           "fdatasync_limit": {"median_ms": 30.0}, "raw_socket_limit": {"median_ms": 20.0},
           "cold_save_tcp": {"median_ms": save_ms, "server_cpu_s_per_GB": 5.0, "transports": {"tcp": 3}},
           "restore_tcp": {"median_ms": restore_ms, "server_cpu_s_per_GB": 1.0, "transports": {"tcp": 3}}}  # fmt: skip
    conc = {"tcp": {op: {"tokens": 4096, "ratio": 1.1, "one": {"aggregate_MBps": 100.0, "server_cpu_s_total": 1.0},
                         "two": {"aggregate_MBps": 110.0, "server_cpu_s_total": 2.0}} for op in ("save", "restore")}}
    return {"environment": {"cpus": 2}, "params": {"fsync": "manifest", "window": 64}, "rdma_used": False,
            "sizes": {"rows": [row]}, "concurrency": conc}  # fmt: skip


def test_report_puts_every_figure_beside_its_limit():
    md = throughput_report.markdown(_result(90.0, 40.0))
    assert "| 4,096 | 50,331,648 | cold save, TCP | 90.0 |" in md and "| 3.00× | ≤ 1.5× |" in md
    assert "raw loopback socket | 20.0 |" in md and "| 2.00× | ≤ 1.5× |" in md
    table = throughput_report.compare(_result(90.0, 40.0), _result(60.0, 40.0))
    assert "| 4,096 | cold save, TCP | 90.0 | 3.00× | 60.0 | 2.00× | 1.50× |" in table


def test_the_disk_limit_writes_and_syncs_the_bytes(tmp_path):
    out = throughput.fdatasync_limit(str(tmp_path), memoryview(bytes(1 << 20)), 2)
    assert out["n"] == 2 and out["bytes"] == 1 << 20 and not list(tmp_path.iterdir())


def test_infinistore_is_skipped_with_its_reason_when_absent(monkeypatch, tmp_path):
    monkeypatch.setenv("RDMAKV_INFINISTORE_PYTHON", str(tmp_path / "no-such-python"))
    assert "is not there" in throughput_peer.run([], quick=True)["skipped"]


def test_the_two_stream_ceiling_runs_both_limits_at_once_and_is_reported(tmp_path):
    from bench import scaling_limits

    out = scaling_limits.limit_scaling(1 << 20, 2, str(tmp_path), lead_s=0.5)
    for name in ("raw_socket", "raw_socket_mac", "fdatasync"):
        c = out[name]
        assert c["one_MBps"] > 0 and c["two_MBps"] > 0 and c["ratio"] == c["two_MBps"] / c["one_MBps"]
    assert not list(tmp_path.iterdir())  # its files are gone
    r = _result(90.0, 40.0) | {"concurrency": {"tcp": {}}, "concurrency_limits": out}
    md = throughput_report.markdown(r)
    assert "| raw loopback socket |" in md and "| raw socket + frame MAC |" in md and "| write + fdatasync |" in md


def test_the_design_floor_does_the_bytes_work_of_a_save(tmp_path):
    from bench import tcp_limit

    plain = tcp_limit.raw_transfer(1 << 20, 2, mac=True, sync_dir=str(tmp_path))
    design = tcp_limit.raw_transfer(1 << 20, 2, mac=True, sync_dir=str(tmp_path), chunk=16384)
    assert design["chunk"] == 16384 and plain["chunk"] == 0 and design["n"] == 2
    assert not list(tmp_path.iterdir())  # its file is gone
    row = _result(90.0, 40.0)["sizes"]["rows"][0] | {
        "raw_socket_mac_floor": {"median_ms": 25.0}, "raw_durable_save_floor": {"median_ms": 45.0},
        "raw_design_save_floor": {"median_ms": 60.0}}  # fmt: skip
    md = throughput_report.markdown(_result(90.0, 40.0) | {"sizes": {"rows": [row]}})
    # tokens, raw, +MAC, +disk, +design work, write+fdatasync, design/sync, restore/MAC, save/disk, save/design
    assert "| 4,096 | 20.0 | 25.0 | 45.0 | 60.0 | 30.0 | 2.00× | 1.60× | 2.00× | 1.50× |" in md


def test_two_clients_report_the_cores_they_keep_busy():
    r = _result(90.0, 40.0)
    for op in r["concurrency"]["tcp"].values():
        op["one"] |= {"client_cpu_s_total": 0.5, "cores_busy": 1.6}
        op["two"] |= {"client_cpu_s_total": 1.0, "cores_busy": 1.9}
        op["cpu_cap"] = 2 / 1.6
    md = throughput_report.markdown(r)
    assert "| 1.10× | 1.00 / 2.00 | 0.50 / 1.00 | 1.60 / 1.90 | 1.25× |" in md
    assert "| 1.10× | 1.00 / 2.00 | - | - | - |" in throughput_report.markdown(_result(90.0, 40.0))  # an older run


def test_the_save_by_write_is_put_beside_its_own_floor():
    r = _result(90.0, 40.0)
    row = r["sizes"]["rows"][0] | {
        "cold_save_rdma": {"median_ms": 45.0, "transports": {"rdma": 3}},
        "cold_save_write_speedup_over_tcp": 2.0, "ib_write_bw_limit": {"bw_time_per_message_ms": 10.0},
        "write_save_floor": {"median_ms": 40.0}}  # fmt: skip
    md = throughput_report.markdown(r | {"sizes": {"rows": [row]}, "rdma_used": True})
    # tokens, WRITE save, ib_write_bw, the floor (+ write+fdatasync), WRITE / floor, TCP save, TCP / floor
    assert "| 4,096 | 45.0 | 10.0 | 40.0 | 1.12× | 90.0 | 2.25× |" in md
    assert "| cold save, RDMA WRITE | 45.0 | 1,118 | ib_write_bw, then write + fdatasync | 40.0 |" in md
