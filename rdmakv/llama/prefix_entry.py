"""Prefix entries: the first L tokens of a slot's KV state, as chunks the store already holds (pure).

An entry is a manifest (kind ``slotfile``) whose chunk table lists, in order, the token ids of
each window (4 bytes a token), then for every layer its K rows window by window, then its V
rows the same way: exactly the chunks ``slot_chunks.split`` cuts from a whole slot file for the
full windows, so an entry costs the store its manifest (the chunk bytes are shared with every
other entry and slot file holding that prefix). A last, partial window is cut down to L.

The body (magic ``RKPX``) is the cache's shape: the slot-file version and layout, n_stream,
v_trans, and each layer's K and V types and row sizes, a few hundred bytes. From body, chunks
and nothing else, ``synthesize`` writes a slot file of one stream of cells at positions 0..L-1
that llama-server's own slot restore loads (format facts: docs/llama-auto-cache.md).

Only the plain case is cut: one KV block, one stream holding the slot's cells at positions
0..n-1, one seq id a cell, no per-cell extension bytes, V tensors present, and the file's token
list matching its cells. Anything else (iSWA, M-RoPE, context-shifted caches, recurrent
models) raises ``Unsupported`` naming why, and the auto-cache stores nothing for it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .slot_chunks import make_tag, parse_tag, split
from .slot_format import MAGIC_GGSQ, MAX_LAYERS, MAX_ROW_BYTES, MAX_STREAMS, Buffer, SlotFile, SlotFileError

BODY_MAGIC = b"RKPX"
BODY_VERSION = 1
LAYOUTS = {"v2c": 2, "v3": 3, "v4": 4}  # layout label -> its code in the body (all: n_stream, no cell ext)
_LAYOUT_BY_CODE = {v: k for k, v in LAYOUTS.items()}
_HEAD = struct.Struct("<4sBBBBIIIIII")  # magic, body ver, file ver, layout, flags, W, L, n_stream, n_layer, rot k/v
FLAG_V_TRANS = 1
LAYER_DTYPE = np.dtype([("k_type", "<i4"), ("k_row", "<u8"), ("v_type", "<i4"), ("v_row", "<u8"),
                        ("v_el", "<u4"), ("v_embd", "<u4")])  # fmt: skip
TOKEN_BLOCK = 15  # chunk tag block of the token-id chunks (KV chunks are block 0)
MAX_ENTRY_TOKENS = 1 << 24
_META = np.dtype([("pos", "<i4"), ("n_seq_id", "<u4"), ("seq_id", "<i4")])
_U32 = struct.Struct("<I")


class PrefixEntryError(SlotFileError):
    """An entry body or chunk set that does not describe a loadable prefix."""

    code = 28


class Unsupported(ValueError):
    """A slot file the auto-cache cannot cut into prefix entries (the reason says why)."""


@dataclass(frozen=True, eq=False)
class Shape:
    """What a slot file must say about the cache, besides its cells and rows."""

    file_version: int
    layout: str
    n_stream: int
    v_trans: bool
    n_rot_k: int  # 0 unless layout v4
    n_rot_v: int
    layers: np.ndarray  # LAYER_DTYPE, one record per layer

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    def row_sizes(self) -> list[int]:
        """Bytes a cell takes in each region, in file order: every K layer, then every V layer."""
        return [int(r) for r in self.layers["k_row"]] + [int(r) for r in self.layers["v_row"]]

    def same_cache(self, other: Shape) -> bool:
        """Would a file of ``other``'s shape load where one of this shape does (n_stream aside)?"""
        return (self.file_version, self.layout, self.v_trans, self.n_rot_k, self.n_rot_v) == (
            other.file_version, other.layout, other.v_trans, other.n_rot_k, other.n_rot_v
        ) and self.layers.tobytes() == other.layers.tobytes()  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """A decoded entry body."""

    shape: Shape
    window: int
    n_tokens: int


def window_counts(n_tokens: int, window: int) -> list[int]:
    full, rest = divmod(n_tokens, window)
    return [window] * full + ([rest] if rest else [])


def chunk_lengths(entry: Entry) -> np.ndarray:
    """The length of every chunk of the entry, in manifest order."""
    counts = np.asarray(window_counts(entry.n_tokens, entry.window), dtype=np.int64)
    rows = [4] + entry.shape.row_sizes()
    return np.concatenate([counts * r for r in rows])


# --------------------------------------------------------------------------- body


def encode_body(shape: Shape, window: int, n_tokens: int) -> bytes:
    flags = FLAG_V_TRANS if shape.v_trans else 0
    head = _HEAD.pack(BODY_MAGIC, BODY_VERSION, shape.file_version, LAYOUTS[shape.layout], flags, window,
                      n_tokens, shape.n_stream, shape.n_layer, shape.n_rot_k, shape.n_rot_v)  # fmt: skip
    return head + np.ascontiguousarray(shape.layers, LAYER_DTYPE).tobytes()


