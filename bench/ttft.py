"""`rdmakv bench ttft`: time to first token of a conversation's next turn, with a model of
Qwen2.5-0.5B's dimensions, four ways.

For each context size C (default 1k, 4k, 16k tokens) a history H of C tokens is prefilled once;
the next turn is H plus a few new tokens (a new suffix every run, so nothing but H is ever
cached). Its time to first token (TTFT: request sent to the first streamed event) is measured:

1. ``reprefill``: llama-server with nothing cached (slot erased, ``--cache-ram 0``);
2. ``cache_ram``: llama-server's own host-RAM prompt cache hit (``--cache-ram``), same process;
3. ``slot_file``: llama-server's own slot file restore (its file on the slot dir), then the turn;
4. ``proxy_tcp``: `rdmakv llama-proxy --auto-cache` in front, the store over TCP (loopback).

Case 5 (RDMA) runs in the rxe guest: ``rdmakv bench ttft_rdma`` (the store fetch alone).
Every process is real; the model is a random-weight GGUF written with the ``gguf`` package
(``--model-dir``, not committed). Writes results.json, report.md and ttft.png (bench.ttft_report).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from rdmakv.store.server.spawn import ServerProcess

from . import envinfo, ttft_limits
from .llama import llama_version
from .llama_slots import fs_type

QWEN05 = {"n_embd": 896, "n_layer": 24, "n_head": 14, "n_head_kv": 2, "n_ff": 4864}  # Qwen2.5-0.5B
N_SPECIAL, BOS = 3, 1  # the test vocab: unk/bos/eos, then 256 byte tokens
LETTERS = [N_SPECIAL + c for c in range(ord("a"), ord("z") + 1)]
WINDOW = 256


def say(message: str) -> None:
    print(f"bench.ttft: {message}", file=sys.stderr, flush=True)


def letters(rng: random.Random, n: int) -> list[int]:
    return [rng.choice(LETTERS) for _ in range(n)]


def ttft(port: int, body: dict) -> tuple[float, dict, dict]:
    """(seconds to the first streamed event, the last event's timings, X-Rdmakv headers)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    t0 = time.perf_counter()
    conn.request("POST", "/completion", json.dumps(dict(body, stream=True)), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    headers = {k: v for k, v in resp.getheaders() if k.lower().startswith("x-rdmakv")}
    first, last = None, {}
    while line := resp.readline():
        if line.startswith(b"data: {"):
            if first is None:
                first = time.perf_counter() - t0
            last = json.loads(line[6:])
    conn.close()
    if resp.status != 200 or first is None:
        raise RuntimeError(f"completion on port {port} answered {resp.status} with no events")
    return first, last.get("timings", {}), headers


def call(port: int, path: str, body: dict | None = None) -> dict:
    """One POST to llama-server on a fresh connection (it closes idle kept-alive ones between runs)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", path, json.dumps(body or {}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"POST {path} -> {resp.status}: {raw[:500]!r}")
    return json.loads(raw or b"{}")


def model_file(lf, model_dir: Path, dtype: str) -> Path:
    """The Qwen-shaped random GGUF, written once into ``model_dir``."""
    import numpy as np

    path = model_dir / f"qwen2.5-0.5b-shape-random-{dtype}.gguf"
    if not path.exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        say(f"writing {path.name} (random weights, {dtype}) ...")
        tmp = path.with_suffix(".tmp")
        lf.write_tiny_llama_gguf(tmp, **QWEN05, n_ctx=32768, dtype=np.float16 if dtype == "f16" else np.float32)
        tmp.rename(path)
    return path


def saves_done(metrics_port: int) -> float:
    raw = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for line in raw.splitlines():
        if line.startswith('rdmakv_llama_proxy_background_saves_total{result="ok"}'):
            return float(line.split()[-1])
    return 0.0


def wait_saves(metrics_port: int, n: float, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while saves_done(metrics_port) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the proxy registered fewer than {n} saves in {timeout:g} s")
        time.sleep(0.05)


def measure_context(lf, binary: Path, model: Path, work: Path, store: ServerProcess, key: str, c: int,
                    args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    rng = random.Random(c)
    history = [BOS] + letters(rng, c - 1)
    suffixes = [letters(rng, args.suffix) for _ in range(args.runs + args.prefill_runs + 1)]
    n_ctx = c + args.suffix + 64
    slot_dir = work / f"slots-{c}"
    slot_dir.mkdir()
    turn = {"n_predict": 4, "temperature": 0, "cache_prompt": True}
    t: dict[str, list[float]] = {k: [] for k in ("reprefill", "cache_ram", "slot_file", "proxy_tcp")}
    detail: dict[str, list] = {k: [] for k in ("slot_file_restore_ms", "proxy_report", "cache_n", "turn_eval_ms")}
    servers: list[Any] = []
    try:
        llama = lf.LlamaServer(binary, model, slot_dir, "-np", "1", "--cache-ram", "0", n_ctx=n_ctx).__enter__()
        servers.append(llama)
        mport = lf.free_port()
        proxy = lf.LlamaProxy(llama.url, slot_dir, store.url(f"ttft-{c}"), key, "--auto-cache",
                              "--metrics-listen", f"127.0.0.1:{mport}").__enter__()  # fmt: skip
        servers.append(proxy)
        say(f"{c} tokens: turn 1 (prefill of the history, through the proxy) ...")
        first, timings, _ = ttft(proxy.port, dict(turn, prompt=history, n_predict=1))
        t["reprefill"].append(first)
        wait_saves(mport, 1)
        saved = call(llama.port, "/slots/0?action=save", {"filename": f"own-{c}.bin"})
        file_bytes = (slot_dir / f"own-{c}.bin").stat().st_size
        if args.keep_slot_files:
            args.keep_slot_files.mkdir(parents=True, exist_ok=True)
            shutil.copy(slot_dir / f"own-{c}.bin", args.keep_slot_files / f"slot-{c}.bin")
        for i in range(args.prefill_runs - 1):
            say(f"{c} tokens: re-prefill {i + 2}/{args.prefill_runs} ...")
            call(llama.port, "/slots/0?action=erase")
            first, timings, _ = ttft(llama.port, dict(turn, prompt=history + suffixes[-1 - i]))
            assert timings["cache_n"] == 0
            t["reprefill"].append(first)
        say(f"{c} tokens: slot file and proxy, {args.runs} runs each, alternating ...")
        done = saves_done(mport)
        for i in range(args.runs):
            prompt = history + suffixes[i]
            for case in (("slot_file", "proxy_tcp") if i % 2 == 0 else ("proxy_tcp", "slot_file")):
                call(llama.port, "/slots/0?action=erase")
                time.sleep(args.settle)
                if case == "slot_file":
                    t0 = time.perf_counter()
                    res = call(llama.port, "/slots/0?action=restore", {"filename": f"own-{c}.bin"})
                    restore_s = time.perf_counter() - t0
                    first, timings, _ = ttft(llama.port, dict(turn, prompt=prompt))
                    t["slot_file"].append(restore_s + first)
                    detail["slot_file_restore_ms"].append(res["timings"]["restore_ms"])
                else:
                    first, timings, headers = ttft(proxy.port, dict(turn, prompt=prompt))
                    t["proxy_tcp"].append(first)
                    detail["proxy_report"].append(json.loads(headers.get("X-Rdmakv-Report", "{}")))
                    done += 1
                    wait_saves(mport, done)  # its background save is over before anything else is timed
                detail["cache_n"].append([case, timings.get("cache_n")])
                detail["turn_eval_ms"].append([case, timings.get("prompt_ms")])
        proxy.__exit__()
        llama.__exit__()
        servers.clear()
        t["cache_ram"] = cache_ram_runs(lf, binary, model, slot_dir, c, n_ctx, history, suffixes, turn, args)
        limits = ttft_limits.measure(slot_dir / f"own-{c}.bin", args.runs)
        return {"context": c, "file_bytes": file_bytes, "llama_save_ms": saved["timings"]["save_ms"],
                "ttft_s": t, "ttft": {k: summarize(v) for k, v in t.items()}, "detail": detail,
                "limits_ms": limits}  # fmt: skip
    finally:
        for s in reversed(servers):
            s.__exit__()
        shutil.rmtree(slot_dir, ignore_errors=True)


def cache_ram_runs(lf, binary: Path, model: Path, slot_dir: Path, c: int, n_ctx: int, history: list[int],
                   suffixes: list[list[int]], turn: dict, args: argparse.Namespace) -> list[float]:  # fmt: skip
    """llama-server's own RAM prompt cache, its best case: the history is in the cache of the same
    process (put there by loading it into the slot and then serving another prompt)."""
    say(f"{c} tokens: --cache-ram, {args.runs} runs ...")
    mib = max(1024, 4 * (slot_dir / f"own-{c}.bin").stat().st_size >> 20)
    other = letters(random.Random(f"other-{c}"), 64)  # (Random(-c) would be Random(c): the history)
    out = []
    with lf.LlamaServer(binary, model, slot_dir, "-np", "1", "--cache-ram", str(mib), n_ctx=n_ctx) as llama:
        call(llama.port, "/slots/0?action=restore", {"filename": f"own-{c}.bin"})
        for i in range(args.runs):
            ttft(llama.port, dict(turn, prompt=[BOS] + other + suffixes[i]))  # moves the slot's state to the cache
            time.sleep(args.settle)
            first, timings, _ = ttft(llama.port, dict(turn, prompt=history + suffixes[i]))
            if timings.get("cache_n", 0) < c:
                raise RuntimeError(f"--cache-ram missed ({timings}): not its best case")
            out.append(first)
    return out


def summarize(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "median_ms": statistics.median(samples) * 1e3, "min_ms": min(samples) * 1e3,
            "max_ms": max(samples) * 1e3}  # fmt: skip


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from . import llama_harness as lf

    binary = lf.find_llama_server()
    if binary is None:
        raise SystemExit("bench.ttft: llama-server not built: run tests/build_llama_server.sh")
    model = model_file(lf, Path(args.model_dir), args.dtype) if not args.tiny else None
    key = os.urandom(32).hex()
    load0 = os.getloadavg()[0]
    t_all = time.perf_counter()
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="rdmakv-bench-ttft-", dir=base))
    store = None
    try:
        if model is None:  # development: the tests' tiny model
            model = lf.write_tiny_llama_gguf(work / "tiny.gguf", n_ctx=max(args.contexts) + 1024)
        store = ServerProcess(str(work / "store"), args.store_capacity, "--fsync", "never", key_hex=key).start()
        per = [measure_context(lf, binary, model, work, store, key, c, args) for c in args.contexts]
        return {
            "bench": "ttft",
            "environment": {**envinfo.collect(), "llama_server": str(binary), "llama_server_version":
                            llama_version(binary), "loadavg_1m_at_start_end": [load0, os.getloadavg()[0]]},
            "params": {"contexts": args.contexts, "runs": args.runs, "prefill_runs": args.prefill_runs,
                       "suffix_tokens": args.suffix, "window": WINDOW, "threads": 2, "slots": 1,
                       "model": {**(QWEN05 if not args.tiny else {"tiny": True}), "weights": f"random {args.dtype}",
                                 "vocab": "259 byte tokens", "kv_type": "F16", "flash_attn": "auto (on, CPU)"},
                       "store": "rdmakv serve on 127.0.0.1 (TCP), --fsync never", "slot_dir_fs": fs_type(work)},
            "contexts": per,
            "targets": targets(per),
            "seconds_total": round(time.perf_counter() - t_all, 1),
        }
    finally:
        if store is not None:
            store.stop()
        shutil.rmtree(work, ignore_errors=True)


def targets(per: list[dict]) -> dict[str, Any]:
    """The issue's goals, at 4k tokens (or the largest context measured)."""
    ctx = next((p for p in per if p["context"] == 4096), per[-1])
    m = {k: v["median_ms"] for k, v in ctx["ttft"].items()}
    return {
        "context": ctx["context"],
        "proxy_over_reprefill": m["proxy_tcp"] / m["reprefill"],
        "proxy_over_reprefill_goal": 1 / 200,
        "proxy_over_slot_file": m["proxy_tcp"] / m["slot_file"],
        "proxy_over_slot_file_goal": 1.3,
        "reprefill_ms": m["reprefill"],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rdmakv bench ttft", description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 16384],
                   help="history sizes in tokens (default 1024,4096,16384)")
    p.add_argument("--runs", type=int, default=7, help="timed runs of the cached cases (default 7)")
    p.add_argument("--prefill-runs", type=int, default=3,
                   help="re-prefill runs, counting turn 1's own prefill (default 3)")
    p.add_argument("--suffix", type=int, default=8, help="new tokens in the next turn (default 8)")
    p.add_argument("--settle", type=float, default=0.3, help="seconds of quiet before each timed run")
    p.add_argument("--dtype", choices=("f16", "f32"), default="f16", help="weights of the random model")
    p.add_argument("--model-dir", default="bench/out/ttft-model", help="where the GGUF is written once")
    p.add_argument("--store-capacity", default="2GiB")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny model instead (developing the bench)")
    p.add_argument("--keep-slot-files", type=Path, help="copy each context's slot file here (for bench.ttft_rdma)")
    p.add_argument("--out-dir", help="write results.json, report.md and ttft.png here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.prefill_runs < 1:
        raise SystemExit("bench.ttft: --runs and --prefill-runs must be at least 1")
    result = measure(args)
    text = json.dumps(result, indent=1)
    if args.out_dir:
        from . import ttft_report

        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(text + "\n")
        ttft_report.write(result, out)
    print(text)
    return 0
