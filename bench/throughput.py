"""`rdmakv bench throughput`: large sessions against the physical limits of the same run.

Host part (always): sessions of 256, 4,096 and 16,384 tokens of the Qwen2.5-0.5B shape;
- cold save over TCP (server ``--fsync manifest``) vs write + fdatasync of the same bytes into the
  server's data dir (same filesystem);
- restore over TCP vs a raw loopback socket into a preallocated buffer;
- two clients saving (restoring) different sessions at once vs one: the ingest (egress) ratio;
- server CPU per GB saved / restored (/proc/<pid>/stat before and after the timed loop).
Guest part (``--rdma``, in `rdmakv rxe-vm`): RDMA restore vs `ib_read_bw` of the same bytes, cold
save by RDMA WRITE vs TCP, server CPU per GB for both; ``--infinistore`` adds InfiniStore's RDMA
and TCP reads of the same bytes (bench.throughput_peer). ``--profile`` samples the server with
py-spy during a 4k and a 16k cold save and a 16k restore (bench.throughput_profile).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import rdmakv
from rdmakv.client.store import connect
from rdmakv.store.server.spawn import ServerProcess

from . import envinfo, scaling_limits, tcp_limit
from .stats import summary
from .suites import Ctx, session

SIZES = [256, 4096, 16384]
QUICK_SIZES = [256, 4096]
GB = 1e9
WINDOW = 64  # tokens per chunk (the engines' usual W)


def _runs(n_tokens: int, quick: bool) -> int:
    if quick:
        return 3 if n_tokens <= 4096 else 2
    return 10 if n_tokens <= 256 else 5 if n_tokens <= 4096 else 3


def fdatasync_limit(directory: str, data: memoryview, runs: int) -> dict:
    """write + fdatasync of ``data`` into a new file in ``directory`` (what a durable save must do)."""
    samples = []
    for i in range(runs + 1):
        path = os.path.join(directory, f"limit-{i}.tmp")
        t0 = time.perf_counter()
        scaling_limits.write_synced(path, data)
        dt = time.perf_counter() - t0
        os.unlink(path)
        if i:  # the first one warms the page cache's allocator
            samples.append(dt)
    return summary(samples) | {"bytes": data.nbytes}


def _kv_bytes(kv: rdmakv.KVState) -> memoryview:
    return memoryview(b"".join(a.tobytes() for a in (*kv.k, *kv.v)))


def _per_gb(ticks: int, nbytes: int) -> float:
    return ticks / os.sysconf("SC_CLK_TCK") / (nbytes / GB)


def cold_saves(ctx: Ctx, n_tokens: int, runs: int, transport: str, seed: int) -> dict:
    """``runs`` cold saves (new chunks every time); wall and the server's CPU over the loop."""
    walls: list[float] = []
    cpu, nbytes = 0, 0
    seen: dict[str, int] = {}
    with ctx.connect("tput-save", transport) as st:
        for i in range(runs):
            kv = session(n_tokens, seed + i)
            c0 = ctx.server.cpu_ticks()
            rep = st.save(f"s{n_tokens}-{i}", kv)
            cpu += ctx.server.cpu_ticks() - c0
            walls.append(rep.wall_s)
            nbytes += kv.nbytes
            seen[rep.transport] = seen.get(rep.transport, 0) + 1
            ctx.record(f"throughput.save.{n_tokens}.{transport}", transport, rep.transport)
            del kv
            st.delete_manifest(f"s{n_tokens}-{i}")  # free the slab (and the guest's RAM)
    s = summary(walls)
    return s | {"bytes": nbytes // runs, "MBps": nbytes / runs / (s["median_ms"] / 1e3) / 1e6, "transports": seen,
                "server_cpu_s_per_GB": _per_gb(cpu, nbytes)}  # fmt: skip


