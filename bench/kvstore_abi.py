"""The kv_store_v1 library from C: session files for the C consumer, compiling it, running it.

The consumer (tests/kvstore_abi/consumer.c) is what the chunked-save engine does; the tests
drive it for correctness and the llama bench for save/restore figures beside the Python API.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
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

        return key_function(HASH_BLAKE3_256)(chunk)
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
