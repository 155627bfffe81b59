"""`rdmakv bench [SUITE]` (or `python -m bench`), the one entry point of every benchmark.

Without a suite name: the core suite (RDMA vs TCP vs v1 single blob, against the link's limit).
With one: that suite's own options follow (`rdmakv bench SUITE --help`); `rdmakv bench --list`
names them all. Each suite is a module of this package with a ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from rdmakv import progress
from rdmakv.rdma.device import rdma_here
from rdmakv.store.server.spawn import ServerProcess

from . import envinfo, report, saves, suites, tcp_limit

QUICK: dict[str, Any] = {  # each suite's parameters: counts and lists of sizes
    "walls_runs": 10,
    "sizes": [256, 1024],
    "windows": [8, 64, 256],
    "window_tokens": 1024,
    "scale_runs": 5,
    "limit_runs": 10,
    "cpu_restores": 30,
    "clients": [1, 2],
    "client_reps": 3,
    "client_tokens": 256,
    "tune_runs": 3,
    "save_sizes": [256, 1024],
    "save_runs": 3,
    "cpu_saves": 10,
    "load_restores": 20,
}
FULL: dict[str, Any] = {
    "walls_runs": 30,
    "sizes": [256, 1024, 4096, 16384],
    "windows": [8, 64, 256],
    "window_tokens": 1024,
    "scale_runs": 20,
    "limit_runs": 30,
    "cpu_restores": 100,
    "clients": [1, 2, 4, 8],
    "client_reps": 5,
    "client_tokens": 1024,
    "tune_runs": 20,
    "save_sizes": [256, 1024, 4096, 16384],
    "save_runs": 10,
    "cpu_saves": 30,
    "load_restores": 200,
}


def run(args: argparse.Namespace) -> dict:
    params = dict(QUICK if args.quick else FULL)
    if args.runs:
        params["walls_runs"] = params["scale_runs"] = params["limit_runs"] = params["tune_runs"] = args.runs
    os.makedirs(args.out, exist_ok=True)
    key = os.urandom(32).hex()
    data_dir = tempfile.mkdtemp(prefix="rdmakv-bench-")
    extra = ["--fsync", args.fsync, "--transport", "tcp" if args.transport == "tcp" else "auto"]
    server = ServerProcess(data_dir, args.capacity, *extra, key_hex=key).start()
    try:
        ok, why = rdma_here()
        rdma = args.transport != "tcp" and server.rdma and ok
        reason = "" if rdma else (why or ("disabled (--transport tcp)" if args.transport == "tcp" else
                                          "server found no RDMA device"))
        if args.transport == "rdma" and not rdma:
            raise SystemExit(f"rdmakv bench: --transport rdma but RDMA is unavailable: {reason}")
        ctx = suites.Ctx(server, key, rdma, reason, args.out, args.quick)
        result: dict = {
            "mode": "quick" if args.quick else "full",
            "params": {**params, "fsync": args.fsync, "capacity": args.capacity},
            "environment": envinfo.collect(),
            "rdma_used": rdma,
            "rdma_skipped_because": reason,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        steps = [
            ("seed_scenarios", lambda: suites.seed_scenarios(ctx)),
            ("walls", lambda: suites.walls(ctx, params["walls_runs"], args.fsync != "never")),
            ("scaling", lambda: suites.scaling(ctx, params["sizes"], params["windows"], params["window_tokens"],
                                               params["scale_runs"])),
            ("server_cpu", lambda: suites.server_cpu(ctx, params["cpu_restores"])),
            ("concurrency", lambda: suites.concurrency(ctx, params["clients"], params["client_reps"],
                                                       params["client_tokens"])),
            ("tuning", lambda: suites.tuning(ctx, params["tune_runs"])),
            ("tcp_limit", lambda: tcp_limit.tcp_limit(ctx, params["walls_runs"])),
            ("saves", lambda: saves.saves(ctx, params["save_sizes"], params["save_runs"], params["cpu_saves"],
                                          params["load_restores"])),
        ]
        if rdma:
            steps.append(("limits", lambda: suites.limits(
                ctx, result["walls"].get("restore_rdma", {}).get("median_ms"), result["walls"]["kv_bytes"],
                params["limit_runs"])))
        t_all = time.perf_counter()
        with progress.stages(f"rdmakv bench{' --quick' if args.quick else ''}", [n for n, _ in steps],
                             quiet=args.quiet, status=lambda: f"{ctx.runs()} timed runs") as enter:  # fmt: skip
            _run_steps(steps, result, server, enter)
        result["total_seconds"] = round(time.perf_counter() - t_all, 2)
        result["op_transports"] = ctx.ops  # what each timed operation's report said it ran over
        result["targets"] = report.targets(result)
        return result
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _run_steps(steps: list, result: dict, server: ServerProcess, enter) -> None:
    for name, fn in steps:
        t0 = time.perf_counter()
        enter(name)
        if not progress.enabled():
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failed suite must not lose the others
            alive = server.proc is not None and server.proc.poll() is None
            result[name] = {"error": f"{type(e).__name__}: {e}", "server_alive": alive,
                            "server_log_tail": "".join(server.log[-10:])}
            print(f"bench: {name} failed: {e}", file=sys.stderr, flush=True)
            if not alive:  # e.g. the OOM killer in a small guest: carry on with a fresh server
                server.start()
        result.setdefault("suite_seconds", {})[name] = round(time.perf_counter() - t0, 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rdmakv bench",
        description="Benchmark save/restore over TCP and RDMA READ against the v1 single-blob baseline and the "
        "link's own limit (perftest, raw pyverbs). Writes results.json, report.md and PNG plots. Without an "
        "RDMA device it runs the TCP/v1 parts and says why RDMA was skipped. In a machine without RDMA run it "
        "in the soft-RoCE guest: rdmakv rxe-vm -- rdmakv bench --quick. Other suites: rdmakv bench SUITE "
        "(rdmakv bench --list names them; rdmakv bench SUITE --help shows a suite's options).",
    )
    p.add_argument("--quick", action="store_true", help="small run (< 3 min in the UML guest); CI uses it")
    p.add_argument("--out", default="bench/out/latest", help="output directory (default bench/out/latest)")
    p.add_argument("--runs", type=int, default=0, help="override the repetition count of the timed suites")
    p.add_argument("--transport", choices=("auto", "rdma", "tcp"), default="auto",
                   help="auto: RDMA where both ends can; rdma: fail without it; tcp: TCP/v1 only")
    p.add_argument("--fsync", choices=("never", "manifest", "always"), default="never",
                   help="server log fsync policy; v1 files are fsync'd too unless 'never' (default never)")
    p.add_argument("--capacity", default="2GiB", help="server capacity (default 2GiB)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress line (none either when stdout is no terminal)")
    return p


# suite -> (module of this package, what it measures); each module has main(argv) -> int
SUITES: dict[str, tuple[str, str]] = {
    "lifecycle": ("lifecycle", "the store as a months-long cache: a soak with churn, restarts and pressure"),
    "ttft": ("ttft", "the next turn's time to first token with a Qwen2.5-0.5B-shaped model (llama-server)"),
    "ttft-rdma": ("ttft_rdma", "the auto-cache's restore without llama-server, RDMA READ vs TCP (in the guest)"),
    "ttft-report": ("ttft_report", "re-render bench/results/ttft (e.g. once rdma.json was added)"),
    "lmcache": ("lmcache", "LMCache's engine through rdmakv and through LMCache's own tiers"),
    "llama": ("llama", "llama-server slot save/restore through rdmakv llama-proxy vs local files"),
    "kvstore-abi": ("kvstore_abi", "the kv_store_v1 library from C against the Python API"),
    "cluster": ("cluster", "cluster figures on this host over TCP"),
    "two-node": ("two_node", "a cluster across two rxe guests"),
    "placement": ("placement", "how many chunks a join or a leave moves"),
    "metrics-cost": ("metrics_cost", "what Prometheus metrics cost a server"),
    "fuzz": ("fuzz", "the protocol fuzzer against a real rdmakv serve, for long runs"),
    "throughput": ("throughput", "large sessions against the disk's and the link's limits (host; --rdma in the guest)"),
    "throughput-compare": ("throughput_report", "the before/after table of two throughput results.json"),
    "throughput-profile": ("throughput_profile", "the top entries of py-spy raw stacks"),
    "write-phases": ("write_phases", "where a save by WRITE spends its time, beside a TCP save (in the guest)"),
    "check": ("check", "check a results.json against the targets (CI)"),
}


def cli(argv: list[str]) -> int:
    if argv and argv[0] == "--list":
        width = max(map(len, SUITES))
        print("\n".join(f"{name:<{width}}  {what}" for name, (_, what) in SUITES.items()))
        return 0
    if argv and argv[0] in SUITES:
        import importlib

        module = importlib.import_module(f"{__package__}.{SUITES[argv[0]][0]}")
        return int(module.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    result = run(args)
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=float)
    md = report.markdown(result)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(md)
    if not args.no_plots:
        result["plots"] = report.plots(result, args.out)
        with open(path, "w") as f:
            json.dump(result, f, indent=2, default=float)
    print(json.dumps({"environment": result["environment"], "targets": result["targets"],
                      "results": path}, indent=2, default=float))
    print(f"bench: wrote {path}, {os.path.join(args.out, 'report.md')}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(sys.argv[1:] if argv is None else argv)
