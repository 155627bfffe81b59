"""Real llama.cpp artifacts for tests and benchmarks, made locally with no downloads.

- ``write_tiny_llama_gguf``: a random-weight llama GGUF (SPM vocab: unk/bos/eos + 256 byte
  tokens) written with the ``gguf`` package.
- ``make_real_slot_files``: real sequence-state files from llama-cpp-python's low-level
  ``llama_state_seq_save_file`` (the function llama-server's slot save calls), for several
  cache configurations. Runs in a subprocess so a crash inside llama.cpp fails the fixture
  instead of killing pytest.
- ``find_llama_server`` / ``LlamaServer``: the llama-server built by
  ``tests/build_llama_server.sh``, started on 127.0.0.1 with ``--slot-save-path``.

Run as a script (``python -m bench.llama_harness --out DIR``) to generate the slot files. It lives
under bench/ because the benchmarks drive the same llama-server; tests import it from there.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

N_SPECIAL = 3  # unk, bos, eos
N_VOCAB = N_SPECIAL + 256
GGML_TYPE_F16 = 1
GGML_TYPE_Q8_0 = 8

# Prompts are raw byte-token ids; B shares the first 70 tokens of A.
PROMPT_A = [N_SPECIAL + (i * 37 + 11) % 256 for i in range(90)]
PROMPT_B = PROMPT_A[:70] + [N_SPECIAL + (i * 53 + 5) % 256 for i in range(40)]
SHARED_PREFIX = 70


def write_tiny_llama_gguf(
    path: str | Path,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    n_head_kv: int = 1,
    n_ff: int = 128,
    n_ctx: int = 2048,
    seed: int = 0,
    dtype: Any = np.float32,
) -> Path:
    """Random-weight llama model. Defaults give head_dim 32, so q8_0 KV caches work. ``dtype``:
    the weight matrices' type (np.float16 for a realistically sized model; norms stay f32)."""
    import gguf  # test-only dependency

    path = Path(path)
    head_dim = n_embd // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(N_VOCAB)
    _add_spm_vocab(w, gguf)
    rng = np.random.default_rng(seed)

    def t(name: str, *shape: int, scale: float = 0.05) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(dtype))

    t("token_embd.weight", N_VOCAB, n_embd, scale=0.5)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    t("output.weight", N_VOCAB, n_embd)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        t(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd)
        t(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        t(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        t(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_spm_vocab(w: Any, gguf: Any) -> None:
    # Byte tokens make any text tokenizable through byte fallback (and let the server find '\n').
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([int(x) for x in types])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)


def packed_token_words(tokens: list[int]) -> list[int]:
    """The newer server's token blob: -1, version 1, n, tokens, n_media 0."""
    raw = struct.pack(f"<iII{len(tokens)}iI", -1, 1, len(tokens), *tokens, 0)
    return list(struct.unpack(f"<{len(raw) // 4}i", raw))


# --------------------------------------------------------------------------- llama-cpp-python


@dataclass(frozen=True)
class SlotConfig:
    flash_attn: bool = True
    n_seq_max: int = 1
    kv_unified: bool = True
    seq: int = 0
    type_k: int = GGML_TYPE_F16
    type_v: int = GGML_TYPE_F16
    shuffled: bool = False  # second half of the prompt lands in lower cells: cell order != pos order
    packed: bool = False  # write the newer server's packed token blob as the token words


SLOT_CONFIGS: dict[str, SlotConfig] = {
    "fa_on": SlotConfig(flash_attn=True),
    "fa_off": SlotConfig(flash_attn=False),
    "np3": SlotConfig(n_seq_max=3, kv_unified=False, seq=1),
    "np3_fa_off": SlotConfig(flash_attn=False, n_seq_max=3, kv_unified=False, seq=2),
    "q8k": SlotConfig(type_k=GGML_TYPE_Q8_0),
    "shuffled": SlotConfig(flash_attn=False, n_seq_max=2, shuffled=True),
    "packed": SlotConfig(packed=True),
}


def llama_cpp_missing() -> str | None:
    """Why llama-cpp-python cannot be used here, or None."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError from a broken shared library
        return f"llama_cpp (llama-cpp-python) is not importable: {e}"
    return None


def make_real_slot_files(out_dir: str | Path, model: str | Path, timeout: float = 600) -> dict[str, Path]:
    """Generate ``{config}-{a|b}.bin`` for every SLOT_CONFIGS entry; returns name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out_dir), "--model", str(model)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"slot-file generator failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    index = json.loads((out_dir / "index.json").read_text())
    return {name: out_dir / fname for name, fname in index.items()}


def _generate(out_dir: Path, model_path: Path) -> dict[str, str]:
    import llama_cpp as lc

    lc.llama_backend_init()
    model = _load_model(lc, model_path)
    index = {}
    for name, cfg in SLOT_CONFIGS.items():
        for label, prompt in (("a", PROMPT_A), ("b", PROMPT_B)):
            fname = f"{name}-{label}.bin"
            _save_one(lc, model, cfg, prompt, out_dir / fname)
            index[f"{name}-{label}"] = fname
    (out_dir / "index.json").write_text(json.dumps(index, indent=1))
    return index


def _load_model(lc: Any, path: Path) -> Any:
    params = lc.llama_model_default_params()
    load = getattr(lc, "llama_model_load_from_file", None) or lc.llama_load_model_from_file
    model = load(str(path).encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    return model


def _new_context(lc: Any, model: Any, cfg: SlotConfig) -> Any:
    p = lc.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch = 512 * cfg.n_seq_max, 512, 512
    p.n_seq_max = cfg.n_seq_max
    p.n_threads = p.n_threads_batch = 2
    if hasattr(p, "flash_attn_type"):
        p.flash_attn_type = 1 if cfg.flash_attn else 0  # ENABLED / DISABLED (default is AUTO)
    else:
        p.flash_attn = cfg.flash_attn
    if hasattr(p, "kv_unified"):
        p.kv_unified = cfg.kv_unified
    p.type_k, p.type_v = cfg.type_k, cfg.type_v
    init = getattr(lc, "llama_init_from_model", None) or lc.llama_new_context_with_model
    ctx = init(model, p)
    if not ctx:  # e.g. quantized V without flash attention; never touch a NULL context
        raise RuntimeError(f"llama.cpp refused the context for {cfg}")
    return ctx


def _decode(lc: Any, ctx: Any, tokens: list[int], positions: list[int], seq: int) -> None:
    n = len(tokens)
    batch = lc.llama_batch_init(n, 0, 1)
    try:
        for i, (tok, pos) in enumerate(zip(tokens, positions, strict=True)):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = i == n - 1
        batch.n_tokens = n
        rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
    finally:
        lc.llama_batch_free(batch)


def _save_one(lc: Any, model: Any, cfg: SlotConfig, prompt: list[int], path: Path) -> None:
    ctx = _new_context(lc, model, cfg)
    try:
        if cfg.seq:  # another slot holds a different prompt, as on a busy server
            _decode(lc, ctx, PROMPT_B[::-1][:30], list(range(30)), 0)
        pos = list(range(len(prompt)))
        if cfg.shuffled:
            _decode_shuffled(lc, ctx, prompt, cfg.seq)
        else:
            _decode(lc, ctx, prompt, pos, cfg.seq)
        words = packed_token_words(prompt) if cfg.packed else prompt
        arr = (lc.llama_token * len(words))(*words)
        written = lc.llama_state_seq_save_file(ctx, str(path).encode(), cfg.seq, arr, len(words))
        if written == 0 or path.stat().st_size != written:
            raise RuntimeError(f"llama_state_seq_save_file wrote {written} bytes to {path}")
        _check_reload(lc, ctx, path, cfg, len(words))
    finally:
        lc.llama_free(ctx)


def _decode_shuffled(lc: Any, ctx: Any, prompt: list[int], seq: int) -> None:
    # Another sequence takes the low cells, our first half goes above it; once the other
    # sequence is removed, our second half reuses the low cells. Saved cells (in cell-index
    # order) then run pos half.., 0..half-1.
    other = (seq + 1) % 2
    half = len(prompt) // 2
    pos = list(range(len(prompt)))
    _decode(lc, ctx, PROMPT_B[-60:], list(range(60)), other)
    _decode(lc, ctx, prompt[:half], pos[:half], seq)
    if hasattr(lc, "llama_memory_seq_rm"):
        lc.llama_memory_seq_rm(lc.llama_get_memory(ctx), other, -1, -1)
    else:
        lc.llama_kv_self_seq_rm(ctx, other, -1, -1)
    _decode(lc, ctx, prompt[half:], pos[half:], seq)


def _check_reload(lc: Any, ctx: Any, path: Path, cfg: SlotConfig, n_words: int) -> None:
    # The file must load back through llama.cpp's own reader, into another seq when there is one.
    dest = (cfg.seq + 1) % cfg.n_seq_max
    out = (lc.llama_token * (n_words + 8))()
    n_out = ctypes.c_size_t(0)
    nread = lc.llama_state_seq_load_file(
        ctx, str(path).encode(), dest, out, n_words + 8, ctypes.byref(n_out)
    )
    if nread != path.stat().st_size or n_out.value != n_words:
        raise RuntimeError(f"reloading {path} read {nread} bytes / {n_out.value} words")


# --------------------------------------------------------------------------- llama-server


def stop_process(proc: subprocess.Popen | None) -> None:
    """terminate, then kill if it has not exited within 10 s."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def find_llama_server() -> Path | None:
    """The binary built by tests/build_llama_server.sh (or $RDMAKV_LLAMA_SERVER)."""
    env = os.environ.get("RDMAKV_LLAMA_SERVER")
    if env:
        return Path(env) if Path(env).is_file() else None
    cache = Path(os.environ.get("RDMAKV_LLAMA_CACHE", "/var/cache/rdmakv"))
    found = sorted(cache.glob("llama-server-*/bin/llama-server"))
    return found[-1] if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _HttpProcess:
    """A child process serving HTTP on ``url``, logging to ``log_path``."""

    proc: subprocess.Popen | None
    log_path: Path
    url: str

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        return http_json(self.url, method, path, body)


class LlamaServer(_HttpProcess):
    """llama-server on 127.0.0.1 with --slot-save-path; use as a context manager."""

    def __init__(
        self, binary: Path, model: Path, slot_dir: Path, *extra: str, n_ctx: int = 512, log: Path | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log or slot_dir.parent / f"llama-server-{self.port}.log"
        self.cmd = [
            str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
            "--slot-save-path", str(slot_dir), "-c", str(n_ctx), "-t", "2", *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LlamaServer:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_ready(120)
        return self

    def restart(self) -> None:
        """Stop and start again on the same port: every slot comes back empty."""
        stop_process(self.proc)
        self.__enter__()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama-server not ready after {timeout}s:\n{self.log_tail()}")



def http_json(base: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One JSON request; HTTP errors come back as (status, parsed body) instead of raising."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class LlamaProxy(_HttpProcess):
    """`python -m rdmakv llama-proxy` as a subprocess on 127.0.0.1; use as a context manager."""

    def __init__(
        self, upstream: str, slot_dir: Path, store_url: str, key_hex: str, *extra: str, log: Path | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log or slot_dir.parent / f"llama-proxy-{self.port}.log"
        self.env = dict(os.environ, RDMAKV_AUTH_KEY=key_hex, PYTHONUNBUFFERED="1")
        self.cmd = [
            sys.executable, "-m", "rdmakv", "llama-proxy", "--upstream", upstream, "--slot-dir", str(slot_dir),
            "--store", store_url, "--listen", f"127.0.0.1:{self.port}", *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LlamaProxy:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # ready once it accepts connections
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-proxy exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"llama-proxy not listening after 60 s:\n{self.log_tail()}")




if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", type=Path, help="GGUF to use (default: write a tiny one into --out)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.model or write_tiny_llama_gguf(args.out / "tiny-llama.gguf")
    print(json.dumps(_generate(args.out, model_path), indent=1))


# -- timed HTTP calls for the benchmarks

N_SPECIAL = 3  # the test GGUF's vocab: unk/bos/eos, then 256 byte tokens


class Http:
    """A keep-alive HTTP/1.1 connection, so each timed call is one request, not a TCP handshake."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, float]:
        data = json.dumps(body).encode() if body is not None else None
        t0 = time.perf_counter()
        self.conn.request(method, path, data, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        raw = resp.read()
        dt = time.perf_counter() - t0
        return resp.status, json.loads(raw or b"{}"), dt

    def ok(self, method: str, path: str, body: dict | None = None) -> tuple[dict, float]:
        status, res, dt = self.call(method, path, body)
        if status != 200:
            raise RuntimeError(f"{method} {path} -> {status}: {res}")
        return res, dt

    def close(self) -> None:
        self.conn.close()


def byte_tokens(rng: random.Random, n: int) -> list[int]:
    """Random byte-token ids: token prompts skip tokenization, so every turn re-uses the exact tokens."""
    return [N_SPECIAL + rng.randrange(256) for _ in range(n)]
