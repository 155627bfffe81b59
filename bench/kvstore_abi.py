"""The kv_store_v1 library from C: session files for the C consumer, compiling it, running it, and
its figures beside the Python API (``rdmakv bench kvstore-abi``, also part of ``bench.llama``).

The consumer (tests/kvstore_abi/consumer.c) is what the chunked-save engine does; the tests
drive it for correctness and the benches for save/restore figures beside the Python API, on one
store in one run: a 256-token session of the Qwen2.5-0.5B shape at W=64 (192 chunks, 3 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import xxhash

from rdmakv import kvgen
from rdmakv.hashing import HASH_BLAKE3_256
from rdmakv.llama import kvstore_lib
from rdmakv.wire import chunking

ROOT = Path(__file__).resolve().parents[1]
CONSUMER_SRC = ROOT / "tests" / "kvstore_abi" / "consumer.c"


def session_chunks(seed: int, tokens: int = 256, window: int = 64) -> list[memoryview]:
    """The chunks of a generated session (Qwen2.5-0.5B shape), as the engine would put them."""
    kv = kvgen.generate(kvgen.token_stream(seed, tokens), kvgen.QWEN25_05B)
    return chunking.split(kv, window)[1]


def engine_hash(chunk: memoryview, hash_alg: str = "xxh3", little_endian: bool = False) -> bytes:
    """The hash an engine passes: xxh3-64 in xxHash's canonical (big-endian) order by default."""
    if hash_alg == "blake3":
        from rdmakv.hashing import key_function

        key = key_function(HASH_BLAKE3_256)(chunk)
        assert isinstance(key, bytes)  # (a BLAKE3-256 key is its digest)
        return key
    digest = xxhash.xxh3_64_digest(chunk)
    return digest[::-1] if little_endian else digest


def write_sessions(path: str | os.PathLike, sessions: Sequence[Sequence[memoryview]], hash_alg: str = "xxh3",
                   little_endian: bool = False) -> Path:  # fmt: skip
    n_chunks = len(sessions[0])
    if any(len(s) != n_chunks for s in sessions):
        raise ValueError("every session needs the same number of chunks")
    hash_len = 32 if hash_alg == "blake3" else 8
    with open(path, "wb") as f:
        f.write(b"RKVC" + struct.pack("<III", hash_len, len(sessions), n_chunks))
        for chunks in sessions:
            for c in chunks:
                f.write(engine_hash(c, hash_alg, little_endian))
                f.write(struct.pack("<I", len(c)))
                f.write(c)
    return Path(path)


def engine_manifest(path: str | os.PathLike, session: int = 0) -> bytes:
    """The consumer's own manifest of a session in a file ``write_sessions`` wrote: "ENGM", u32
    count, the hashes in order (what tests/kvstore_abi/consumer.c puts)."""
    data = Path(path).read_bytes()
    hash_len, n_sessions, n_chunks = struct.unpack_from("<III", data, 4)
    pos, hashes = 16, []
    for s in range(n_sessions):
        for _ in range(n_chunks):
            h = data[pos : pos + hash_len]
            (ln,) = struct.unpack_from("<I", data, pos + hash_len)
            pos += hash_len + 4 + ln
            if s == session:
                hashes.append(h)
    return b"ENGM" + struct.pack("<I", n_chunks) + b"".join(hashes)


def compile_consumer(out: str | os.PathLike) -> Path:
    """cc the consumer against rdmakv's header; it finds the library through KV_STORE_LIBRARY_PATH."""
    out = Path(out)
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-O2", "-Wall", "-Werror", "-I", str(kvstore_lib.HEADER.parent), "-o", str(out), str(CONSUMER_SRC),
           "-ldl", "-lpthread"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def run(consumer: Path, lib_dir: Path, *args: str, env: dict | None = None, timeout: float = 120):
    """Run the consumer with the library found only through KV_STORE_LIBRARY_PATH."""
    e = {**os.environ, **(env or {}), "KV_STORE_LIBRARY_PATH": str(lib_dir)}
    return subprocess.run([str(consumer), *args], env=e, capture_output=True, text=True, timeout=timeout)