def restores(ctx: Ctx, name: str, runs: int, transport: str, label: str) -> dict:
    walls: list[float] = []
    seen: dict[str, int] = {}
    nbytes = 0
    with ctx.connect("tput", transport) as st:
        st.restore(name)  # warm the buffer pool
        c0 = ctx.server.cpu_ticks()
        for _ in range(runs):
            t0 = time.perf_counter()
            kv, rep = st.restore(name, report=True)
            walls.append(time.perf_counter() - t0)
            nbytes += kv.nbytes
            seen[rep.transport] = seen.get(rep.transport, 0) + 1
            ctx.record(label, transport, rep.transport)
            del kv
        cpu = ctx.server.cpu_ticks() - c0
    s = summary(walls)
    return s | {"bytes": nbytes // runs, "MBps": nbytes / runs / (s["median_ms"] / 1e3) / 1e6, "transports": seen,
                "server_cpu_s_per_GB": _per_gb(cpu, nbytes), "reads_posted": rep.reads_posted}  # fmt: skip


def _client(args: tuple) -> tuple[int, float, float, dict, float]:
    """One process: ``reps`` cold saves of its own sessions, or ``reps`` restores of its session."""
    url, key, transport, op, idx, n_tokens, reps, start_at = args
    with connect(url, key=key, transport=transport, window=WINDOW) as st:  # one node: a Store
        if op == "save":
            kvs = [session(n_tokens, 900_000 + 1000 * idx + i + int(start_at) % 997 * 10) for i in range(reps)]
        else:
            st.restore(f"c{idx}")
        while time.time() < start_at:
            time.sleep(0.001)
        t0, cpu0, total = time.time(), time.process_time(), 0
        seen: dict[str, int] = {}
        for i in range(reps):
            if op == "save":
                transport_used = st.save(f"c{idx}-{i}", kvs[i]).transport
                total += kvs[i].nbytes
            else:
                kv, restored = st.restore(f"c{idx}", report=True)
                transport_used = restored.transport
                total += kv.nbytes
            seen[transport_used] = seen.get(transport_used, 0) + 1
        t1, cpu = time.time(), time.process_time() - cpu0
        if op == "save":
            for i in range(reps):
                st.delete_manifest(f"c{idx}-{i}")
        return total, t0, t1, seen, cpu


def concurrent(ctx: Ctx, op: str, clients: int, n_tokens: int, reps: int, transport: str = "tcp") -> dict:
    """Aggregate MB/s of ``clients`` processes doing ``op`` at once, each on its own sessions, and
    the CPU they and the server spent while they ran ("cores_busy": CPU seconds / wall seconds).
    On a machine of C cores, one client keeping B cores busy caps two clients at C / B times its
    speed, whatever the protocol."""
    mpc = mp.get_context("spawn")  # forked children would share the parent's verbs state
    with mpc.Pool(clients) as pool:
        start_at = time.time() + 4.0 + (3.0 if op == "save" else 0.5) * clients * (n_tokens / 4096)
        jobs = [(ctx.url("tput"), ctx.key, transport, op, i, n_tokens, reps, start_at) for i in range(clients)]
        pending = pool.map_async(_client, jobs)
        while time.time() < start_at and not pending.ready():  # the clients' warm-up is not counted
            time.sleep(0.001)
        c0 = ctx.server.cpu_ticks()
        res = pending.get()
        cpu = ctx.server.cpu_ticks() - c0
    total = sum(r[0] for r in res)
    wall = max(r[2] for r in res) - min(r[1] for r in res)
    seen: dict = {}
    for r in res:
        for t, n in r[3].items():
            seen[t] = seen.get(t, 0) + n
            ctx.record(f"throughput.concurrent.{op}.{clients}.{transport}", transport, t, n)
    late = max(r[1] for r in res) - start_at
    server_cpu, client_cpu = cpu / os.sysconf("SC_CLK_TCK"), sum(r[4] for r in res)
    return {"clients": clients, "bytes": total, "wall_s": wall, "aggregate_MBps": total / wall / 1e6,
            "transports": seen, "server_cpu_s_total": server_cpu, "client_cpu_s_total": client_cpu,
            "cores_busy": (server_cpu + client_cpu) / wall, "start_skew_s": late}  # fmt: skip


