"""`rdmakv bench lmcache`: LMCache's own engine storing and
retrieving the same workload through each tier, side by side in one run.

Tiers: rdmakv over RDMA (where there is a device: run it in the rxe guest) and over TCP,
LMCache's ``lm://`` server, LMCache's Redis connector against Debian's ``redis-server``, and
LMCache's local-disk backend. Workload: Qwen2.5-0.5B's KV shape (24 layers, 2 KV heads of 64,
bf16), 256-token LMCache chunks, prompts of 1k and 8k tokens; every run stores a new prompt
(nothing is flushed between runs: each tier fills up as a cache does), then looks it up and
retrieves it into a zeroed KV tensor and checks it bit-exact. A store is timed until the tier
holds it (not until ``engine.store`` returns: LMCache saves in the background). Then, per tier:
the bytes it holds for two engines sharing a 1k-token system prompt, and whether a prompt is
still there after the server restarts (cleanly, and killed). Beside them, measured in the same
run: the same bytes over a raw loopback socket, a raw pyverbs READ, and a memcpy.

Each tier runs in its own process (LMCache keeps per-process singletons); all write one JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("rdmakv-rdma", "rdmakv-tcp", "lm", "redis", "local-disk")
VARIANTS = ("rdmakv-rdma-w0", "rdmakv-tcp-w0")  # whole-layer pieces instead of the plugin's default window
VENV = ROOT / ".venv-lmcache" / "bin" / "python"
SYSTEM_PROMPT = 1000  # tokens: a 1k-token system prompt that, as most do, ends inside an LMCache chunk
USER_TURN = 1000


def _ensure_lmcache(argv: list[str]) -> None:
    """LMCache lives in .venv-lmcache (./dev makes it): re-run there when it is not importable here."""
    try:
        import lmcache  # noqa: F401
    except ImportError:
        if VENV.exists() and Path(sys.executable) != VENV:
            os.execv(str(VENV), [str(VENV), "-m", "bench", "lmcache", *argv])
        raise SystemExit("bench.lmcache needs LMCache: run ./dev setup (it makes .venv-lmcache)") from None
    if os.environ.get("PYTHONHASHSEED") != "0" or "LMCACHE_LOG_LEVEL" not in os.environ:
        # engines in different processes must agree on keys; LMCache's INFO lines would drown the report
        env = dict(os.environ, PYTHONHASHSEED="0", LMCACHE_TRACK_USAGE="false")
        env.setdefault("LMCACHE_LOG_LEVEL", "ERROR")
        os.execve(sys.executable, [sys.executable, "-m", "bench", "lmcache", *argv], env)


def make_tier(name: str, work: Path, key: str):
    from . import lmcache_backends as lb

    if name.startswith("rdmakv-"):  # rdmakv-TRANSPORT, or rdmakv-TRANSPORT-wN: N tokens a piece
        _, transport, *window = name.split("-")
        return lb.Rdmakv(work, transport, key, int(window[0][1:]) if window else None)
    return {"lm": lb.LMServer, "redis": lb.Redis, "local-disk": lb.LocalDisk}[name](work)


# -- one tier, in its own process -------------------------------------------------------------
class Timed:
    """LMCache's copy between its MemoryObjs and the KV tensor, timed (the same for every tier)."""

    def __init__(self) -> None:
        from rdmakv.lmcache import cpu_engine

        self.spent = 0.0
        orig = cpu_engine.CpuKV.batched_to_gpu

        def timed(conn, *a, **kw):
            t0 = time.perf_counter()
            try:
                return orig(conn, *a, **kw)
            finally:
                self.spent += time.perf_counter() - t0

        cpu_engine.CpuKV.batched_to_gpu = timed  # type: ignore[method-assign,assignment]  # timed: wraps it


