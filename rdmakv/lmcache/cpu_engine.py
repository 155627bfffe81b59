"""LMCache's own engine on CPU tensors: what the tests and the benchmark drive.

vLLM needs a GPU; ``LMCacheConnectorV1`` drives LMCache's ``LMCacheEngine``, and so does this
module, with a ``GPUConnectorInterface`` that copies to and from a CPU tensor laid out
``[2, layers, tokens, kv_heads * head_dim]`` (what LMCache's chunks hold). The KV of a prompt is
synthetic but keeps the property that matters: a token's rows depend only on the tokens up to it
(``rdmakv.kvgen``), so prompts that share a prefix share its KV bytes, as a real model's do.

``python -m rdmakv.lmcache.cpu_engine store|retrieve ...`` runs one engine in a fresh process
and prints a JSON line (what a second engine on another node would see). Without vLLM, LMCache
hashes tokens with Python's ``hash``: processes that must agree on keys need PYTHONHASHSEED=0
(this entry point re-executes itself with it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from dataclasses import dataclass

import numpy as np
import torch
from lmcache.v1.cache_engine import LMCacheEngine, LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.gpu_connector import GPUConnectorInterface
from lmcache.v1.metadata import LMCacheMetadata

from ..kvgen import prefix_seeds, token_stream

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Model:
    """The KV shape of a model: Qwen2.5-0.5B by default (24 layers, 2 KV heads of 64)."""

    name: str = "Qwen/Qwen2.5-0.5B"
    layers: int = 24
    kv_heads: int = 2
    head_dim: int = 64
    dtype: str = "bfloat16"

    @property
    def hidden(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.hidden * self.torch_dtype.itemsize


class CpuKV(GPUConnectorInterface):
    """LMCache's "GPU" side for a CPU tensor ``kv=[2, layers, tokens, hidden]`` passed as kwarg."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def to_gpu(self, memory_obj, start: int, end: int, **kwargs) -> None:
        kwargs["kv"][:, :, start:end].copy_(memory_obj.tensor)

    def from_gpu(self, memory_obj, start: int, end: int, **kwargs) -> None:
        memory_obj.tensor.copy_(kwargs["kv"][:, :, start:end])

    def batched_to_gpu(self, memory_objs=None, starts=None, ends=None, **kwargs) -> None:
        for obj, s, e in zip(memory_objs or [], starts or [], ends or []):
            self.to_gpu(obj, s, e, **kwargs)

    def batched_from_gpu(self, memory_objs, starts, ends, **kwargs) -> None:
        for obj, s, e in zip(memory_objs, starts, ends):
            self.from_gpu(obj, s, e, **kwargs)

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.model.layers, num_tokens, self.model.hidden])


def metadata(model: Model, chunk_size: int = 256) -> LMCacheMetadata:
    return LMCacheMetadata(
        model_name=model.name, world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=model.torch_dtype, kv_shape=(model.layers, 2, chunk_size, model.kv_heads, model.head_dim),
        chunk_size=chunk_size,
    )  # fmt: skip


def rdmakv_config(url: str, **overrides) -> LMCacheEngineConfig:
    """An engine config whose only remote tier is rdmakv at ``url``, set the way the README says."""
    extra = {
        "remote_storage_plugin.rdmakv.module_path": "rdmakv.lmcache",
        "remote_storage_plugin.rdmakv.class_name": "RdmakvConnectorAdapter",
        "remote_storage_plugin.rdmakv.url": url,
    }
    extra.update(overrides.pop("extra_config", {}) or {})
    return engine_config(remote_storage_plugins=["rdmakv"], extra_config=extra, **overrides)


def engine_config(**overrides) -> LMCacheEngineConfig:
    """No local CPU hot cache (every retrieve goes to the tier under test), partial chunks kept."""
    settings = {"chunk_size": 256, "local_cpu": False, "max_local_cpu_size": 0.5, "save_unfull_chunk": True,
                "blocking_timeout_secs": 30}  # fmt: skip
    settings.update(overrides)
    return LMCacheEngineConfig.from_defaults(**settings)


