"""`rdmakv bench ttft-rdma`: the auto-cache's restore without llama-server, by RDMA READ vs TCP.

Run it in the rxe guest (``rdmakv rxe-vm --mem 4G -- rdmakv bench ttft-rdma ...``). For each
slot file (``--slot-files DIR``: the ``slot-C.bin`` that ``rdmakv bench ttft
--keep-slot-files DIR`` kept, else Qwen2.5-0.5B-shaped files of random bytes), its prefix
entry is registered in a store in the guest; then, alternating, the proxy's own restore path
writes the slot file llama-server would load: over a connection that reads by RDMA (READs into
registered memory, then the file written from there) and over one that uses TCP (the chunks
received straight into a kept mapped file). Every RDMA figure
comes from fetches whose report says ``rdma``. Writes JSON (``--out``), which bench.ttft_report
puts beside the TTFT table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rdmakv.store.server.spawn import ServerProcess

from . import envinfo

WINDOW = 256


def qwen_shaped(n: int) -> bytes:
    """A ggsq v4 slot file of ``n`` cells shaped like Qwen2.5-0.5B's KV (24 layers, 2 KV heads x 64,
    F16 rows of 256 bytes), random bytes."""
    rng = np.random.default_rng(n)
    meta = np.zeros(n, [("pos", "<i4"), ("n_seq_id", "<u4"), ("seq", "<i4")])
    meta["pos"], meta["n_seq_id"] = np.arange(n), 1
    parts = [struct.pack("<III", 0x67677371, 4, n), rng.integers(3, 259, n).astype("<i4").tobytes(),
             struct.pack("<II", 1, n), meta.tobytes(), struct.pack("<IIII", 0, 24, 0, 0)]  # fmt: skip
    for _kind in "KV":
        for _layer in range(24):
            parts += [struct.pack("<iQ", 1, 256), rng.bytes(256 * n)]
    return b"".join(parts)


def slot_files(args: argparse.Namespace) -> dict[int, bytes]:
    if args.slot_files and Path(args.slot_files).is_dir():
        found = {int(p.stem.split("-")[1]): p.read_bytes() for p in sorted(Path(args.slot_files).glob("slot-*.bin"))}
        if found:
            return dict(sorted(found.items()))
    return {c: qwen_shaped(c) for c in args.contexts}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from rdmakv.client.reports import RestoreReport
    from rdmakv.client.store import connect as connect_node
    from rdmakv.llama import prefix_entry as pe
    from rdmakv.llama import prefix_names as pn
    from rdmakv.llama import prefix_store as ps
    from rdmakv.llama import slotfile
    from rdmakv.llama.mapped_scratch import MappedScratch
    from rdmakv.llama.scratch import ScratchFiles

    key = os.urandom(32).hex()
    files = slot_files(args)
    work = Path(tempfile.mkdtemp(prefix="rdmakv-bench-ttft-rdma-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK)
                                 else None))  # fmt: skip
    store = ServerProcess(str(work / "store"), args.store_capacity, "--fsync", "never", key_hex=key).start()
    scratch = ScratchFiles(work)
    mapped = MappedScratch(work)
    h0 = pn.seed("bench.ttft_rdma", WINDOW)
    out = []
    try:
        url = store.url("ttft-rdma")
        with connect_node(url, key, transport="rdma", window=WINDOW) as by_rdma, \
                connect_node(url, key, transport="tcp", window=WINDOW) as by_tcp:  # fmt: skip
            for c, data in files.items():
                cut = pe.cut(slotfile.parse(data), WINDOW)
                ps.register(by_tcp, cut, h0)
                name = ps.longest_prefix(by_tcp, h0, cut.tokens, WINDOW).name
                times: dict[str, list[float]] = {"rdma": [], "tcp": []}
                transports: list[str] = []
                for i in range(args.runs + 1):  # the first of each is a warm-up
                    for how in (("rdma", "tcp") if i % 2 else ("tcp", "rdma")):
                        path = scratch.path()
                        rep = RestoreReport()
                        t0 = time.perf_counter()
                        if how == "rdma":  # the proxy's own restore paths (auto_cache._materialise)
                            entry, pieces = ps.fetch_entry(by_rdma, name, rep)
                            scratch.write(path, pe.synthesize(entry, pieces))
                        else:
                            got = ps.fetch_into_map(by_tcp, name, mapped, path, None, rep)
                            assert got is not None  # (the entry was just registered)
                            _, _, m = got
                            mapped.give_back(path, m)
                        dt = time.perf_counter() - t0
                        if how == "rdma":
                            scratch.release(path)
                        if i:
                            times[how].append(dt)
                            transports.append(f"{how}:{rep.transport}")
                wrong = [t for t in transports if t.startswith("rdma:") and t != "rdma:rdma"]
                if wrong:  # never a TCP figure under an RDMA label
                    raise SystemExit(f"bench.ttft_rdma: {len(wrong)} fetches meant for RDMA ran over TCP "
                                     f"({by_rdma.rdma_reason or 'fell back'})")  # fmt: skip
                print(f"bench.ttft_rdma: {c} tokens done", file=sys.stderr, flush=True)
                out.append({"context": c, "bytes": len(data),
                            "rdma": {**_summary(times["rdma"]), "transports": transports},
                            "tcp": _summary(times["tcp"])})  # fmt: skip
    finally:
        mapped.close()
        scratch.close()
        store.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {"bench": "ttft_rdma", "environment": envinfo.collect(), "runs": args.runs, "window": WINDOW,
            "source": "slot files of bench.ttft" if args.slot_files else "Qwen-shaped random slot files",
            "contexts": out}  # fmt: skip


def _summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "median_ms": statistics.median(xs) * 1e3, "min_ms": min(xs) * 1e3, "max_ms": max(xs) * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rdmakv bench ttft-rdma", description=__doc__.splitlines()[0])
    p.add_argument("--slot-files", help="directory of slot-C.bin files (from bench.ttft --keep-slot-files)")
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 16384],
                   help="context sizes when no slot files are given")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--store-capacity", default="1GiB")
    p.add_argument("--out", help="write the JSON here")
    args = p.parse_args(argv)
    result = measure(args)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
