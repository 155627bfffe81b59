"""Split a KV state into token-window chunks and put it back together (pure).

Chunk order in the manifest is layer-major: for each layer its K windows, then
its V windows (a single V chunk when ``v_trans``). A fresh save is therefore
laid out in the slab in the same order as the restore buffer, so a restore's
READs coalesce into a few large ones.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..client.reports import KVState
from ..errors import ManifestError
from ..hashing import HASH_XXH3_64, key_function, keys_array
from .manifest import KIND_KV, Manifest

DEFAULT_WINDOW = 256
MAX_LAYERS = 1 << 16
MAX_TOKENS = 1 << 26
MAX_EMBD = 1 << 20  # elements per row: keeps every size below in 64-bit range before it is checked
MAX_CHUNK_BYTES = (1 << 32) - 1  # a chunk length is a u32 in the manifest

_BODY = struct.Struct("<BB8sIIII")  # flags, dtype_len, dtype, elem_size, n_layer, window, n_tokens
_FLAG_V_TRANS = 1
KIND_K, KIND_V = 0, 1


def make_tag(layer: int, kind: int, window: int) -> int:
    return (layer << 33) | (kind << 32) | window


@dataclass(frozen=True)
class KVLayout:
    """Shape of a KV session: enough to lay out a restore buffer and validate chunks.

    The restore buffer holds, per layer, K then V (each ``n_tokens`` rows, or V
    transposed); the chunk table is computed with numpy because a restore pays for
    it on its hot path (a 16k-token session at W=8 has ~100k chunks).
    """

    dtype: np.dtype
    n_tokens: int
    window: int
    v_trans: bool
    n_embd_k: tuple[int, ...]
    n_embd_v: tuple[int, ...]
    tokens: np.ndarray

    @property
    def n_layer(self) -> int:
        return len(self.n_embd_k)

    @property
    def elem(self) -> int:
        return self.dtype.itemsize

    @cached_property
    def _rows(self) -> np.ndarray:
        """Row bytes per (layer, K|V)."""
        return np.array([self.n_embd_k, self.n_embd_v], dtype=np.int64).T * self.elem

    def layer_bytes(self, layer: int) -> tuple[int, int]:
        rk, rv = self._rows[layer].tolist()
        return rk * self.n_tokens, rv * self.n_tokens

    @cached_property
    def total_bytes(self) -> int:
        return int(self._rows.sum()) * self.n_tokens

    def windows(self) -> list[tuple[int, int]]:
        w, n = self.window, self.n_tokens
        return [(a, min(a + w, n)) for a in range(0, n, w)]

    @cached_property
    def _table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, L = self.n_tokens, self.n_layer
        rows = self._rows  # (L, 2)
        base = np.zeros((L, 2), dtype=np.int64)
        per_layer = rows.sum(axis=1) * n
        base[1:, 0] = np.cumsum(per_layer)[:-1]
        base[:, 1] = base[:, 0] + rows[:, 0] * n
        starts = np.arange(0, n, self.window, dtype=np.int64)
        counts = np.minimum(starts + self.window, n) - starts
        wins = np.arange(len(starts), dtype=np.int64)
        layer = np.arange(L, dtype=np.int64)[:, None]
        k_tags = (layer << 33) | wins[None, :]
        k_len = rows[:, :1] * counts[None, :]
        k_off = base[:, :1] + rows[:, :1] * starts[None, :]
        if self.v_trans:
            has = 1 if n else 0
            v_tags = ((layer << 33) | (KIND_V << 32))[:, :has]
            v_len = (rows[:, 1:] * n)[:, :has]
            v_off: np.ndarray = base[:, 1:][:, :has]
        else:
            v_tags = (layer << 33) | (KIND_V << 32) | wins[None, :]
            v_len = rows[:, 1:] * counts[None, :]
            v_off = base[:, 1:] + rows[:, 1:] * starts[None, :]
        tags = np.concatenate([k_tags, v_tags], axis=1).ravel().astype(np.uint64)
        lengths64 = np.concatenate([k_len, v_len], axis=1).ravel()
        if len(lengths64) and int(lengths64.max()) > MAX_CHUNK_BYTES:
            raise ManifestError(f"a chunk of this shape would be {int(lengths64.max())} bytes, over the u32 limit")
        lengths = lengths64.astype(np.uint32)
        offsets = np.concatenate([k_off, v_off], axis=1).ravel().astype(np.uint64)
        return tags, lengths, offsets

    def chunk_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Expected (tags, lengths, offsets into the restore buffer), manifest order."""
        return self._table


def layout_of(kv: KVState, window: int) -> KVLayout:
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    return KVLayout(
        dtype=kv.dtype,
        n_tokens=kv.n_tokens,
        window=window,
        v_trans=kv.v_trans,
        n_embd_k=tuple(a.shape[1] for a in kv.k),
        n_embd_v=tuple(a.shape[0] if kv.v_trans else a.shape[1] for a in kv.v),
        tokens=kv.tokens,
    )


def split(kv: KVState, window: int = DEFAULT_WINDOW, hash_alg: int = HASH_XXH3_64) -> tuple[Manifest, list[memoryview]]:
    """Chunks (as zero-copy views where the arrays allow) and the manifest that lists them."""
    layout = layout_of(kv, window)
    views: list[memoryview] = []
    wins = layout.windows()
    for layer in range(layout.n_layer):
        k = np.ascontiguousarray(kv.k[layer])
        for a, b in wins:
            views.append(_bytes_view(k[a:b]))
        v = np.ascontiguousarray(kv.v[layer])
        if kv.v_trans:
            if kv.n_tokens:
                views.append(_bytes_view(v))
        else:
            for a, b in wins:
                views.append(_bytes_view(v[a:b]))
    key = key_function(hash_alg)
    keys = keys_array([key(c) for c in views], hash_alg)
    tags, lengths, _ = layout.chunk_table()
    return Manifest(KIND_KV, encode_body(layout), keys, lengths, tags, hash_alg), views