def bench(consumer: Path, lib_dir: Path, uri: str, sessions_file: Path, runs: int, env: dict | None = None) -> dict:
    """Cold save, warm save and restore medians from C (one process, one handle)."""
    p = run(consumer, lib_dir, "bench", uri, str(sessions_file), str(runs), env=env, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"consumer bench failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def python_walls(store_url: str, key: str, runs: int, seed0: int = 100) -> dict:
    """The same sessions through the Python API: cold save, warm save, restore medians (ms)."""
    from rdmakv.client.store import connect as connect_node

    t: dict[str, list[float]] = {"cold_save": [], "warm_save": [], "restore": []}
    with connect_node(store_url, key=key, transport="tcp", window=64) as st:
        for i in range(runs + 1):
            kv = kvgen.generate(kvgen.token_stream(seed0 + i, 256), kvgen.QWEN25_05B)
            t0 = time.perf_counter()
            st.save(f"s{i}", kv)
            t1 = time.perf_counter()
            st.save(f"s{i}", kv)
            t2 = time.perf_counter()
            st.restore(f"s{i}")
            t3 = time.perf_counter()
            if i:  # the first warms up
                t["cold_save"].append(t1 - t0)
                t["warm_save"].append(t2 - t1)
                t["restore"].append(t3 - t2)
    return {"runs": runs, **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in t.items()},
            **{f"{k}_p99_ms": sorted(v)[max(0, int(len(v) * 0.99) - 1)] * 1e3 for k, v in t.items()}}  # fmt: skip


def walls(work: Path, store, key: str, runs: int) -> dict:
    """C consumer through the library vs the Python API on one store, in one run: medians, and the
    ratio of each (the target is <= 1.2)."""
    lib = kvstore_lib.build(work / "kvlib").parent
    consumer = compile_consumer(work / "consumer")
    n = runs + 1
    sessions = write_sessions(work / "sessions.bin", [session_chunks(100 + i) for i in range(n)])
    py_before = python_walls(store.url("abi-py-a"), key, runs)
    c = bench(consumer, lib, store.url("abi-c"), sessions, n, env={"RDMAKV_AUTH_KEY": key})
    py_after = python_walls(store.url("abi-py-b"), key, runs)
    py = {k: (py_before[k] + py_after[k]) / 2 for k in py_before if k.endswith("_ms")}  # C ran between the two
    return {
        "session": "256 tokens, W=64, Qwen2.5-0.5B shape (kvgen): 192 chunks, 3 MiB",
        "transport": "tcp (loopback)",
        "c_consumer_via_library": c,
        "python_api": {"runs": runs, **py},
        "python_api_passes": [py_before, py_after],
        "library / python (medians)": {k: c[f"{k}_ms"] / py[f"{k}_ms"] for k in ("cold_save", "warm_save", "restore")}
        if c.get("ok") else None,
        "target": "<= 1.2 for each",
    }


def report(r: dict) -> str:
    c, py, ratio = r["c_consumer_via_library"], r["python_api"], r["library / python (medians)"] or {}
    lines = [
        "# kv_store_v1 library from C vs the Python API",
        "",
        f"{r['session']}; {r['transport']}; store `--fsync never`; {py['runs']} runs each, medians; the Python API "
        "ran before and after the C consumer (the mean of its two passes).",
        "",
        "| | C consumer via libkv_store_rdmakv.so | Python API | ratio (target <= 1.2) |",
        "|---|---|---|---|",
    ]
    for k in ("cold_save", "warm_save", "restore"):
        lines.append(f"| {k.replace('_', ' ')} ms | {c[f'{k}_ms']:.2f} | {py[f'{k}_ms']:.2f} | {ratio.get(k, 0):.2f} |")
    env = r.get("environment", {})
    lines += ["", f"Host: {env.get('cpus', '?')} CPUs, kernel {env.get('kernel', '?')}; "
              f"load at start/end {r.get('loadavg_1m_at_start_end')}.", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from rdmakv.store.server.spawn import ServerProcess

    from . import envinfo

    p = argparse.ArgumentParser(prog="rdmakv bench kvstore-abi", description=__doc__)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", default="bench/out/kvstore_abi", help="directory for kvstore_abi.json and .md")
    a = p.parse_args(argv)
    key = os.urandom(32).hex()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rdmakv-bench-abi-") as d:
        store = ServerProcess(str(Path(d) / "store"), "1GiB", "--fsync", "never", key_hex=key).start()
        try:
            r = walls(Path(d), store, key, a.runs)
        finally:
            store.stop()
    load = [load0, os.getloadavg()[0]]
    r = {"bench": "kvstore_abi", "environment": envinfo.collect(), "loadavg_1m_at_start_end": load, **r}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kvstore_abi.json").write_text(json.dumps(r, indent=2) + "\n")
    (out / "kvstore_abi.md").write_text(report(r))
    print(report(r))
    return 0 if r["c_consumer_via_library"].get("ok") else 1