def is_entry_body(body: Buffer) -> bool:
    return bytes(memoryview(body)[:4]) == BODY_MAGIC


def decode_body(body: Buffer) -> Entry:
    """Decode and check an entry body; PrefixEntryError naming the defect."""
    body = bytes(body)
    if len(body) < _HEAD.size:
        raise PrefixEntryError(f"prefix entry body too short ({len(body)} bytes)")
    magic, ver, fver, code, flags, window, n_tokens, n_stream, n_layer, rot_k, rot_v = _HEAD.unpack_from(body)
    if magic != BODY_MAGIC or ver != BODY_VERSION:
        raise PrefixEntryError(f"not a prefix entry body (magic {magic!r}, version {ver})")
    layout = _LAYOUT_BY_CODE.get(code)
    if layout is None or LAYOUTS[layout] != fver:
        raise PrefixEntryError(f"prefix entry: slot-file version {fver} with layout code {code} is not one it writes")
    if flags & ~FLAG_V_TRANS:
        raise PrefixEntryError(f"prefix entry: unknown flags 0x{flags:02x}")
    if not 1 <= window <= MAX_ENTRY_TOKENS or not 1 <= n_tokens <= MAX_ENTRY_TOKENS:
        raise PrefixEntryError(f"prefix entry: window {window} / {n_tokens} tokens out of range")
    if not 1 <= n_stream <= MAX_STREAMS or not 1 <= n_layer <= MAX_LAYERS:
        raise PrefixEntryError(f"prefix entry: n_stream {n_stream} / n_layer {n_layer} out of range")
    if layout != "v4" and (rot_k or rot_v):
        raise PrefixEntryError(f"prefix entry: rotation counts in a {layout} layout")
    if len(body) != _HEAD.size + n_layer * LAYER_DTYPE.itemsize:
        raise PrefixEntryError(f"prefix entry body is {len(body)} bytes, its {n_layer} layers need "
                               f"{_HEAD.size + n_layer * LAYER_DTYPE.itemsize}")  # fmt: skip
    layers = np.frombuffer(body, LAYER_DTYPE, n_layer, _HEAD.size).copy()
    _check_layers(layers, bool(flags & FLAG_V_TRANS))
    shape = Shape(fver, layout, n_stream, bool(flags & FLAG_V_TRANS), rot_k, rot_v, layers)
    return Entry(shape, window, n_tokens)


def _check_layers(layers: np.ndarray, v_trans: bool) -> None:
    for col in ("k_row", "v_row"):
        if ((layers[col] == 0) | (layers[col] > MAX_ROW_BYTES)).any():
            raise PrefixEntryError(f"prefix entry: a layer's {col} is out of range")
    if ((layers["k_type"] < 0) | (layers["v_type"] < 0)).any():
        raise PrefixEntryError("prefix entry: a layer has a negative ggml type")
    if v_trans:
        el, embd = layers["v_el"].astype(np.uint64), layers["v_embd"].astype(np.uint64)
        if ((el == 0) | (el > 8) | (embd == 0) | (el * embd != layers["v_row"])).any():
            raise PrefixEntryError("prefix entry: a transposed V layer's element size x n_embd is not its row")
    elif (layers["v_el"] != 0).any() or (layers["v_embd"] != 0).any():
        raise PrefixEntryError("prefix entry: element sizes given for V rows that are not transposed")


# --------------------------------------------------------------------------- cutting a slot file


def shape_of(slot: SlotFile) -> Shape:
    """The shape of a slot file the auto-cache can cut; Unsupported (naming why) otherwise."""
    st = _the_stream(slot)
    if st.n_layer != len(st.k_layers) or len(st.v_layers) != st.n_layer:
        raise Unsupported(f"{len(st.k_layers)} K and {len(st.v_layers)} V layers for n_layer {st.n_layer}")
    layers = np.zeros(st.n_layer, LAYER_DTYPE)
    layers["k_type"] = [r.type for r in st.k_layers]
    layers["k_row"] = [r.row_size for r in st.k_layers]
    layers["v_type"] = [r.type for r in st.v_layers]
    layers["v_row"] = [r.row_size for r in st.v_layers]
    if st.v_trans:
        layers["v_el"] = [r.el_size for r in st.v_layers]
        layers["v_embd"] = [r.n_embd for r in st.v_layers]
    n_stream = slot.blocks[0].n_stream or 1
    return Shape(slot.version, slot.layout, n_stream, bool(st.v_trans), st.n_rot_k or 0, st.n_rot_v or 0, layers)