def make_engine(config: LMCacheEngineConfig, model: Model, chunk_size: int = 256) -> LMCacheEngine:
    engine = LMCacheEngineBuilder.get_or_create(
        f"rdmakv-{uuid.uuid4().hex[:8]}", config, metadata(model, chunk_size), CpuKV(model),
        lambda t, r: None, lambda o, r: o,
    )  # fmt: skip
    engine.post_init()
    return engine


def close_engine(engine: LMCacheEngine) -> None:
    for iid, e in list(LMCacheEngineBuilder._instances.items()):
        if e is engine:
            LMCacheEngineBuilder.destroy(iid)


def remote_connector(engine: LMCacheEngine, plugin: str = "rdmakv"):
    """The connector behind the engine's remote backend for ``plugin`` (None if it has none)."""
    backend = engine.storage_manager.storage_backends.get(f"RemoteBackend-{plugin}")
    conn = getattr(backend, "connection", None)
    return conn.getWrappedConnector() if conn is not None else None


def prompt(seed: int, n: int, prefix: np.ndarray | None = None) -> torch.Tensor:
    """``n`` reproducible token ids (after ``prefix`` when given)."""
    toks = token_stream(seed, n).astype(np.int64)
    if prefix is not None:
        toks = np.concatenate([np.asarray(prefix, dtype=np.int64), toks])
    return torch.from_numpy(toks)


def kv_for(tokens: torch.Tensor, model: Model) -> torch.Tensor:
    """The prompt's KV ``[2, layers, tokens, hidden]``: token t's rows from a generator seeded by
    the hash of tokens[:t+1], with the top exponent bit cleared (finite values, exact bytes)."""
    n, dt = len(tokens), model.torch_dtype
    per_token = 2 * model.layers * model.hidden * dt.itemsize
    raw = np.empty((n, per_token), dtype=np.uint8)
    for i, seed in enumerate(prefix_seeds(tokens.numpy().astype(np.uint32))):
        raw[i] = np.frombuffer(np.random.Generator(np.random.PCG64(seed)).bytes(per_token), np.uint8)
    bits = raw.view(f"<u{dt.itemsize}")
    bits &= np.array(~(1 << (8 * dt.itemsize - 2)) & ((1 << (8 * dt.itemsize)) - 1), dtype=bits.dtype)
    rows = torch.from_numpy(raw).view(dt).reshape(n, 2, model.layers, model.hidden)
    return rows.permute(1, 2, 0, 3).contiguous()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("store", "retrieve"))
    p.add_argument("--url", required=True, help="rdmakv://HOST:PORT/NAMESPACE (options allowed)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--model", default=Model.name)
    a = p.parse_args()
    model = Model(name=a.model, layers=a.layers, dtype=a.dtype)
    engine = make_engine(rdmakv_config(a.url), model)
    try:
        tokens = prompt(a.seed, a.tokens)
        kv = kv_for(tokens, model)
        out: dict = {"action": a.action, "tokens": a.tokens}
        if a.action == "store":
            engine.store(tokens, kv=kv)
            conn = remote_connector(engine)
            if conn is not None:  # saves run in the background: wait for them
                out["settled"] = conn.wait_saves(-(-a.tokens // 256), timeout=60)
        else:
            out["hit_tokens"] = engine.lookup(tokens)
            got = torch.zeros_like(kv)
            mask = engine.retrieve(tokens, kv=got)
            out["retrieved_tokens"] = int(mask.sum())
            out["bit_exact"] = same_bytes(got, kv)
        conn = remote_connector(engine)
        out["connector"] = conn.stats() if conn is not None else None
        out["transport"] = conn.last_get.transport if conn is not None else None
        print(json.dumps(out, default=str), flush=True)
    finally:
        close_engine(engine)
    return 0


def main() -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":  # keys must agree across processes (see above)
        os.execve(sys.executable, [sys.executable, "-m", "rdmakv.lmcache.cpu_engine", *sys.argv[1:]],
                  dict(os.environ, PYTHONHASHSEED="0"))  # fmt: skip
    return _main()


if __name__ == "__main__":
    sys.exit(main())
