"""Parts of `rdmakv bench llama`: slots at once through the proxy, and the kv_store_v1 library.

- ``slot_throughput``: one llama-server with 4 slots, each holding the same-size state; save +
  restore rounds through the proxy from 1 client on 1 slot, then from 4 clients on 4 slots at
  once, beside the same with llama-server's own local files (which bounds what a proxy can
  reach: llama-server runs slot tasks one at a time).
- ``kvstore_abi_walls``: the 256-token session saved and restored through libkv_store_rdmakv.so
  by the C consumer, beside the Python API on the same store.
"""

from __future__ import annotations

import argparse
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import kvstore_abi as ka
from .llama_harness import Http, byte_tokens

SLOTS = 4


def fs_type(path: Path) -> str:
    """The filesystem type of ``path`` (from /proc/mounts: the longest mount point above it)."""
    best, kind = "", "unknown"
    p = str(Path(path).resolve())
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mnt, fstype = line.split()[:3]
            if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, fstype
    except OSError:
        pass
    return kind


def _rounds(http_cls, port: int, slot: int, name: str, rounds: int, expect: int) -> float:
    """Save + restore ``rounds`` times; every answer must carry the slot's ``expect`` tokens."""
    h = http_cls(port)
    try:
        t0 = time.perf_counter()
        for _ in range(rounds):
            saved, _ = h.ok("POST", f"/slots/{slot}?action=save", {"filename": name})
            restored, _ = h.ok("POST", f"/slots/{slot}?action=restore", {"filename": name})
            if not saved["n_saved"] == restored["n_restored"] == expect:
                raise RuntimeError(f"slot {slot}: saved {saved['n_saved']}, restored {restored['n_restored']}, "
                                   f"expected {expect}")  # fmt: skip
        return time.perf_counter() - t0
    finally:
        h.close()


def slot_throughput(lf, binary: Path, model: Path, work: Path, store, key: str, args: argparse.Namespace) -> dict:
    slot_dir = work / "slots4"
    slot_dir.mkdir()
    rounds = max(args.runs, 4)
    out: dict[str, Any] = {"slots": SLOTS, "rounds_per_client": rounds, "op": "save + restore of the slot's state"}
    with lf.LlamaServer(binary, model, slot_dir, "-np", str(SLOTS), n_ctx=SLOTS * args.n_ctx) as llama, \
            lf.LlamaProxy(llama.url, slot_dir, store.url("slots"), key) as proxy:  # fmt: skip
        rng = random.Random(3)
        h = Http(llama.port)
        for slot in range(SLOTS):
            prompt = [1, *byte_tokens(rng, args.prompt_tokens)]
            h.ok("POST", "/completion", {"prompt": prompt, "n_predict": 1, "id_slot": slot, "cache_prompt": True})
        expect = h.ok("POST", "/slots/0?action=save", {"filename": "direct-0.bin"})[0]["n_saved"]
        h.close()
        for side, port, names in (("direct", llama.port, "direct-{}.bin"), ("proxy", proxy.port, "p-{}.bin")):
            _rounds(Http, port, 0, names.format(0), 1, expect)  # warm-up: the store holds every chunk after it
            one = _rounds(Http, port, 0, names.format(0), rounds, expect)
            with ThreadPoolExecutor(SLOTS) as pool:
                t0 = time.perf_counter()
                list(pool.map(lambda s, port=port, names=names: _rounds(Http, port, s, names.format(s), rounds, expect),
                              range(SLOTS)))
                four = time.perf_counter() - t0
            ops1, ops4 = 2 * rounds / one, 2 * SLOTS * rounds / four
            out[side] = {"one_slot_ops_per_s": ops1, "four_slots_ops_per_s": ops4, "four / one": ops4 / ops1}
        for p in slot_dir.glob("direct-*.bin"):
            p.unlink()
    out["target: proxy four / one >= 3"] = out["proxy"]["four / one"]
    return out


def kvstore_abi_walls(work: Path, store, key: str, runs: int) -> dict:
    """C consumer through the library vs the Python API: cold save, warm save, restore medians."""
    return ka.walls(work, store, key, runs)
