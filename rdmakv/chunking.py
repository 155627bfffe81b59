"""Split a KV state into token-window chunks and put it back together (pure).

Chunk order in the manifest is layer-major: for each layer its K windows, then
its V windows (a single V chunk when ``v_trans``). A fresh save is therefore
laid out in the slab in the same order as the restore buffer, so a restore's
READs coalesce into a few large ones.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .errors import ManifestError
from .hashing import chunk_key
from .kvstate import KVState
from .manifest import KIND_KV, Manifest

DEFAULT_WINDOW = 256
MAX_LAYERS = 1 << 16
MAX_TOKENS = 1 << 26

_BODY = struct.Struct("<BB8sIIII")  # flags, dtype_len, dtype, elem_size, n_layer, window, n_tokens
_FLAG_V_TRANS = 1
KIND_K, KIND_V = 0, 1


def make_tag(layer: int, kind: int, window: int) -> int:
    return (layer << 33) | (kind << 32) | window


def split_tag(tag: int) -> tuple[int, int, int]:
    return tag >> 33, (tag >> 32) & 1, tag & 0xFFFFFFFF


@dataclass(frozen=True)
class KVLayout:
    """Shape of a KV session: enough to lay out a restore buffer and validate chunks."""

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

    def layer_bytes(self, layer: int) -> tuple[int, int]:
        n = self.n_tokens * self.elem
        return n * self.n_embd_k[layer], n * self.n_embd_v[layer]

    @property
    def total_bytes(self) -> int:
        return sum(sum(self.layer_bytes(i)) for i in range(self.n_layer))

    def windows(self) -> list[tuple[int, int]]:
        w, n = self.window, self.n_tokens
        return [(a, min(a + w, n)) for a in range(0, n, w)]

    def chunk_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Expected (tags, lengths, offsets into the restore buffer), manifest order."""
        tags: list[int] = []
        lengths: list[int] = []
        offsets: list[int] = []
        base = 0
        wins = self.windows()
        for layer in range(self.n_layer):
            for kind, width in ((KIND_K, self.n_embd_k[layer]), (KIND_V, self.n_embd_v[layer])):
                row = width * self.elem
                if kind == KIND_V and self.v_trans:
                    if self.n_tokens:
                        tags.append(make_tag(layer, kind, 0))
                        lengths.append(row * self.n_tokens)
                        offsets.append(base)
                else:
                    for w, (a, b) in enumerate(wins):
                        tags.append(make_tag(layer, kind, w))
                        lengths.append(row * (b - a))
                        offsets.append(base + row * a)
                base += row * self.n_tokens
        return (
            np.array(tags, dtype=np.uint64),
            np.array(lengths, dtype=np.uint32),
            np.array(offsets, dtype=np.uint64),
        )


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


def split(kv: KVState, window: int = DEFAULT_WINDOW) -> tuple[Manifest, list[memoryview]]:
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
    keys = np.fromiter((chunk_key(c) for c in views), dtype=np.uint64, count=len(views))
    tags, lengths, _ = layout.chunk_table()
    return Manifest(KIND_KV, encode_body(layout), keys, lengths, tags), views


def _bytes_view(a: np.ndarray) -> memoryview:
    return memoryview(a).cast("B")


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
    return layout


def assemble(layout: KVLayout, buffer: memoryview | bytearray | np.ndarray) -> KVState:
    """Numpy arrays that are views of ``buffer`` (the restore buffer), no copy."""
    buf = np.frombuffer(buffer, dtype=np.uint8, count=layout.total_bytes)
    k, v = [], []
    base = 0
    n = layout.n_tokens
    for layer in range(layout.n_layer):
        kb, vb = layout.layer_bytes(layer)
        k.append(buf[base : base + kb].view(layout.dtype).reshape(n, layout.n_embd_k[layer]))
        base += kb
        vv = buf[base : base + vb].view(layout.dtype)
        shape = (layout.n_embd_v[layer], n) if layout.v_trans else (n, layout.n_embd_v[layer])
        v.append(vv.reshape(shape))
        base += vb
    return KVState(k, v, layout.tokens.copy(), v_trans=layout.v_trans)