def worker(args: argparse.Namespace) -> dict:
    import torch

    from rdmakv.lmcache.cpu_engine import Model, kv_for, make_engine, prompt, remote_connector, same_bytes

    from .stats import summary

    model = Model()
    tier = make_tier(args.tier, Path(args.work), args.key)
    copy = Timed()
    out: dict = {"tier": args.tier, "survives": tier.survives}
    tier.start()
    try:
        engine = make_engine(tier.config(), model)
        conn = remote_connector(engine)
        saves = 0
        for n in args.sizes:
            samples: dict[str, list[float]] = {k: [] for k in ("store", "store_call", "lookup", "retrieve", "copy")}
            transports: list[str] = []
            for run in range(args.runs + 1):  # the first run warms up and is not counted
                tokens = prompt(10_000 * n + run, n)
                kv = kv_for(tokens, model)
                keys = [k for _, _, k in engine.token_database.process_tokens(tokens)]
                saves += len(keys)
                t0 = time.perf_counter()
                engine.store(tokens, kv=kv)
                t1 = time.perf_counter()
                if not tier.wait_stored(engine, keys, saves):
                    raise RuntimeError(f"{args.tier}: a store of {n} tokens did not land within 120 s")
                t2 = time.perf_counter()
                got = torch.zeros_like(kv)
                copy.spent = 0.0
                t3 = time.perf_counter()
                hit = engine.lookup(tokens)
                t4 = time.perf_counter()
                mask = engine.retrieve(tokens, kv=got)
                t5 = time.perf_counter()
                if hit != n or int(mask.sum()) != n or not same_bytes(got, kv):
                    raise RuntimeError(f"{args.tier}: retrieve of {n} tokens: hit {hit}, got {int(mask.sum())}, "
                                       f"bit-exact {same_bytes(got, kv)}")  # fmt: skip
                if run:
                    for k, v in zip(samples, (t2 - t0, t1 - t0, t4 - t3, t5 - t3, copy.spent)):
                        samples[k].append(v)
                    if conn is not None:
                        transports.append(conn.last_get.transport)
            out[str(n)] = {k: summary(v) for k, v in samples.items()} | {
                "bytes": n * model.bytes_per_token(), "retrieve_transports": sorted(set(transports)),
                "retrieves_by": {t: transports.count(t) for t in set(transports)},
            }  # fmt: skip
        out["re_store"] = _re_store(engine, tier, model, saves)
        if conn is not None:
            out["connector"] = conn.stats()
        tier.close_engine(engine)
        if args.tier not in VARIANTS:  # a variant's restarts and stored bytes are its base tier's
            out["restart"] = _restarts(tier, model)
            out["shared_prefix"] = _shared_prefix(tier, model, args)
    finally:
        tier.stop()
    return out


def _re_store(engine, tier, model, saves: int) -> dict:
    """Storing a prompt the tier holds already (a conversation saved again), 1k tokens."""
    from rdmakv.lmcache.cpu_engine import kv_for, prompt

    from .stats import summary

    tokens = prompt(10_000 * 1024 + 1, 1024)  # stored by the timed runs
    kv = kv_for(tokens, model)
    keys = [k for _, _, k in engine.token_database.process_tokens(tokens)]
    samples = []
    for _ in range(5):
        saves += len(keys)
        t0 = time.perf_counter()
        engine.store(tokens, kv=kv)
        tier.wait_stored(engine, keys, saves)
        samples.append(time.perf_counter() - t0)
    return summary(samples)


def _restarts(tier, model) -> dict:
    """A prompt stored, the server restarted (SIGTERM, then SIGKILL): what a new engine finds."""
    from rdmakv.lmcache.cpu_engine import kv_for, make_engine, prompt

    out: dict[str, Any] = {}
    for how, stop in (("clean", tier.stop), ("killed", tier.kill)):
        tokens = prompt(777 + len(out), 1024)
        engine = make_engine(tier.config(), model)
        keys = [k for _, _, k in engine.token_database.process_tokens(tokens)]
        engine.store(tokens, kv=kv_for(tokens, model))
        tier.wait_stored(engine, keys, len(keys))
        tier.close_engine(engine)
        stop()
        tier.start()
        engine = make_engine(tier.config(), model)
        out[how] = {"tokens": len(tokens), "found": engine.lookup(tokens)}
        tier.close_engine(engine)
    return out


def _shared_prefix(tier, model, args) -> dict:
    """Two engines whose prompts share a 1k-token system prompt: what the tier holds for both
    (rdmakv: once per piece window, each in its own namespace)."""
    from .lmcache_backends import Rdmakv

    tier.stop()  # a fresh tier: only these two prompts in it
    tier.reset()
    tier.start()
    out: dict = {"logical_bytes": 2 * (SYSTEM_PROMPT + USER_TURN) * model.bytes_per_token()}
    if not isinstance(tier, Rdmakv):
        before = tier.stored_bytes()
        _store_pair(tier, model)
        return out | {"before": before, "after": tier.stored_bytes()}
    out["windows"] = {}
    for window in (64, 0):
        tier.ns, tier.window = f"shared-w{window}", window
        _store_pair(tier, model)
        out["windows"][str(window)] = tier.stored_bytes()
    return out


def _store_pair(tier, model) -> None:
    from rdmakv.lmcache.cpu_engine import kv_for, make_engine, prompt

    system = prompt(4242, SYSTEM_PROMPT)
    for e_no in (0, 1):
        engine = make_engine(tier.config(e_no), model)
        tokens = prompt(5000 + e_no, USER_TURN, prefix=system)
        keys = [k for _, _, k in engine.token_database.process_tokens(tokens)]
        engine.store(tokens, kv=kv_for(tokens, model))
        tier.wait_stored(engine, keys, len(keys))
        tier.close_engine(engine)