def _the_stream(slot: SlotFile):
    if slot.layout not in LAYOUTS:
        raise Unsupported(f"slot-file layout {slot.layout} (the auto-cache writes {', '.join(LAYOUTS)})")
    if len(slot.blocks) != 1:
        raise Unsupported(f"{len(slot.blocks)} KV blocks (an iSWA model)")
    if slot.ext_size:
        raise Unsupported(f"{slot.ext_size} extension bytes per cell (M-RoPE or per-layer embeddings)")
    full = [s for s in slot.blocks[0].streams if s.cell_count]
    if len(full) != 1:
        raise Unsupported(f"{len(full)} streams hold cells (one slot's save has one)")
    st = full[0]
    n = st.cell_count
    if st.n_seq_id is None or (st.n_seq_id != 1).any():
        raise Unsupported("cells listing other than one seq id")
    if not np.array_equal(np.sort(st.pos), np.arange(n, dtype=st.pos.dtype)):
        raise Unsupported("cells are not the positions 0..n-1 (a context shift or a cache with gaps)")
    tokens = slot.tokens
    if tokens is None or len(tokens) != n or (n and int(np.min(tokens)) < 0):
        raise Unsupported(f"the file's token list ({'unreadable' if tokens is None else len(tokens)}) does not "
                          f"match its {n} cells (media chunks, or a partial save)")  # fmt: skip
    return st


@dataclass
class Cut:
    """A slot file cut once into the chunks of every prefix entry it can give."""

    shape: Shape
    tokens: np.ndarray  # <i4, one per cell
    window: int
    regions: list[list[Buffer]]  # per region (K layers, then V layers): the chunk of each window

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def entry(self, length: int) -> tuple[bytes, list[Buffer], list[int], list[tuple]]:
        """(body, chunks, tags, chunk identities) of the entry for the first ``length`` tokens.
        Chunks of whole windows are shared between entries: equal identities, equal bytes."""
        if not 1 <= length <= self.n_tokens:
            raise ValueError(f"prefix length {length} outside 1..{self.n_tokens}")
        k, rest = divmod(length, self.window)
        n_win = k + (1 if rest else 0)
        chunks: list[Buffer] = []
        tags: list[int] = []
        ids: list[tuple] = []
        tok = self.tokens.data.cast("B")
        for w in range(n_win):
            end = min((w + 1) * self.window, length)
            chunks.append(tok[4 * w * self.window : 4 * end])
            tags.append(make_tag(TOKEN_BLOCK, 0, 0, "K", False, w))
            ids.append(("tokens", w, end))
        n_layer = self.shape.n_layer
        for r, wins in enumerate(self.regions):
            layer, kind = r % n_layer, "K" if r < n_layer else "V"
            trans = kind == "V" and self.shape.v_trans
            for w in range(n_win):
                count = min(self.window, length - w * self.window)
                chunks.append(wins[w] if count == self._count(w) else self._cut_rows(r, wins[w], count))
                tags.append(make_tag(0, 0, layer, kind, trans, w))
                ids.append((r, w, count))
        return encode_body(self.shape, self.window, length), chunks, tags, ids

    def _count(self, w: int) -> int:
        return min(self.window, self.n_tokens - w * self.window)

    def _cut_rows(self, region: int, chunk: Buffer, count: int) -> Buffer:
        """The first ``count`` cells of a window's chunk."""
        n_layer = self.shape.n_layer
        if region >= n_layer and self.shape.v_trans:  # [n_embd][cells][el]: gather the first columns
            rec = self.shape.layers[region - n_layer]
            mat = np.frombuffer(chunk, np.uint8).reshape(int(rec["v_embd"]), -1, int(rec["v_el"]))
            return mat[:, :count, :].tobytes()
        row = self.shape.row_sizes()[region]
        return memoryview(chunk).cast("B")[: count * row]


def cut(slot: SlotFile, window: int) -> Cut:
    """Cut a parsed slot file for prefix entries (Unsupported when it is not the plain case)."""
    shape = shape_of(slot)
    _, pieces = split(slot, window)
    n_layer = shape.n_layer
    regions: list[list[Buffer]] = [[] for _ in range(2 * n_layer)]
    for tag, chunk in pieces:
        t = parse_tag(tag)
        r = int(t["layer"]) + (n_layer if t["kind"] == "V" else 0)
        if int(t["window"]) != len(regions[r]):
            raise Unsupported("windows out of order")  # cannot happen for cells 0..n-1; never guess
        regions[r].append(chunk)
    tokens = np.ascontiguousarray(slot.tokens, dtype="<i4")
    return Cut(shape, tokens, window, regions)


