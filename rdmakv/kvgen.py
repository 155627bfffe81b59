"""Deterministic synthetic KV states that keep the real property dedup relies on.

A token's K/V rows depend only on the tokens up to and including it: each
token's rows are drawn from a generator seeded with a rolling hash of the
prefix. Two sessions that share a prefix therefore share the bytes of every
window inside it, exactly like a real model's cache.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from .client.reports import KVState


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layer: int
    n_embd_k: int
    n_embd_v: int
    dtype: str = "<f2"

    @property
    def bytes_per_token(self) -> int:
        return self.n_layer * (self.n_embd_k + self.n_embd_v) * np.dtype(self.dtype).itemsize


# docs/data-model.md §1: Qwen2.5-0.5B-Instruct, 24 layers, 2 KV heads x 64 dims, float16.
QWEN25_05B = ModelShape("Qwen2.5-0.5B-Instruct", 24, 128, 128)


def prefix_seeds(tokens: np.ndarray) -> list[int]:
    seeds = []
    h = 0x9E3779B97F4A7C15
    for t in np.asarray(tokens, dtype=np.uint32).tolist():
        h = xxhash.xxh3_64_intdigest(struct.pack("<QI", h, t))
        seeds.append(h)
    return seeds


def generate(tokens: np.ndarray, shape: ModelShape = QWEN25_05B, v_trans: bool = False) -> KVState:
    tokens = np.asarray(tokens, dtype=np.uint32)
    n = len(tokens)
    dt = np.dtype(shape.dtype)
    per_token = shape.n_layer * (shape.n_embd_k + shape.n_embd_v)
    rows = np.empty((n, per_token), dtype=dt)
    raw = rows.view(np.uint8).reshape(n, -1)
    for i, seed in enumerate(prefix_seeds(tokens)):
        raw[i] = np.frombuffer(np.random.Generator(np.random.PCG64(seed)).bytes(raw.shape[1]), np.uint8)
    if dt.kind == "f":  # keep values finite so they print sensibly; bytes stay deterministic
        bits = rows.view(f"<u{dt.itemsize}")
        top_exp_bit = 1 << (8 * dt.itemsize - 2)  # cleared -> |x| < 2, never inf/nan
        bits &= np.array(~top_exp_bit & ((1 << (8 * dt.itemsize)) - 1), dtype=bits.dtype)
    k, v = [], []
    per_layer = rows.reshape(n, shape.n_layer, shape.n_embd_k + shape.n_embd_v)
    for layer in range(shape.n_layer):
        k.append(np.ascontiguousarray(per_layer[:, layer, : shape.n_embd_k]))
        vv = per_layer[:, layer, shape.n_embd_k :]
        v.append(np.ascontiguousarray(vv.T if v_trans else vv))
    return KVState(k, v, tokens, v_trans=v_trans)


def token_stream(seed: int, n: int, vocab: int = 151_936) -> np.ndarray:
    """A reproducible token sequence (stand-in for a tokenised chat)."""
    return np.random.Generator(np.random.PCG64(seed)).integers(0, vocab, n, dtype=np.uint32)


_V1_HEAD = struct.Struct("<4sIII")


def encode_v1(kv: KVState) -> bytes:
    """The v1 single-blob save: header, tokens, then every layer's K and V bytes."""
    parts = [_V1_HEAD.pack(b"RKV1", kv.n_layer, kv.n_tokens, int(kv.v_trans)), kv.tokens.astype("<u4").tobytes()]
    for k, v in zip(kv.k, kv.v):
        parts.append(np.ascontiguousarray(k).tobytes())
        parts.append(np.ascontiguousarray(v).tobytes())
    return b"".join(parts)


def decode_v1(data: bytes, shape: ModelShape = QWEN25_05B) -> KVState:
    magic, n_layer, n, v_trans = _V1_HEAD.unpack_from(data)
    if magic != b"RKV1" or n_layer != shape.n_layer:
        raise ValueError("not a v1 blob of this model shape")
    pos = _V1_HEAD.size
    tokens = np.frombuffer(data, "<u4", n, pos)
    pos += 4 * n
    dt = np.dtype(shape.dtype)
    k, v = [], []
    for _ in range(n_layer):
        kk = np.frombuffer(data, dt, n * shape.n_embd_k, pos).reshape(n, shape.n_embd_k)
        pos += kk.nbytes
        vshape = (shape.n_embd_v, n) if v_trans else (n, shape.n_embd_v)
        vv = np.frombuffer(data, dt, n * shape.n_embd_v, pos).reshape(vshape)
        pos += vv.nbytes
        k.append(kk)
        v.append(vv)
    return KVState(k, v, tokens.copy(), v_trans=bool(v_trans))