def _scaling(ctx: Ctx, op: str, n_tokens: int, reps: int, transport: str) -> dict:
    one = concurrent(ctx, op, 1, n_tokens, reps, transport)
    two = concurrent(ctx, op, 2, n_tokens, reps, transport)
    cores = os.cpu_count() or 1
    return {"tokens": n_tokens, "reps_per_client": reps, "one": one, "two": two,
            "ratio": two["aggregate_MBps"] / one["aggregate_MBps"], "cores": cores,
            "cpu_cap": cores / one["cores_busy"]}  # fmt: skip


def host_part(ctx: Ctx, sizes: list[int], quick: bool, data_dir: str) -> dict:
    rows = []
    for n in sizes:
        runs = _runs(n, quick)
        ref = session(n, 7)
        row: dict = {"tokens": n, "bytes": ref.nbytes, "runs": runs}
        row["fdatasync_limit"] = fdatasync_limit(data_dir, _kv_bytes(ref), runs)
        row["raw_socket_limit"] = tcp_limit.raw_transfer(ref.nbytes, max(runs, 5))
        # what the limits are made of: the same transfer with the frame MAC on both ends, and also
        # written to disk as it lands (no per-chunk work): how far a protocol could get here
        row["raw_socket_mac_floor"] = tcp_limit.raw_transfer(ref.nbytes, max(runs, 5), mac=True)
        row["raw_durable_save_floor"] = tcp_limit.raw_transfer(ref.nbytes, max(runs, 5), mac=True, sync_dir=data_dir)
        # and with the bytes work of the design (keys, the slab copy, two hashes), in native calls only
        chunk = WINDOW * ref.k[0].nbytes // ref.k[0].shape[0]
        row["raw_design_save_floor"] = tcp_limit.raw_transfer(ref.nbytes, max(runs, 5), mac=True, sync_dir=data_dir,
                                                              chunk=chunk)  # fmt: skip
        with ctx.connect("tput", "tcp") as w:
            w.save(f"r{n}", ref)
        del ref
        for t in ctx.transports():
            row[f"cold_save_{t}"] = cold_saves(ctx, n, runs, t, 10_000 * n + (500 if t == "rdma" else 0))
            row[f"restore_{t}"] = restores(ctx, f"r{n}", runs, t, f"throughput.restore.{n}.{t}")
        ms = {k: v["median_ms"] for k, v in row.items() if isinstance(v, dict) and "median_ms" in v}
        row["cold_save_tcp_over_fdatasync"] = ms["cold_save_tcp"] / ms["fdatasync_limit"]
        row["restore_tcp_over_raw_socket"] = ms["restore_tcp"] / ms["raw_socket_limit"]
        if ctx.rdma:
            row["cold_save_write_speedup_over_tcp"] = ms["cold_save_tcp"] / ms["cold_save_rdma"]
        rows.append(row)
        with ctx.connect("tput", "tcp") as w:
            w.delete_manifest(f"r{n}")
    return {"rows": rows}


def concurrency_part(ctx: Ctx, n_tokens: int, quick: bool) -> dict:
    reps = 2 if quick else 4
    with ctx.connect("tput", "tcp") as w:
        for i in range(2):
            w.save(f"c{i}", session(n_tokens, 70 + i))
    out = {t: {"save": _scaling(ctx, "save", n_tokens, reps, t),
               "restore": _scaling(ctx, "restore", n_tokens, reps * 2, t)} for t in ctx.transports()}  # fmt: skip
    with ctx.connect("tput", "tcp") as w:
        for i in range(2):
            w.delete_manifest(f"c{i}")
    return out