# --------------------------------------------------------------------------- writing a slot file


def entry_tokens(entry: Entry, chunks: Sequence[Buffer]) -> np.ndarray:
    """The entry's token ids (from its token chunks; lengths checked)."""
    n_win = len(window_counts(entry.n_tokens, entry.window))
    _check_chunks(entry, chunks)
    return np.frombuffer(b"".join(memoryview(c).cast("B") for c in chunks[:n_win]), "<i4")


def _check_chunks(entry: Entry, chunks: Sequence[Buffer]) -> None:
    want = chunk_lengths(entry)
    if len(chunks) != len(want):
        raise PrefixEntryError(f"prefix entry of {entry.n_tokens} tokens needs {len(want)} chunks, got {len(chunks)}")
    got = np.fromiter((memoryview(c).nbytes for c in chunks), np.int64, len(chunks))
    bad = np.flatnonzero(got != want)
    if len(bad):
        i = int(bad[0])
        raise PrefixEntryError(f"prefix entry chunk {i} has {int(got[i])} bytes, expected {int(want[i])}")


def _plan(entry: Entry, n_stream: int | None) -> list[bytes | int | tuple[int, int, list[int]]]:
    """The synthesized file as a list of fixed bytes, chunk indices (the chunk goes there as it
    is) and (el, n_embd, chunk indices) for a transposed V layer (its windows interleaved)."""
    shape, n = entry.shape, entry.n_tokens
    n_stream = shape.n_stream if n_stream is None else n_stream
    if not 1 <= n_stream <= MAX_STREAMS:
        raise PrefixEntryError(f"n_stream {n_stream} out of range")
    n_win = len(window_counts(n, entry.window))
    meta = np.zeros(n, _META)
    meta["pos"] = np.arange(n, dtype=np.int32)
    meta["n_seq_id"] = 1
    plan: list[bytes | int | tuple[int, int, list[int]]] = [struct.pack("<III", MAGIC_GGSQ, shape.file_version, n)]
    plan += [*range(n_win), struct.pack("<II", n_stream, n), meta.tobytes()]
    plan.append(struct.pack("<II", int(shape.v_trans), shape.n_layer))
    if shape.layout == "v4":
        plan.append(struct.pack("<II", shape.n_rot_k, shape.n_rot_v))
    at = n_win
    for rec in shape.layers:
        plan.append(struct.pack("<iQ", int(rec["k_type"]), int(rec["k_row"])))
        plan += range(at, at + n_win)
        at += n_win
    for rec in shape.layers:
        if shape.v_trans:
            embd, el = int(rec["v_embd"]), int(rec["v_el"])
            plan.append(struct.pack("<iII", int(rec["v_type"]), el, embd))
            plan.append((el, embd, list(range(at, at + n_win))))
        else:
            plan.append(struct.pack("<iQ", int(rec["v_type"]), int(rec["v_row"])))
            plan += range(at, at + n_win)
        at += n_win
    plan += [_U32.pack(0)] * (n_stream - 1)
    return plan


def synthesize(entry: Entry, chunks: Sequence[Buffer], n_stream: int | None = None) -> list[Buffer]:
    """The slot file of the entry, as consecutive parts (views of the chunks where rows allow).

    ``n_stream``: the target server's stream count (default: the saving server's); the cells go
    into stream 0, which llama-server loads into whichever slot the restore names."""
    _check_chunks(entry, chunks)
    parts: list[Buffer] = []
    for p in _plan(entry, n_stream):
        if isinstance(p, int):
            parts.append(chunks[p])
        elif isinstance(p, tuple):  # the file's [n_embd][cells][el] from [n_embd][window][el] chunks
            el, embd, idx = p
            parts.append(np.concatenate([np.frombuffer(chunks[i], np.uint8).reshape(embd, -1, el) for i in idx],
                                        axis=1).tobytes())  # fmt: skip
        else:
            parts.append(p)
    return parts


def file_layout(entry: Entry, n_stream: int | None = None) -> tuple[int, list[tuple[int, bytes]], np.ndarray] | None:
    """Where the synthesized file's bytes go: (its size, [(offset, fixed bytes)], each chunk's
    offset), so a fetch can receive the chunks straight into the file. None when V is
    transposed (its windows interleave, so its chunks have no place of their own)."""
    lengths = chunk_lengths(entry)
    offsets = np.zeros(len(lengths), np.int64)
    fixed: list[tuple[int, bytes]] = []
    at = 0
    for p in _plan(entry, n_stream):
        if isinstance(p, tuple):
            return None
        if isinstance(p, int):
            offsets[p] = at
            at += int(lengths[p])
        else:
            fixed.append((at, p))
            at += len(p)
    return at, fixed, offsets
