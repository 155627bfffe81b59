"""`rdmakv bench llama`: llama-server slot save/restore through `rdmakv llama-proxy` vs local files.

Starts a real llama-server (the build from tests/build_llama_server.sh) on a random-weight
GGUF written with the ``gguf`` package, a real `rdmakv serve`, and the proxy as a subprocess,
all on 127.0.0.1. Measures, interleaved and alternating the order every run:

- save: llama-server's own local-file save (direct) vs a save through the proxy, cold (every
  chunk new: each run fills the slot with a fresh prompt) and warm (the same state again);
- restore: llama-server's own restore of its local file vs a restore through the proxy
  (fetch from the store, write the file, llama-server restores it, file removed);

and, for a 4-turn chat saved after every turn, the bytes the store holds for the namespace
(STATS chunk_bytes + manifest_bytes) vs the sum of the 4 slot files. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rdmakv.store.server.spawn import ServerProcess

from . import envinfo, llama_slots
from .llama_harness import Http, byte_tokens
from .stats import summary


def llama_version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return " ".join(line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip())


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from . import llama_harness as lf

    binary = lf.find_llama_server()
    if binary is None:
        raise SystemExit("bench.llama: llama-server not built: run tests/build_llama_server.sh")
    key = os.urandom(32).hex()
    t_all = time.perf_counter()
    load0 = os.getloadavg()[0]  # other work on the machine skews walls: recorded with them
    servers: list[Any] = []
    # the slot dir on tmpfs where there is one: what an operator should do, and the same dir for both sides
    work_base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="rdmakv-bench-llama-", dir=work_base))
    try:
        model = lf.write_tiny_llama_gguf(
            work / "model.gguf", n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_embd // 64,
            n_head_kv=max(1, args.n_embd // 128), n_ff=2 * args.n_embd, n_ctx=args.n_ctx,
        )  # fmt: skip
        slot_dir = work / "slots"
        slot_dir.mkdir()
        store = ServerProcess(str(work / "store"), "1GiB", "--fsync", "never", key_hex=key).start()
        servers.append(store)
        llama = lf.LlamaServer(binary, model, slot_dir, "-np", "1", n_ctx=args.n_ctx).__enter__()
        servers.append(llama)
        chat_proxy = lf.LlamaProxy(llama.url, slot_dir, store.url("chat"), key).__enter__()
        servers.append(chat_proxy)
        t_setup = time.perf_counter() - t_all
        t0 = time.perf_counter()
        print("bench.llama: 4-turn chat ...", file=sys.stderr, flush=True)
        chat = chat_bytes(Http(llama.port), Http(chat_proxy.port), store, key, args)
        chat_proxy.__exit__()
        t_chat = time.perf_counter() - t0
        proxy = lf.LlamaProxy(llama.url, slot_dir, store.url("walls"), key).__enter__()
        servers.append(proxy)
        local = lf.LlamaProxy(llama.url, slot_dir, store.url("walls"), key, "--local-cache", "1GiB").__enter__()
        servers.append(local)
        t0 = time.perf_counter()
        print(f"bench.llama: save/restore walls, {args.runs} runs ...", file=sys.stderr, flush=True)
        walls = save_restore_walls(Http(llama.port), Http(proxy.port), Http(local.port), slot_dir, args)
        t_walls = time.perf_counter() - t0
        local.__exit__()
        proxy.__exit__()
        llama.__exit__()
        t0 = time.perf_counter()
        print("bench.llama: 1 vs 4 slots at once ...", file=sys.stderr, flush=True)
        slots = llama_slots.slot_throughput(lf, binary, model, work, store, key, args)
        t_slots = time.perf_counter() - t0
        print("bench.llama: kv_store_v1 library from C vs the Python API ...", file=sys.stderr, flush=True)
        abi = llama_slots.kvstore_abi_walls(work, store, key, args.runs)
        return {
            "bench": "llama",
            "environment": {**envinfo.collect(), "llama_server": str(binary), "llama_server_version":
                            llama_version(binary), "loadavg_1m_at_start_end": [load0, os.getloadavg()[0]]},
            "params": {
                "runs": args.runs, "prompt_tokens": args.prompt_tokens, "n_ctx": args.n_ctx,
                "model": {"n_embd": args.n_embd, "n_layer": args.n_layer, "n_head": args.n_embd // 64,
                          "n_head_kv": max(1, args.n_embd // 128), "kv_type": "F16", "weights": "random"},
                "window": 256, "store_fsync": "never", "transport": "tcp (loopback)",
                "slot_dir": str(slot_dir), "slot_dir_fs": llama_slots.fs_type(slot_dir),
            },
            **walls,
            "slots_at_once": slots,
            "kvstore_abi": abi,
            "chat": chat,
            "seconds": {"setup": round(t_setup, 2), "chat": round(t_chat, 2), "walls": round(t_walls, 2),
                        "slots": round(t_slots, 2), "total": round(time.perf_counter() - t_all, 2)},
        }
    finally:
        for s in reversed(servers):
            if isinstance(s, ServerProcess):
                s.stop()
            else:
                s.__exit__()
        shutil.rmtree(work, ignore_errors=True)


def save_restore_walls(direct: Http, proxy: Http, local: Http, slot_dir: Path, args: argparse.Namespace
                       ) -> dict[str, Any]:  # fmt: skip
    rng = random.Random(1)
    t: dict[str, list[float]] = {k: [] for k in (
        "save_direct", "save_proxy_cold", "save_proxy_warm", "save_local", "restore_direct", "restore_proxy",
        "restore_local", "llama_save", "llama_restore", "store_save", "store_restore", "proxy_overhead",
        "proxy_file_write", "proxy_other", "warm_map_and_hash", "warm_store", "warm_thread_hop",
    )}  # fmt: skip
    file_bytes = n_saved = 0
    for i in range(args.runs + 1):  # run 0 warms up every path and is not recorded
        direct.ok("POST", "/completion", {"prompt": [1, *byte_tokens(rng, args.prompt_tokens)], "n_predict": 1,
                                          "id_slot": 0, "cache_prompt": False})
        name = f"run{i}.bin"
        order = (0, 1) if i % 2 else (1, 0)  # alternate which side goes first
        got: dict[str, Any] = {}
        for side in order:
            if side == 0:
                got["sd"], got["sd_t"] = direct.ok("POST", "/slots/0?action=save", {"filename": "direct.bin"})
            else:
                got["sp"], got["sp_t"] = proxy.ok("POST", "/slots/0?action=save", {"filename": name})
                got["sw"], got["sw_t"] = proxy.ok("POST", "/slots/0?action=save", {"filename": name})
                got["sl"], got["sl_t"] = local.ok("POST", "/slots/0?action=save", {"filename": name})
        for side in order:
            direct.ok("POST", "/slots/0?action=erase")
            if side == 0:
                got["rd"], got["rd_t"] = direct.ok("POST", "/slots/0?action=restore", {"filename": "direct.bin"})
            else:
                got["rp"], got["rp_t"] = proxy.ok("POST", "/slots/0?action=restore", {"filename": name})
                direct.ok("POST", "/slots/0?action=erase")
                got["rl"], got["rl_t"] = local.ok("POST", "/slots/0?action=restore", {"filename": name})
        assert got["rd"]["n_restored"] == got["rp"]["n_restored"] == got["rl"]["n_restored"] == got["sd"]["n_saved"]
        assert got["sw"]["rdmakv"]["chunks_sent"] == 0 and got["sp"]["rdmakv"]["chunks_skipped"] == 0, got
        assert got["rp"]["rdmakv"]["source"] == "store" and got["rl"]["rdmakv"]["source"] == "local", got
        assert got["rl"]["rdmakv"]["local_verified"] is True and got["sl"]["rdmakv"]["local_copy"] is True, got
        file_bytes, n_saved = got["sd"]["n_written"], got["sd"]["n_saved"]
        if i == 0:
            continue
        t["save_direct"].append(got["sd_t"])
        t["save_proxy_cold"].append(got["sp_t"])
        t["save_proxy_warm"].append(got["sw_t"])
        t["restore_direct"].append(got["rd_t"])
        t["restore_proxy"].append(got["rp_t"])
        t["save_local"].append(got["sl_t"])
        t["restore_local"].append(got["rl_t"])
        t["warm_map_and_hash"].append(got["sw"]["rdmakv"]["map_and_chunk_ms"] / 1e3)
        t["warm_store"].append(got["sw"]["rdmakv"]["wall_s"])
        t["warm_thread_hop"].append(got["sw"]["rdmakv"]["thread_hop_ms"] / 1e3)
        fetch = got["rp"]["rdmakv"]["wall_s"]
        t["proxy_overhead"].append(got["rp_t"] - got["rd_t"] - fetch)
        t["proxy_file_write"].append(got["rp"]["rdmakv"]["prepare_ms"] / 1e3 - fetch)
        t["proxy_other"].append(got["rp_t"] - got["rp"]["rdmakv"]["prepare_ms"] / 1e3
                                - got["rp"]["rdmakv"]["llama_restore_ms"] / 1e3)
        t["llama_save"].append(got["sd"]["timings"]["save_ms"] / 1e3)
        t["llama_restore"].append(got["rd"]["timings"]["restore_ms"] / 1e3)
        t["store_save"].append(got["sp"]["rdmakv"]["wall_s"])
        t["store_restore"].append(got["rp"]["rdmakv"]["wall_s"])
    (slot_dir / "direct.bin").unlink(missing_ok=True)
    leftovers = sorted(p.name for p in slot_dir.iterdir() if p.name != ".rdmakv-cache")
    walls = {k: summary(v) for k, v in t.items()}
    med = {k: walls[k]["median_ms"] for k in walls}
    return {
        "slot": {"n_saved_tokens": n_saved, "file_bytes": file_bytes},
        "walls_client_ms": {k: walls[k] for k in ("save_direct", "save_proxy_cold", "save_proxy_warm", "save_local",
                                                   "restore_direct", "restore_proxy", "restore_local")},
        "breakdown_ms": {
            "llama_server_save_ms (its own timings.save_ms)": walls["llama_save"],
            "llama_server_restore_ms (its own timings.restore_ms)": walls["llama_restore"],
            "store_save_cold (proxy's SaveReport wall)": walls["store_save"],
            "store_restore (proxy's RestoreReport wall)": walls["store_restore"],
            "proxy_overhead (restore_proxy - restore_direct - store fetch, per run)": walls["proxy_overhead"],
            "proxy_file_write (scratch file from the fetched chunks)": walls["proxy_file_write"],
            "proxy_http (proxy restore wall - fetch/write - llama-server's forwarded restore)": walls["proxy_other"],
            "warm save: map the file and hash it whole (a recent identical file: no parse/cut/hash)":
                walls["warm_map_and_hash"],
            "warm save: store commit (one round trip)": walls["warm_store"],
            "warm save: worker-thread hop": walls["warm_thread_hop"],
        },
        "targets": {
            "proxy_overhead_ms <= 0.5": med["proxy_overhead"],
            "save_proxy_warm / save_direct <= 1.5": med["save_proxy_warm"] / med["save_direct"],
            "restore_local / restore_direct <= 1.3": med["restore_local"] / med["restore_direct"],
        },
        "ratios_of_medians": {
            "save_proxy_cold / save_direct": med["save_proxy_cold"] / med["save_direct"],
            "save_proxy_warm / save_direct": med["save_proxy_warm"] / med["save_direct"],
            "restore_proxy / restore_direct": med["restore_proxy"] / med["restore_direct"],
            "restore_local / restore_direct": med["restore_local"] / med["restore_direct"],
            "save_local / save_direct": med["save_local"] / med["save_direct"],
        },
        "slot_dir_leftovers": leftovers,
    }


def chat_bytes(direct: Http, proxy: Http, store: ServerProcess, key: str, args: argparse.Namespace) -> dict[str, Any]:
    """A 4-turn chat in one slot, saved through the proxy after every turn."""
    from rdmakv.client.store import connect as connect_node

    rng = random.Random(2)
    conv = [1, *byte_tokens(rng, args.system_tokens)]  # BOS + system prompt
    turns = []
    for turn in range(4):
        conv += byte_tokens(rng, args.user_tokens)  # the user's message
        res, _ = proxy.ok("POST", "/completion", {"prompt": conv, "n_predict": args.reply_tokens, "id_slot": 0,
                                                  "cache_prompt": True, "ignore_eos": True, "return_tokens": True})
        reply = res.get("tokens") or []
        if len(reply) != args.reply_tokens:
            raise RuntimeError(f"llama-server returned {len(reply)} reply tokens (return_tokens unsupported?)")
        conv += reply  # the client sends the conversation back with the reply, as a chat client does
        saved, _ = proxy.ok("POST", "/slots/0?action=save", {"filename": f"chat-turn{turn + 1}.bin"})
        rep = saved["rdmakv"]
        turns.append({"n_saved": saved["n_saved"], "file_bytes": rep["file_bytes"],
                      "prompt_cache_n": res["timings"]["cache_n"], "chunks_total": rep["chunks_total"],
                      "chunks_sent": rep["chunks_sent"], "chunks_skipped": rep["chunks_skipped"]})
    direct.ok("POST", "/slots/0?action=erase")
    with connect_node(store.url("chat"), key) as s:
        st = s.stats()
    files = sum(t["file_bytes"] for t in turns)
    stored = st["chunk_bytes"] + st["manifest_bytes"]
    return {
        "turns": turns,
        "sum_slot_file_bytes": files,
        "store_chunk_bytes": st["chunk_bytes"],
        "store_manifest_bytes": st["manifest_bytes"],
        "store_bytes": stored,
        "store_bytes / sum_slot_file_bytes": stored / files,
        "last_file_bytes": turns[-1]["file_bytes"],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rdmakv bench llama", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="timed runs per measurement (default 20; one more warms up)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--out-dir", help="write results.json, report.md and walls.png into this directory")
    p.add_argument("--prompt-tokens", type=int, default=1500, help="slot size for the save/restore walls")
    p.add_argument("--n-embd", type=int, default=256, help="model width (head_dim 64; n_head_kv = n_embd/128)")
    p.add_argument("--n-layer", type=int, default=4, help="model layers")
    p.add_argument("--n-ctx", type=int, default=4096, help="llama-server -c")
    p.add_argument("--system-tokens", type=int, default=800, help="chat: system prompt tokens")
    p.add_argument("--user-tokens", type=int, default=200, help="chat: tokens per user message")
    p.add_argument("--reply-tokens", type=int, default=64, help="chat: tokens per reply")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1:
        raise SystemExit("bench.llama: --runs must be at least 1")
    result = measure(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.out_dir:
        from . import llama_report

        llama_report.write(result, Path(args.out_dir))
    return 0
