"""bench.ttft end to end with the tests' tiny model (the real run uses a Qwen2.5-0.5B-shaped one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ttft_report

pytestmark = pytest.mark.llama
ROOT = Path(__file__).resolve().parents[1]


def test_ttft_bench_runs_and_reports(tmp_path: Path, server_bin: Path) -> None:
    pytest.importorskip("gguf")
    pytest.importorskip("matplotlib")
    out = tmp_path / "ttft"
    r = subprocess.run(
        [sys.executable, "-m", "bench", "ttft", "--tiny", "--contexts", "300,600", "--runs", "2", "--prefill-runs", "2",
         "--settle", "0", "--out-dir", str(out), "--keep-slot-files", str(tmp_path / "slots")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for c in res["contexts"]:
        assert set(c["ttft"]) == {"reprefill", "cache_ram", "slot_file", "proxy_tcp"}
        assert all(c["ttft"][k]["n"] == 2 for k in c["ttft"])
        reports = c["detail"]["proxy_report"]
        assert len(reports) == 2 and all(x["prefix_source"] == "store" for x in reports)
        assert all(x["tokens_restored"] == c["context"] for x in reports), reports  # the whole history
        assert all(n >= c["context"] for case, n in c["detail"]["cache_n"] if case != "reprefill")
    assert (tmp_path / "slots" / "slot-300.bin").exists()
    md = (out / "report.md").read_text()
    assert "rdmakv llama-proxy --auto-cache" in md and (out / "ttft.png").stat().st_size > 0
    # with the guest's figures beside it (their shape as bench.ttft_rdma writes them)
    rdma = {"environment": {"accel": "UML guest", "rdma": {"name": "rxe0"}}, "runs": 1, "contexts": [
        {"context": 300, "bytes": 1, "rdma": {"median_ms": 1.0, "transports": ["rdma:rdma", "tcp:tcp"]},
         "tcp": {"median_ms": 2.0}}]}  # fmt: skip
    (out / "rdma.json").write_text(json.dumps(rdma))
    ttft_report.write(res, out)
    md = (out / "report.md").read_text()
    assert "the restore's store fetch + file alone, RDMA READ, rxe guest" in md
    assert "| 300 | 1 | 1.0 | 2.0 | 0.50 |" in md