# -- limits measured in the same run -------------------------------------------------------
def limits(sizes: list[int], runs: int, rdma: bool) -> dict:
    import numpy as np

    from rdmakv.lmcache.cpu_engine import Model

    from . import tcp_limit
    from .stats import summary

    out: dict = {}
    per_token = Model().bytes_per_token()
    for n in sizes:
        nbytes = n * per_token
        src = np.ones(nbytes, np.uint8)
        dst = np.ones(nbytes, np.uint8)  # both touched: a memcpy, not page faults
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            dst[:] = src
            samples.append(time.perf_counter() - t0)
        row = {"memcpy": summary(samples), "loopback_tcp": tcp_limit.raw_transfer(nbytes, runs)}
        if rdma:
            from rdmakv.rdma import restore as rr

            from . import limits as lim

            try:
                row["raw_pyverbs_read"] = lim.raw_pyverbs_read(nbytes, runs, rr.MAX_READ_BYTES)
            except Exception as e:  # noqa: BLE001 - report, do not lose the run
                row["raw_pyverbs_read"] = {"error": str(e)}
        out[str(n)] = row
    return out


def run(args: argparse.Namespace) -> dict:
    from rdmakv.rdma.device import rdma_here

    from . import envinfo

    rdma, why = rdma_here()
    if not rdma and why == "no RDMA device on this host":
        why += " (run it in the guest: rdmakv rxe-vm --mem 8G -- rdmakv bench lmcache)"
    tiers = [t for t in args.tiers if not t.startswith("rdmakv-rdma") or rdma]
    work = Path(tempfile.mkdtemp(prefix="rdmakv-bench-lmcache-"))
    key = os.urandom(32).hex()
    result: dict = {
        "params": {"sizes": args.sizes, "runs": args.runs, "tiers": tiers, "chunk_tokens": 256,
                   "model": "Qwen2.5-0.5B KV shape: 24 layers, 2 KV heads x 64, bfloat16",
                   "system_prompt_tokens": SYSTEM_PROMPT, "user_turn_tokens": USER_TURN},
        "environment": envinfo.collect() | {"lmcache": _version("lmcache"), "torch": _version("torch"),
                                            "redis-server": envinfo._deb("redis-server")},
        "rdma_skipped_because": "" if rdma else why,
        "load_at_start": os.getloadavg(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    t_all = time.perf_counter()
    result["tiers"] = {}
    for name in tiers:
        print(f"bench.lmcache: {name} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "bench", "lmcache", "--worker", name, "--work", str(work),
               "--runs", str(args.runs), "--sizes", *map(str, args.sizes)]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RDMAKV_BENCH_KEY=key),
                           timeout=args.tier_timeout)  # fmt: skip
        line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        if r.returncode != 0 or not line.startswith("{"):
            result["tiers"][name] = {"error": f"exit {r.returncode}: {r.stderr[-2000:]}"}
            print(f"bench.lmcache: {name} failed:\n{r.stderr[-2000:]}", file=sys.stderr, flush=True)
        else:
            result["tiers"][name] = json.loads(line)
    print("bench.lmcache: limits ...", file=sys.stderr, flush=True)
    result["limits"] = limits(args.sizes, args.runs, rdma)
    result["load_at_end"] = os.getloadavg()
    result["total_seconds"] = round(time.perf_counter() - t_all, 1)
    from .lmcache_report import targets

    result["targets"] = targets(result)
    return result


def _version(pkg: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rdmakv bench lmcache", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/out/lmcache", help="output directory (default bench/out/lmcache)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per tier and size (default 20)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192], help="prompt sizes in tokens")
    p.add_argument("--tiers", nargs="+", default=list(TIERS), choices=TIERS + VARIANTS,
                   help=f"tiers to compare (default: {' '.join(TIERS)}; also {' '.join(VARIANTS)})")
    p.add_argument("--quick", action="store_true", help="3 runs, 1k tokens only")
    p.add_argument("--tier-timeout", type=float, default=3600, help="seconds one tier may take")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p


def cli(argv: list[str]) -> int:
    _ensure_lmcache(argv)
    args = build_parser().parse_args(argv)
    if args.quick:
        args.runs, args.sizes = 3, [1024]
    if args.worker:
        args.tier, args.key = args.worker, os.environ["RDMAKV_BENCH_KEY"]
        try:
            print(json.dumps(worker(args), default=float), flush=True)
        except BaseException:  # noqa: BLE001 - a worker reports whatever ended it, then exits
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)  # engines left open (see lmcache_backends.Redis) must not hold the exit
    from . import lmcache_report

    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    if not args.no_plots:
        result["plots"] = lmcache_report.plots(result, args.out)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=float)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(lmcache_report.markdown(result))
    print(json.dumps({"targets": result["targets"], "results": path}, indent=2, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(sys.argv[1:] if argv is None else argv)