def _bytes_view(a: np.ndarray) -> memoryview:
    return a.data.cast("B")


def encode_body(layout: KVLayout) -> bytes:
    dt = layout.dtype.str.encode("ascii")
    head = _BODY.pack(
        _FLAG_V_TRANS if layout.v_trans else 0,
        len(dt),
        dt,
        layout.elem,
        layout.n_layer,
        layout.window,
        layout.n_tokens,
    )
    dims = np.array([layout.n_embd_k, layout.n_embd_v], dtype="<u4").T.tobytes()
    return head + dims + np.ascontiguousarray(layout.tokens, dtype="<u4").tobytes()


def decode_layout(m: Manifest) -> KVLayout:
    """Decode a KV manifest body and check the chunk table matches the shape exactly."""
    if m.kind != KIND_KV:
        raise ManifestError(f"manifest kind {m.kind} is not a KV session")
    body = m.body
    if len(body) < _BODY.size:
        raise ManifestError("KV manifest body too short")
    flags, dlen, dt, elem, n_layer, window, n_tokens = _BODY.unpack_from(body)
    if flags & ~_FLAG_V_TRANS:
        raise ManifestError(f"unknown KV flags 0x{flags:02x}")
    if not 0 < dlen <= 8:
        raise ManifestError(f"bad dtype length {dlen}")
    try:
        dtype = np.dtype(dt[:dlen].decode("ascii"))
    except (TypeError, UnicodeDecodeError) as e:
        raise ManifestError(f"bad dtype {dt[:dlen]!r}") from e
    if dtype.itemsize != elem or dtype.hasobject or dtype.itemsize == 0:
        raise ManifestError(f"dtype {dtype} does not match element size {elem}")
    if not 0 < n_layer <= MAX_LAYERS:
        raise ManifestError(f"n_layer {n_layer} out of range")
    if window <= 0:
        raise ManifestError("window must be positive")
    if n_tokens > MAX_TOKENS:
        raise ManifestError(f"n_tokens {n_tokens} out of range")
    expected = _BODY.size + 8 * n_layer + 4 * n_tokens
    if len(body) != expected:
        raise ManifestError(f"KV manifest body is {len(body)} bytes, expected {expected}")
    dims = np.frombuffer(body, dtype="<u4", count=2 * n_layer, offset=_BODY.size).reshape(n_layer, 2)
    if int(dims.max()) > MAX_EMBD:
        raise ManifestError(f"n_embd {int(dims.max())} out of range (at most {MAX_EMBD})")
    tokens = np.frombuffer(body, dtype="<u4", count=n_tokens, offset=_BODY.size + 8 * n_layer)
    layout = KVLayout(
        dtype=dtype,
        n_tokens=n_tokens,
        window=window,
        v_trans=bool(flags & _FLAG_V_TRANS),
        n_embd_k=tuple(int(x) for x in dims[:, 0]),
        n_embd_v=tuple(int(x) for x in dims[:, 1]),
        tokens=tokens.astype(np.uint32),
    )
    if layout.total_bytes > 1 << 40:
        raise ManifestError("KV session larger than 1 TiB")
    tags, lengths, _ = layout.chunk_table()
    if not (np.array_equal(tags, m.tags) and np.array_equal(lengths, m.lengths)):
        raise ManifestError("chunk table does not match the session shape")
    if layout.total_bytes != m.total_bytes:
        raise ManifestError("chunk lengths do not add up to the session's size")
    return layout


def assemble(layout: KVLayout, buffer: memoryview | bytearray | np.ndarray) -> KVState:
    """Numpy arrays that are views of ``buffer`` (the restore buffer), no copy."""
    buf = np.frombuffer(buffer, dtype=np.uint8, count=layout.total_bytes)
    n = layout.n_tokens
    dt = layout.dtype
    if len(set(layout.n_embd_k)) == 1 and len(set(layout.n_embd_v)) == 1:
        # uniform layers (the common case): a handful of numpy calls instead of a few per layer
        ek, ev = layout.n_embd_k[0], layout.n_embd_v[0]
        per = buf.view(dt).reshape(layout.n_layer, n * (ek + ev))
        k = list(per[:, : n * ek].reshape(layout.n_layer, n, ek))
        vshape = (layout.n_layer, ev, n) if layout.v_trans else (layout.n_layer, n, ev)
        v = list(per[:, n * ek :].reshape(vshape))
        return KVState(k, v, layout.tokens.copy(), v_trans=layout.v_trans)
    k, v = [], []
    base = 0
    for layer in range(layout.n_layer):
        kb, vb = layout.layer_bytes(layer)
        k.append(buf[base : base + kb].view(dt).reshape(n, layout.n_embd_k[layer]))
        base += kb
        shape = (layout.n_embd_v[layer], n) if layout.v_trans else (n, layout.n_embd_v[layer])
        v.append(buf[base : base + vb].view(dt).reshape(shape))
        base += vb
    return KVState(k, v, layout.tokens.copy(), v_trans=layout.v_trans)
