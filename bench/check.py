"""Check that a bench results.json is complete (CI runs `--quick` and this; numbers are not judged)."""

from __future__ import annotations

import json
import sys

REQUIRED = {
    "environment": ["kernel", "accel", "cpus", "packages", "rdma"],
    "seed_scenarios": ["bytes_on_wire", "chat_storage", "shared_prompt_storage"],
    "walls": ["cold_save", "warm_save", "restore_tcp", "v1_save", "v1_restore", "kv_bytes"],
    "scaling": ["by_size", "by_window"],
    "server_cpu": ["tcp"],
    "concurrency": ["rows"],
    "tuning": ["hash_throughput"],
    "tcp_limit": ["raw_socket", "variants", "restore_default_over_raw"],
    "saves": ["by_size", "server_cpu", "restore_under_save_load"],
    "targets": [],
}
REQUIRED_RDMA = {
    "walls": ["restore_rdma"],
    "server_cpu": ["rdma", "rdma_over_tcp"],
    "limits": ["perftest", "raw_pyverbs", "rdma_restore_over_raw_pyverbs"],
    "tuning": ["rdma_no_merge", "per_wr_cost_us"],
}


def problems(r: dict, need_rdma: bool) -> list[str]:
    out = []
    want = {k: list(v) for k, v in REQUIRED.items()}
    if need_rdma or r.get("rdma_used"):
        for k, v in REQUIRED_RDMA.items():
            want.setdefault(k, []).extend(v)
    for section, keys in want.items():
        if section not in r:
            out.append(f"missing section {section}")
            continue
        if "error" in r[section]:
            out.append(f"{section} failed: {r[section]['error']}")
            continue
        out.extend(f"{section}: missing {k}" for k in keys if k not in r[section])
    if need_rdma and not r.get("rdma_used"):
        out.append(f"RDMA was required but skipped: {r.get('rdma_skipped_because')}")
    if (need_rdma or r.get("rdma_used")) and "error" in r.get("limits", {}).get("perftest", {}):
        out.append(f"perftest failed: {r['limits']['perftest']['error']}")
    ops = r.get("op_transports")
    if ops is None:
        out.append("missing section op_transports (each timed operation's reported transport)")
    for label, e in (ops or {}).items():
        wrong = {t: n for t, n in e["seen"].items() if t != e["expected"]}
        if wrong:
            out.append(f"{label}: labelled {e['expected']} but {sum(wrong.values())} of "
                       f"{sum(e['seen'].values())} ran over {', '.join(sorted(wrong))}")
    if need_rdma and not any(e["expected"] == "rdma" and e["seen"].get("rdma") for e in (ops or {}).values()):
        out.append("no timed operation reported rdma")
    for row in r.get("saves", {}).get("by_size", []) if isinstance(r.get("saves"), dict) else []:
        if "tcp" not in row or (r.get("rdma_used") and "rdma" not in row):
            out.append(f"saves row {row.get('tokens')} incomplete")
    for row in r.get("scaling", {}).get("by_size", []):
        if "tcp" not in row or (r.get("rdma_used") and "rdma" not in row):
            out.append(f"scaling row {row.get('tokens')} incomplete")
    return out


def main(argv: list[str]) -> int:
    path = argv[0]
    need_rdma = "--require-rdma" in argv
    with open(path) as f:
        r = json.load(f)
    bad = problems(r, need_rdma)
    if bad:
        print("bench results incomplete:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    print(f"bench results complete: {path} ({r['mode']} run, rdma_used={r['rdma_used']})")
    return 0