def rdma_limits(ctx: Ctx, rows: list[dict], quick: bool) -> None:
    """ib_read_bw for each row's bytes, beside the RDMA restore; ib_write_bw beside the save by
    WRITE, whose floor is that plus the same bytes' write + fdatasync (the server logs what was
    written; nothing of it can start before the bytes are there)."""
    from rdmakv import rdma

    from . import limits as lim

    dev = rdma.Device.open(os.environ.get("RDMAKV_RDMA_DEVICE") or None)
    addr = lim.device_ipv4(dev.caps.gid)
    for row in rows:
        iters = 5 if row["bytes"] > (64 << 20) else 20 if quick else 50
        pt = row["ib_read_bw_limit"] = _perftest_or_error(lim.perftest, row["bytes"], iters, dev, addr)
        if pt.get("bw_time_per_message_ms") and "restore_rdma" in row:
            row["restore_rdma_over_ib_read_bw"] = row["restore_rdma"]["median_ms"] / pt["bw_time_per_message_ms"]
        wt = row["ib_write_bw_limit"] = _perftest_or_error(lim.perftest_write, row["bytes"], iters, dev, addr)
        if wt.get("bw_time_per_message_ms"):
            floor = wt["bw_time_per_message_ms"] + row["fdatasync_limit"]["median_ms"]
            row["write_save_floor"] = {"median_ms": floor, "ib_write_bw_ms": wt["bw_time_per_message_ms"],
                                       "fdatasync_ms": row["fdatasync_limit"]["median_ms"]}  # fmt: skip


def _perftest_or_error(tool: Callable[[int, int, str, int, str], dict], nbytes: int, iters: int, dev: Any,
                       addr: str | None) -> dict:  # fmt: skip
    """One perftest figure, or {"error": why} (reported; it never aborts the bench)."""
    try:
        if addr is None:
            raise RuntimeError("device has no IPv4 RoCE GID for perftest")
        return tool(nbytes, iters, dev.caps.name, dev.caps.gid_index, addr)
    except Exception as e:  # noqa: BLE001 - reported, never aborts the bench
        return {"error": str(e)}


def run(args: argparse.Namespace) -> dict:
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else (QUICK_SIZES if args.quick else SIZES)
    os.makedirs(args.out, exist_ok=True)
    key = os.urandom(32).hex()
    data_dir = tempfile.mkdtemp(prefix="rdmakv-tput-", dir=args.data_parent)
    extra = ["--fsync", args.fsync, "--transport", "auto" if args.rdma else "tcp"]
    server = ServerProcess(data_dir, args.capacity, *extra, key_hex=key).start()
    result: dict = {"environment": envinfo.collect(), "data_dir": data_dir,
                    "params": {"sizes": sizes, "fsync": args.fsync, "capacity": args.capacity, "quick": args.quick,
                               "window": WINDOW, "concurrency_tokens": args.concurrency_tokens},
                    "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    t_all = time.perf_counter()
    try:
        rdma_ok = False
        reason = "not asked (--rdma runs the guest part)"
        if args.rdma:
            from rdmakv.rdma.device import rdma_here

            ok, why = rdma_here()
            rdma_ok = ok and server.rdma
            reason = "" if rdma_ok else (why or "server found no RDMA device")
            if not rdma_ok:
                raise SystemExit(f"rdmakv bench throughput: --rdma but RDMA is unavailable: {reason}")
        ctx = Ctx(server, key, rdma_ok, reason, args.out, args.quick)
        result["rdma_used"], result["rdma_skipped_because"] = rdma_ok, reason
        if args.profile:
            from . import throughput_profile

            result["profile"] = throughput_profile.profile(ctx, args.out, args.profile_sizes)
        if not args.only_profile:
            _step(result, "sizes", lambda: host_part(ctx, sizes, args.quick, data_dir))
            if rdma_ok and "sizes" in result and "rows" in result["sizes"]:
                _step(result, "rdma_limits", lambda: rdma_limits(ctx, result["sizes"]["rows"], args.quick))
            if args.concurrency_tokens:
                _step(result, "concurrency", lambda: concurrency_part(ctx, args.concurrency_tokens, args.quick))
                nbytes = session(args.concurrency_tokens, 70).nbytes
                _step(result, "concurrency_limits",
                      lambda: scaling_limits.limit_scaling(nbytes, 4 if args.quick else 8, data_dir))  # fmt: skip
        result["op_transports"] = ctx.ops
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    if args.infinistore:  # after rdmakv's server is gone: the guest's memory is InfiniStore's
        from . import throughput_peer

        _step(result, "infinistore", lambda: throughput_peer.run(result.get("sizes", {}).get("rows", []), args.quick))
    result["total_seconds"] = round(time.perf_counter() - t_all, 1)
    return result


def _step(result: dict, name: str, fn) -> None:
    print(f"bench throughput: {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        out = fn()
        if out is not None:
            result[name] = out
    except Exception as e:  # noqa: BLE001 - one failed part must not lose the others
        result[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"bench throughput: {name} failed: {e}", file=sys.stderr, flush=True)
    result.setdefault("step_seconds", {})[name] = round(time.perf_counter() - t0, 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rdmakv bench throughput",
        description="Large sessions against the limits measured in the same run: cold save vs write+fdatasync, "
        "restore vs a raw loopback socket, two clients vs one, server CPU per GB. --rdma (in the rxe guest: "
        "rdmakv rxe-vm --mem 6G -- rdmakv bench throughput --rdma) adds RDMA restore vs ib_read_bw and cold save "
        "by RDMA WRITE; --infinistore adds InfiniStore's reads of the same bytes.",
    )
    p.add_argument("--out", default="bench/results/throughput", help="output directory")
    p.add_argument("--quick", action="store_true", help="256 and 4,096 tokens, fewer runs")
    p.add_argument("--sizes", default="", help="comma-separated session sizes in tokens (default 256,4096,16384)")
    p.add_argument("--fsync", choices=("never", "manifest", "always"), default="manifest")
    p.add_argument("--capacity", default="1GiB", help="server memory tier (default 1GiB)")
    p.add_argument("--data-parent", default=None, help="where the server's data dir goes (default $TMPDIR)")
    p.add_argument("--concurrency-tokens", type=int, default=4096, help="session size of the 1-vs-2 client runs "
                   "(0: skip them)")  # fmt: skip
    p.add_argument("--rdma", action="store_true", help="the guest part: RDMA restore/WRITE save and ib_read_bw")
    p.add_argument("--infinistore", action="store_true", help="InfiniStore's RDMA and TCP reads of the same bytes "
                   "(needs its venv; see bench/throughput_peer.py)")  # fmt: skip
    p.add_argument("--profile", action="store_true", help="py-spy the server during cold saves and a restore")
    p.add_argument("--profile-sizes", default="4096,16384", help="session sizes profiled (default 4096,16384)")
    p.add_argument("--only-profile", action="store_true", help="run the profile and nothing else")
    p.add_argument("--json-name", default="", help="results go to NAME.json, .md, .png (default results[-rdma])")
    p.add_argument("--no-plots", action="store_true")
    return p


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.only_profile:
        args.profile = True
    result = run(args)
    from . import throughput_report

    stem = args.json_name.removesuffix(".json") or ("results-rdma" if args.rdma else "results")
    path = os.path.join(args.out, f"{stem}.json")
    if not args.no_plots and not args.only_profile:
        result["plot"] = throughput_report.plot(result, os.path.join(args.out, f"{stem}.png"))
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=float)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(throughput_report.markdown(result))
    print(throughput_report.markdown(result))
    print(f"bench throughput: wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(sys.argv[1:] if argv is None else argv)
