"""llama.cpp sequence-state ("ggsq") slot-file codec: parse, chunk, rebuild.

Pure: bytes in, objects out (``load`` is the only helper that touches a path).
The format facts are in ``shared/llama-slot-format.md``; in short, a slot file is::

    u32 magic 'ggsq' | u32 version | u32 n_words | n_words x i32 token words | KV state

and the KV state is one or more KV blocks (iSWA models write the base cache and
then the SWA cache), each holding per-stream cells (META: pos, n_seq_id,
optional cell-ext bytes, seq ids) and per-layer K/V rows (V possibly transposed).

Chunking: every K/V layer region of every stream is cut into windows of W
*positions* (window = pos // W, taken from META, never the cell ordinal), rows
ordered by pos inside a window. Transposed V is de-interleaved per window, so a
chunk never depends on the file's total cell count. Everything that is not K/V
row data (header, token words, META, layer headers) goes into the manifest
body, which is therefore what makes two files with a shared prefix differ;
the chunks of full windows inside the prefix are byte-identical and dedup.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from ..errors import CodecError

MAGIC_GGSQ = 0x67677371  # 'ggsq' sequence-state file
MAGIC_GGSN = 0x6767736E  # 'ggsn' whole-context session file (not a slot file)
SUPPORTED_VERSIONS = (1, 2, 3, 4)
TOKEN_NULL = -1

# Plausibility limits: they only make garbage fail early with a clear message.
MAX_STREAMS = 4096
MAX_LAYERS = 65536
MAX_SEQ_IDS = 1 << 16
MAX_ROW_BYTES = 1 << 30
MAX_N_EMBD = 1 << 24
MAX_BLOCKS = 16  # 4 bits of the chunk tag
MAX_TYPE_ID = 1024

GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0", 42: "Q2_0",
}  # fmt: skip

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<III")

Buffer = bytes | bytearray | memoryview


def ggml_type_name(type_id: int) -> str:
    return GGML_TYPE_NAMES.get(type_id, f"type{type_id}")


class SlotFileError(CodecError):
    """Bytes that are not a slot file this codec can chunk (or a bad manifest body)."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


# --------------------------------------------------------------------------- model


@dataclass
class LayerRegion:
    """One K or V layer of one stream: its header and its row data in the file."""

    kind: str  # "K" or "V"
    layer: int
    type: int
    header_offset: int
    data_offset: int
    row_size: int  # bytes per cell (for transposed V: el_size * n_embd)
    transposed: bool = False
    el_size: int = 0  # transposed V only
    n_embd: int = 0  # transposed V only
    cell_count: int = 0

    @property
    def data_size(self) -> int:
        return self.cell_count * self.row_size

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.type)


@dataclass
class Stream:
    index: int
    cell_count: int
    offset: int  # of the cell_count field
    pos: np.ndarray  # int32, one per saved cell, in file (cell-index) order
    meta_offset: int = 0
    meta_size: int = 0
    n_seq_id: np.ndarray | None = None  # uint32 per cell (None for v1: no seq ids)
    ext: np.ndarray | None = None  # (cell_count, ext_size) uint8 cell-ext bytes, if any
    seq_ids: list[int] = field(default_factory=list)  # distinct ids seen
    v_trans: int | None = None
    n_layer: int = 0
    n_rot_k: int | None = None
    n_rot_v: int | None = None
    k_layers: list[LayerRegion] = field(default_factory=list)
    v_layers: list[LayerRegion] = field(default_factory=list)


@dataclass
class KVBlock:
    index: int
    offset: int
    end: int
    n_stream: int | None  # None: layout without an n_stream field (v1, v2a, v2b)
    streams: list[Stream]


@dataclass
class SlotFile:
    data: memoryview
    version: int
    layout: str  # "v1", "v2a".."v2d", "v3", "v4"
    token_words: np.ndarray  # int32, verbatim header words
    tokens: np.ndarray | None  # decoded token ids (None if the packed blob is unreadable)
    packed_tokens: bool
    token_note: str
    ext_size: int
    blocks: list[KVBlock]

    @property
    def file_size(self) -> int:
        return len(self.data)

    @property
    def n_token_words(self) -> int:
        return len(self.token_words)


# --------------------------------------------------------------------------- reader


class _Fail(Exception):
    """A candidate layout does not fit; carries where and why."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message


class _Reader:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: memoryview, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf)

    @property
    def left(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise _Fail(self.pos, f"{what}: needs {n} bytes, only {self.left} left")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def i32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def uint(self, width: int, what: str) -> int:
        return self.u64(what) if width == 8 else self.u32(what)

    def skip(self, n: int, what: str) -> int:
        self.need(n, what)
        start = self.pos
        self.pos += n
        return start


def _check(cond: bool, offset: int, message: str) -> None:
    if not cond:
        raise _Fail(offset, message)


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _Layout:
    name: str
    multi_stream: bool = True  # leading u32 n_stream per block (v2c and later)
    ext_size: int = 0  # cell-ext bytes in META (v2d: 8 for M-RoPE, v3/v4: 12)
    rot_fields: bool = False  # v4: u32 n_rot_k, u32 n_rot_v after n_layer
    v_layers: bool = True  # False: caches without V tensors (MLA)
    empty_has_data: bool = False  # v2a/v2b write DATA even for zero cells

    @property
    def label(self) -> str:
        extras = [f"ext{self.ext_size}"] if self.ext_size else []
        extras += [] if self.v_layers else ["no-V"]
        return self.name + (f"({','.join(extras)})" if extras else "")


def _candidates(version: int) -> list[_Layout]:
    if version == 2:
        base = [
            _Layout("v2c"),
            _Layout("v2d", ext_size=8),
            _Layout("v2b", multi_stream=False, empty_has_data=True),
        ]
    elif version in (3, 4):
        name, rot = f"v{version}", version == 4
        base = [_Layout(name, rot_fields=rot), _Layout(name, ext_size=12, rot_fields=rot)]
    else:
        return []
    # Caches without V tensors are rare; only tried when the common forms fail.
    no_v = [
        _Layout(c.name, c.multi_stream, c.ext_size, c.rot_fields, False, c.empty_has_data)
        for c in base
        if c.multi_stream
    ]
    return base + no_v


# --------------------------------------------------------------------------- parse


def parse(data: Buffer) -> SlotFile:
    """Parse a ggsq slot file; raise SlotFileError naming what was found."""
    buf = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    if len(buf) < _HEADER.size:
        raise SlotFileError(f"file too short for a ggsq header ({len(buf)} bytes, need 12)", 0)
    magic, version, n_words = _HEADER.unpack_from(buf, 0)
    _check_magic(magic, bytes(buf[:4]))
    if version not in SUPPORTED_VERSIONS:
        raise SlotFileError(
            f"unsupported ggsq version {version} at offset 4 "
            f"(this build reads {', '.join(map(str, SUPPORTED_VERSIONS))})",
            4,
        )
    body_start = _HEADER.size + 4 * n_words
    if body_start > len(buf):
        raise SlotFileError(
            f"ggsq v{version}: header declares {n_words} token words ({4 * n_words} bytes) "
            f"but the file has only {len(buf) - _HEADER.size} bytes after the header",
            8,
        )
    if body_start == len(buf):
        raise SlotFileError(
            f"ggsq v{version}: no KV state after the {n_words} token words "
            f"(file ends at offset {body_start})",
            body_start,
        )
    words = np.frombuffer(buf, dtype="<i4", count=n_words, offset=_HEADER.size)
    tokens, packed, note = _decode_tokens(words)
    layout, ext, blocks = _parse_state(buf, body_start, version)
    return SlotFile(buf, version, layout, words, tokens, packed, note, ext, blocks)


def _check_magic(magic: int, raw: bytes) -> None:
    if magic == MAGIC_GGSQ:
        return
    if magic == MAGIC_GGSN:
        raise SlotFileError(
            "magic 'ggsn' at offset 0: a whole-context session file, not a sequence-state "
            "slot file ('ggsq')",
            0,
        )
    raise SlotFileError(
        f"bad magic 0x{magic:08x} ({raw!r}) at offset 0, expected 0x{MAGIC_GGSQ:08x} "
        f"('ggsq', stored as b'qsgg')",
        0,
    )


def _parse_state(buf: memoryview, start: int, version: int) -> tuple[str, int, list[KVBlock]]:
    if version == 1:
        return _parse_v1_any(buf, start)
    fails: list[tuple[_Layout, _Fail]] = []
    for lay in _candidates(version):
        try:
            blocks = _parse_blocks(buf, start, lay)
        except _Fail as f:
            fails.append((lay, f))
            continue
        return _label(lay, blocks), lay.ext_size, blocks
    raise _no_layout_error(buf, start, version, fails)


def _label(lay: _Layout, blocks: list[KVBlock]) -> str:
    if lay.name != "v2b":
        return lay.name
    # v2a and v2b differ only in what META lists for a single-seq save: 0 ids vs 1 id.
    counts = [s.n_seq_id for b in blocks for s in b.streams if s.n_seq_id is not None]
    if counts and all(len(c) and not c.any() for c in counts):
        return "v2a"
    return "v2b"


def _no_layout_error(
    buf: memoryview, start: int, version: int, fails: list[tuple[_Layout, _Fail]]
) -> SlotFileError:
    what = _diagnose_recurrent(buf, start, version)
    if what:
        return SlotFileError(f"ggsq v{version}: {what}; not token-chunkable", start)
    lay, best = max(fails, key=lambda lf: lf[1].offset)
    tried = ", ".join(lf[0].label for lf in fails)
    return SlotFileError(
        f"ggsq v{version}: no known KV layout parses to the end of the file "
        f"({len(buf)} bytes; tried {tried}); closest was {lay.label}, which failed at "
        f"offset {best.offset}: {best.message}",
        best.offset,
    )


def _diagnose_recurrent(buf: memoryview, start: int, version: int) -> str:
    """Recurrent memory has no n_stream: it reads like a single-stream v2b block."""
    if version < 3:
        return ""  # for version 2 that shape is a genuine KV layout (v2a/v2b)
    rec = _Layout("recurrent", multi_stream=False, empty_has_data=True)
    try:
        _parse_blocks(buf, start, rec, multi_block=False)
        return "body looks like a recurrent (SSM/RWKV) memory state, not an attention KV cache"
    except _Fail:
        pass
    # Hybrid models: attention KV block(s) first, then a recurrent block.
    r = _Reader(buf, start)
    kv = _candidates(version)[0]
    try:
        while r.left:
            _parse_block(r, kv, 0)
            mark = r.pos
            try:
                _parse_blocks(buf, mark, rec, multi_block=False)
                return f"hybrid memory: attention KV block then a recurrent block at offset {mark}"
            except _Fail:
                continue
    except _Fail:
        pass
    return ""


def _parse_blocks(
    buf: memoryview, start: int, lay: _Layout, multi_block: bool = True
) -> list[KVBlock]:
    r = _Reader(buf, start)
    blocks: list[KVBlock] = []
    while True:
        blocks.append(_parse_block(r, lay, len(blocks)))
        if r.pos == r.end:
            return blocks
        # 8 bytes is the smallest possible block (n_stream 1, cell_count 0)
        if not multi_block or len(blocks) >= MAX_BLOCKS or r.left < 8:
            raise _Fail(r.pos, f"{r.left} trailing bytes after KV block {len(blocks) - 1}")


def _parse_block(r: _Reader, lay: _Layout, index: int) -> KVBlock:
    start = r.pos
    n_stream: int | None = None
    if lay.multi_stream:
        n_stream = r.u32(f"block {index} n_stream")
        _check(1 <= n_stream <= MAX_STREAMS, start, f"implausible n_stream {n_stream}")
    streams = [_parse_stream(r, lay, s) for s in range(n_stream or 1)]
    return KVBlock(index, start, r.pos, n_stream, streams)


def _parse_stream(r: _Reader, lay: _Layout, index: int) -> Stream:
    offset = r.pos
    n = r.u32(f"stream {index} cell_count")
    empty = np.zeros(0, dtype=np.int32)
    if n == 0 and not lay.empty_has_data:
        return Stream(index, 0, offset, empty)
    min_meta = 8 + lay.ext_size
    _check(
        n <= r.left // min_meta,
        offset,
        f"stream {index} cell_count {n} cannot fit in the {r.left} bytes left",
    )
    st = Stream(index, n, offset, empty, meta_offset=r.pos)
    st.pos, st.n_seq_id, st.seq_ids, st.ext = _parse_meta(r, n, lay.ext_size)
    st.meta_size = r.pos - st.meta_offset
    _parse_data(r, st, lay)
    return st


_Meta = tuple[np.ndarray, np.ndarray, list[int], np.ndarray | None]


def _parse_meta(r: _Reader, n: int, ext: int) -> _Meta:
    if n == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.uint32), [], None
    start = r.pos
    r.need(8, "META cell 0")
    (k,) = _U32.unpack_from(r.buf, start + 4)
    _check(k <= MAX_SEQ_IDS, start + 4, f"META cell 0: implausible n_seq_id {k}")
    rec = 8 + ext + 4 * k
    if n * rec <= r.left:
        # Fast path: every cell lists the same number of seq ids (always so for a seq save).
        dt = np.dtype({"names": ["p", "k"], "formats": ["<i4", "<u4"], "offsets": [0, 4],
                       "itemsize": rec})  # fmt: skip
        arr = np.frombuffer(r.buf, dtype=dt, count=n, offset=start)
        if bool((arr["k"] == k).all()):
            ids = np.ndarray((n, k), "<i4", r.buf, start + 8 + ext, (rec, 4)) if k else None
            exts = np.ndarray((n, ext), np.uint8, r.buf, start + 8, (rec, 1)) if ext else None
            r.pos += n * rec
            seqs = sorted({int(x) for x in np.unique(ids)}) if ids is not None else []
            return arr["p"].astype(np.int32), arr["k"].astype(np.uint32), seqs, exts
    return _parse_meta_slow(r, n, ext)


def _parse_meta_slow(r: _Reader, n: int, ext: int) -> _Meta:
    pos = np.empty(n, np.int32)
    nseq = np.empty(n, np.uint32)
    exts = np.empty((n, ext), np.uint8) if ext else None
    seqs: set[int] = set()
    for i in range(n):
        pos[i] = r.i32(f"META cell {i} pos")
        k = r.u32(f"META cell {i} n_seq_id")
        _check(k <= MAX_SEQ_IDS, r.pos - 4, f"META cell {i}: implausible n_seq_id {k}")
        nseq[i] = k
        at = r.skip(ext, f"META cell {i} ext")
        if exts is not None:
            exts[i] = np.frombuffer(r.buf, np.uint8, ext, at)
        at = r.skip(4 * k, f"META cell {i} seq ids")
        seqs.update(int(x) for x in np.frombuffer(r.buf, "<i4", k, at))
    return pos, nseq, sorted(seqs), exts


def _parse_data(r: _Reader, st: Stream, lay: _Layout) -> None:
    at = r.pos
    st.v_trans = r.u32("v_trans")
    _check(st.v_trans in (0, 1), at, f"v_trans must be 0 or 1, found {st.v_trans}")
    st.n_layer = r.u32("n_layer")
    _check(1 <= st.n_layer <= MAX_LAYERS, at + 4, f"implausible n_layer {st.n_layer}")
    if lay.rot_fields:
        st.n_rot_k = r.u32("n_rot_k")
        st.n_rot_v = r.u32("n_rot_v")
    n = st.cell_count
    st.k_layers = [_rows_layer(r, n, "K", il, 8) for il in range(st.n_layer)]
    if not lay.v_layers:
        return
    if st.v_trans:
        st.v_layers = [_trans_layer(r, n, il, 4, None) for il in range(st.n_layer)]
    else:
        st.v_layers = [_rows_layer(r, n, "V", il, 8) for il in range(st.n_layer)]


def _layer_type(r: _Reader, kind: str, il: int) -> int:
    at = r.pos
    t = r.i32(f"{kind} layer {il} type")
    _check(0 <= t < MAX_TYPE_ID, at, f"{kind} layer {il}: implausible ggml type {t}")
    return t


def _rows_layer(r: _Reader, n: int, kind: str, il: int, width: int) -> LayerRegion:
    hoff = r.pos
    t = _layer_type(r, kind, il)
    row = r.uint(width, f"{kind} layer {il} row size")
    _check(1 <= row <= MAX_ROW_BYTES, hoff + 4, f"{kind} layer {il}: implausible row size {row}")
    doff = r.skip(n * row, f"{kind} layer {il} data ({n} rows x {row} B)")
    return LayerRegion(kind, il, t, hoff, doff, row, cell_count=n)


def _trans_layer(r: _Reader, n: int, il: int, el_width: int, n_embd: int | None) -> LayerRegion:
    hoff = r.pos
    t = _layer_type(r, "V", il)
    el = r.uint(el_width, f"V layer {il} element size")
    _check(1 <= el <= 8, hoff + 4, f"V layer {il}: implausible transposed element size {el}")
    if n_embd is None:
        n_embd = r.u32(f"V layer {il} n_embd_v_gqa")
        _check(1 <= n_embd <= MAX_N_EMBD, hoff + 8, f"V layer {il}: implausible n_embd {n_embd}")
    doff = r.skip(n * n_embd * el, f"V layer {il} transposed data ({n_embd} x {n} x {el} B)")
    return LayerRegion("V", il, t, hoff, doff, n_embd * el, True, el, n_embd, n)


# v1 (spring 2024): sizeof(size_t), cell_count, n_layer, n_embd_v_gqa, pos[], K, V. No
# v_trans flag on disk, so V is tried as rows, then transposed with a u32 or size_t el size.
_V1_MODES = (("rows", 0), ("trans", 0), ("trans", 4))


def _parse_v1_any(buf: memoryview, start: int) -> tuple[str, int, list[KVBlock]]:
    fails: list[tuple[str, _Fail]] = []
    for mode, el_width in _V1_MODES:
        try:
            return "v1", 0, [_parse_v1(buf, start, mode, el_width)]
        except _Fail as f:
            fails.append((f"v1({mode})", f))
    name, best = max(fails, key=lambda nf: nf[1].offset)
    raise SlotFileError(
        f"ggsq v1: the state does not parse to the end of the file ({len(buf)} bytes); "
        f"closest was {name}, which failed at offset {best.offset}: {best.message}",
        best.offset,
    )


def _parse_v1(buf: memoryview, start: int, mode: str, el_width: int) -> KVBlock:
    r = _Reader(buf, start)
    szt = r.u32("sizeof(size_t)")
    _check(szt in (4, 8), start, f"v1 sizeof(size_t) must be 4 or 8, found {szt}")
    count_off = r.pos
    n = r.u32("cell_count")
    n_layer = r.u32("n_layer")
    _check(1 <= n_layer <= MAX_LAYERS, r.pos - 4, f"implausible n_layer {n_layer}")
    n_embd_v = r.u32("n_embd_v_gqa")
    meta = r.skip(4 * n, f"{n} cell positions")
    st = Stream(0, n, count_off, np.frombuffer(buf, "<i4", n, meta).astype(np.int32), meta, 4 * n)
    st.n_layer = n_layer
    st.v_trans = int(mode == "trans")
    st.k_layers = [_rows_layer(r, n, "K", il, szt) for il in range(n_layer)]
    if mode == "rows":
        st.v_layers = [_rows_layer(r, n, "V", il, szt) for il in range(n_layer)]
    else:
        _check(1 <= n_embd_v <= MAX_N_EMBD, start + 12, f"implausible n_embd_v_gqa {n_embd_v}")
        st.v_layers = [_trans_layer(r, n, il, el_width or szt, n_embd_v) for il in range(n_layer)]
    if r.pos != r.end:
        raise _Fail(r.pos, f"{r.left} trailing bytes after the v1 state")
    return KVBlock(0, start, r.pos, None, [st])


# --------------------------------------------------------------------------- tokens


def _decode_tokens(words: np.ndarray) -> tuple[np.ndarray | None, bool, str]:
    """Token ids from the header words: plain list, or the newer server's packed blob."""
    if len(words) == 0 or int(words[0]) != TOKEN_NULL:
        return words, False, ""
    try:
        return _decode_packed(words), True, ""
    except ValueError as e:
        return None, True, str(e)


def _decode_packed(words: np.ndarray) -> np.ndarray:
    # -1 | u32 version | u32 n_tokens | tokens | u32 n_media | starts | (u32 len + bytes)* | pad
    u = words.view("<u4")
    if len(words) < 4:
        raise ValueError(f"packed token blob of {len(words)} words is too short")
    if int(u[1]) != 1:
        raise ValueError(f"unknown packed token blob version {int(u[1])}")
    n_tok = int(u[2])
    i = 3 + n_tok
    if i >= len(words):
        raise ValueError(f"packed token blob declares {n_tok} tokens, has {len(words) - 3} words")
    n_media = int(u[i])
    off = 4 * (i + 1 + n_media)
    raw = words.tobytes() if n_media else b""
    for m in range(n_media):
        if off + 4 > 4 * len(words):
            raise ValueError(f"packed token blob: media chunk {m} header past the end")
        off += 4 + _U32.unpack_from(raw, off)[0]
    if (off + 3) // 4 != len(words):
        raise ValueError(f"packed token blob: {4 * len(words) - off} unexpected trailing bytes")
    return words[3 : 3 + n_tok]


# --------------------------------------------------------------------------- split / rebuild

_BODY_MAGIC = b"RKSF"
_BODY_VERSION = 1
_MODE_PARSED = 1
_MODE_OPAQUE = 2
_BODY_HEAD = struct.Struct("<4sBBHQQ")  # magic, version, mode, 0, file_size, xxh3-64(file)

_WIN_DTYPE = np.dtype([("window", "<i8"), ("count", "<u4")])
_REGION_DTYPE = np.dtype(
    [
        ("skel_offset", "<u8"),  # where the region's bytes go in the skeleton
        ("stream", "<u4"),  # index into the stream plans
        ("tag", "<u8"),  # tag base (window bits zero)
        ("transposed", "u1"),
        ("row", "<u8"),  # bytes per cell
        ("n_embd", "<u4"),
        ("el", "<u4"),
    ]
)

# Tag bits: block 63-60 | stream 59-50 | layer 49-34 | transposed 33 | V 32 | window 31-0.
_TAG_WINDOW_MASK = 0xFFFFFFFF


def make_tag(block: int, stream: int, layer: int, kind: str, transposed: bool, window: int) -> int:
    """Chunk tag: informational placement of a chunk; identity is its content key."""
    return (
        (block & 0xF) << 60
        | (stream & 0x3FF) << 50
        | (layer & 0xFFFF) << 34
        | int(transposed) << 33
        | int(kind == "V") << 32
        | (window & _TAG_WINDOW_MASK)
    )


def parse_tag(tag: int) -> dict[str, int | str | bool]:
    return {
        "block": tag >> 60 & 0xF,
        "stream": tag >> 50 & 0x3FF,
        "layer": tag >> 34 & 0xFFFF,
        "transposed": bool(tag >> 33 & 1),
        "kind": "V" if tag >> 32 & 1 else "K",
        "window": int(np.int32(np.uint32(tag & _TAG_WINDOW_MASK))),
    }


@dataclass
class _Plan:
    """How one stream's cells map onto position windows."""

    n: int
    order: np.ndarray | None  # stable argsort by pos; None when cells are already in pos order
    windows: np.ndarray  # _WIN_DTYPE: window index and cell count, ascending

    @property
    def bounds(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.windows["count"], dtype=np.int64)))


def _plan(pos: np.ndarray, window: int) -> _Plan:
    n = len(pos)
    ordered = bool((pos[1:] >= pos[:-1]).all())
    order = None if ordered else np.argsort(pos, kind="stable")
    win = pos.astype(np.int64) // window
    if order is not None:
        win = win[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(win)) + 1))
    table = np.empty(len(starts), _WIN_DTYPE)
    table["window"] = win[starts]
    table["count"] = np.diff(np.append(starts, n))
    return _Plan(n, order, table)


def split(slot: SlotFile, window: int) -> tuple[bytes, list[tuple[int, memoryview | bytes]]]:
    """Cut a parsed slot file into (manifest body, [(tag, chunk), ...]).

    One chunk per (block, stream, layer, K|V, window of ``window`` positions), in file
    order; chunks of memoryview type point into ``slot.data``. The body holds the rest.
    """
    if not 1 <= window < 1 << 32:
        raise ValueError(f"window must be in [1, 2**32), got {window}")
    buf = slot.data
    skel: list[memoryview] = []
    skel_len = cursor = 0
    plans: list[_Plan] = []
    regions: list[tuple[int, int, int, int, int, int, int]] = []
    chunks: list[tuple[int, memoryview | bytes]] = []
    for block in slot.blocks:
        for st in block.streams:
            if st.cell_count == 0:
                continue  # zero-row layers stay in the skeleton
            plans.append(_plan(st.pos, window))
            for reg in st.k_layers + st.v_layers:
                skel.append(buf[cursor : reg.data_offset])
                skel_len += reg.data_offset - cursor
                base = make_tag(block.index, st.index, reg.layer, reg.kind, reg.transposed, 0)
                regions.append(
                    (skel_len, len(plans) - 1, base, int(reg.transposed), reg.row_size,
                     reg.n_embd, reg.el_size)
                )  # fmt: skip
                chunks.extend(_cut(buf, reg, plans[-1], base))
                cursor = reg.data_offset + reg.data_size
    skel.append(buf[cursor:])
    skel_len += len(buf) - cursor
    return _encode_body(slot, window, skel, skel_len, plans, regions), chunks


def _cut(
    buf: memoryview, reg: LayerRegion, plan: _Plan, tag_base: int
) -> list[tuple[int, memoryview | bytes]]:
    b = plan.bounds
    tags = [tag_base | (int(w) & _TAG_WINDOW_MASK) for w in plan.windows["window"]]
    if reg.transposed:
        # [n_embd][cell_count] matrix: gather each window's columns so the chunk does not
        # depend on the file's total cell count (the stride).
        mat = np.frombuffer(buf, np.uint8, reg.data_size, reg.data_offset)
        mat = mat.reshape(reg.n_embd, plan.n, reg.el_size)
        if plan.order is not None:
            mat = mat[:, plan.order, :]
        return [(t, mat[:, b[i] : b[i + 1], :].tobytes()) for i, t in enumerate(tags)]
    row, off = reg.row_size, reg.data_offset
    if plan.order is None:
        return [(t, buf[off + b[i] * row : off + b[i + 1] * row]) for i, t in enumerate(tags)]
    rows = np.frombuffer(buf, np.uint8, reg.data_size, off).reshape(plan.n, row)
    flat = memoryview(rows[plan.order].reshape(-1))
    return [(t, flat[b[i] * row : b[i + 1] * row]) for i, t in enumerate(tags)]


def _encode_body(
    slot: SlotFile,
    window: int,
    skel: list[memoryview],
    skel_len: int,
    plans: list[_Plan],
    regions: list[tuple[int, int, int, int, int, int, int]],
) -> bytes:
    layout = slot.layout.encode()
    parts: list[bytes | memoryview] = [struct.pack("<IH", window, len(layout)), layout]
    parts += [_U64.pack(skel_len), *skel, _U32.pack(len(plans))]
    for p in plans:
        parts.append(struct.pack("<IBI", p.n, p.order is None, len(p.windows)))
        if p.order is not None:
            parts.append(p.order.astype("<u4").tobytes())
        parts.append(p.windows.tobytes())
    parts += [_U32.pack(len(regions)), np.array(regions, _REGION_DTYPE).tobytes()]
    payload = zlib.compress(b"".join(parts), 6)
    head = _BODY_HEAD.pack(
        _BODY_MAGIC, _BODY_VERSION, _MODE_PARSED, 0, slot.file_size,
        xxhash.xxh3_64_intdigest(slot.data),
    )  # fmt: skip
    return head + payload


def split_opaque(data: Buffer, error: str = "") -> tuple[bytes, list[tuple[int, Buffer]]]:
    """Whole file as one chunk; the body records that it is opaque and why."""
    head = _BODY_HEAD.pack(
        _BODY_MAGIC, _BODY_VERSION, _MODE_OPAQUE, 0, len(data), xxhash.xxh3_64_intdigest(data)
    )
    return head + error.encode("utf-8", "replace"), ([(0, data)] if len(data) else [])


def split_any(
    data: Buffer, window: int
) -> tuple[bytes, list[tuple[int, Buffer]], str | None]:
    """Never fails on content: parsed chunks, or the whole file opaque plus the parse error."""
    try:
        slot = parse(data)
    except SlotFileError as e:
        body, chunks = split_opaque(data, str(e))
        return body, chunks, str(e)
    body, parsed = split(slot, window)
    return body, list(parsed), None


@dataclass
class _Body:
    mode: int
    file_size: int
    file_hash: int
    error: str = ""
    window: int = 0
    layout: str = ""
    skeleton: bytes = b""
    plans: list[_Plan] = field(default_factory=list)
    regions: np.ndarray | None = None


def describe_body(body: bytes) -> dict[str, Any]:
    """What a manifest body says (for operators): opaque or parsed, sizes, layout."""
    b = _decode_body(body)
    out: dict[str, Any] = {"file_size": b.file_size, "file_xxh3": f"{b.file_hash:016x}"}
    if b.mode == _MODE_OPAQUE:
        return out | {"opaque": True, "error": b.error}
    n_chunks = sum(len(b.plans[int(s)].windows) for s in b.regions["stream"])  # type: ignore[index]
    return out | {"opaque": False, "layout": b.layout, "window": b.window, "n_chunks": n_chunks}


def _decode_body(body: Buffer) -> _Body:
    body = bytes(body)
    if len(body) < _BODY_HEAD.size:
        raise SlotFileError(f"slot-file manifest body too short ({len(body)} bytes)")
    magic, version, mode, _, size, fhash = _BODY_HEAD.unpack_from(body)
    if magic != _BODY_MAGIC or version != _BODY_VERSION:
        raise SlotFileError(f"not a slot-file manifest body (magic {magic!r}, version {version})")
    if mode == _MODE_OPAQUE:
        return _Body(mode, size, fhash, error=body[_BODY_HEAD.size :].decode("utf-8", "replace"))
    if mode != _MODE_PARSED:
        raise SlotFileError(f"slot-file manifest body has unknown mode {mode}")
    try:
        payload = zlib.decompress(body[_BODY_HEAD.size :])
        return _decode_payload(_Body(mode, size, fhash), memoryview(payload))
    except (zlib.error, _Fail, ValueError) as e:
        raise SlotFileError(f"corrupt slot-file manifest body: {e}") from None


def _decode_payload(b: _Body, p: memoryview) -> _Body:
    r = _Reader(p, 0)
    b.window = r.u32("window")
    (n,) = struct.unpack_from("<H", p, r.skip(2, "layout length"))
    at = r.skip(n, "layout")
    b.layout = bytes(p[at : at + n]).decode()
    sk = r.u64("skeleton length")
    at = r.skip(sk, "skeleton")
    b.skeleton = bytes(p[at : at + sk])
    for _ in range(r.u32("stream count")):
        n = r.u32("cells")
        ordered = p[r.skip(1, "order flag")]
        nwin = r.u32("window count")
        order = None
        if not ordered:
            order = np.frombuffer(p, "<u4", n, r.skip(4 * n, "order")).astype(np.int64)
        wins = np.frombuffer(p, _WIN_DTYPE, nwin, r.skip(nwin * _WIN_DTYPE.itemsize, "windows"))
        if int(wins["count"].sum(dtype=np.int64)) != n:
            raise ValueError(f"window counts do not add up to {n} cells")
        b.plans.append(_Plan(n, order, wins))
    nreg = r.u32("region count")
    b.regions = np.frombuffer(p, _REGION_DTYPE, nreg, r.skip(nreg * _REGION_DTYPE.itemsize, "regions"))
    if r.left:
        raise ValueError(f"{r.left} trailing bytes")
    _check_regions(b.regions, len(b.plans))
    return b


def _check_regions(regions: np.ndarray, n_plans: int) -> None:
    trans = regions["transposed"] != 0
    if len(regions) and int(regions["stream"].max()) >= n_plans:
        raise ValueError("a region refers to a stream that is not there")
    if (regions["row"] == 0).any() or (regions["row"] > MAX_ROW_BYTES).any():
        raise ValueError("a region has an invalid row size")
    shape = regions["n_embd"].astype(np.uint64) * regions["el"]
    if (trans & ((regions["el"] == 0) | (shape != regions["row"]))).any():
        raise ValueError("a transposed region's n_embd x element size is not its row size")


def rebuild(body: Buffer, chunks: list[Buffer]) -> bytes:
    """The exact original file bytes from a body made by split/split_opaque and its chunks."""
    b = _decode_body(body)
    if b.mode == _MODE_OPAQUE:
        want = 1 if b.file_size else 0
        if len(chunks) != want:
            raise SlotFileError(f"opaque slot file needs {want} chunk(s), got {len(chunks)}")
        out = bytes(chunks[0]) if want else b""
    else:
        try:
            out = _assemble(b, chunks)
        except SlotFileError:
            raise
        except (ValueError, IndexError) as e:  # a body that passed the checks but does not fit
            raise SlotFileError(f"slot-file manifest body does not fit its chunks: {e}") from None
    if len(out) != b.file_size or xxhash.xxh3_64_intdigest(out) != b.file_hash:
        raise SlotFileError(
            f"rebuilt slot file ({len(out)} bytes) does not match the recorded "
            f"{b.file_size} bytes / xxh3 {b.file_hash:016x}"
        )
    return out


def _assemble(b: _Body, chunks: list[Buffer]) -> bytes:
    assert b.regions is not None
    counts = [len(b.plans[int(s)].windows) for s in b.regions["stream"]]
    if len(chunks) != sum(counts):
        raise SlotFileError(f"slot-file manifest needs {sum(counts)} chunks, got {len(chunks)}")
    out: list[Buffer] = []
    ci = cursor = 0
    for reg, nwin in zip(b.regions, counts, strict=True):
        at = int(reg["skel_offset"])
        if not cursor <= at <= len(b.skeleton):
            raise SlotFileError(f"slot-file manifest body: region offset {at} out of order")
        out.append(b.skeleton[cursor:at])
        out.extend(_region_bytes(reg, b.plans[int(reg["stream"])], chunks[ci : ci + nwin], ci))
        ci += nwin
        cursor = at
    out.append(b.skeleton[cursor:])
    return b"".join(out)


def _region_bytes(reg: np.void, plan: _Plan, parts: list[Buffer], first: int) -> list[Buffer]:
    row = int(reg["row"])
    for i, (part, count) in enumerate(zip(parts, plan.windows["count"], strict=True)):
        if len(memoryview(part).cast("B")) != int(count) * row:
            raise SlotFileError(
                f"chunk {first + i} has {len(memoryview(part).cast('B'))} bytes, expected "
                f"{int(count) * row} ({int(count)} cells x {row} B)"
            )
    if reg["transposed"]:
        n_embd, el = int(reg["n_embd"]), int(reg["el"])
        mats = [np.frombuffer(p, np.uint8).reshape(n_embd, -1, el) for p in parts]
        mat = np.concatenate(mats, axis=1)
        if plan.order is not None:
            mat = _unsort(mat, plan.order, axis=1)
        return [mat.tobytes()]
    if plan.order is None:
        return list(parts)
    rows = np.frombuffer(b"".join(parts), np.uint8).reshape(plan.n, row)
    return [_unsort(rows, plan.order, axis=0).tobytes()]


def _unsort(sorted_arr: np.ndarray, order: np.ndarray, axis: int) -> np.ndarray:
    if len(order) != sorted_arr.shape[axis] or (len(order) and int(order.max()) >= len(order)):
        raise SlotFileError("slot-file manifest body: cell order is not a permutation")
    out = np.empty_like(sorted_arr)
    if axis == 0:
        out[order] = sorted_arr
    else:
        out[:, order, :] = sorted_arr
    return out


# --------------------------------------------------------------------------- inspect


def inspect(slot: SlotFile) -> dict[str, Any]:
    """Operator summary: version, layout, streams, cells, layers, types, tokens."""
    blocks = [_inspect_block(b) for b in slot.blocks]
    first = blocks[0]
    n_tokens = len(slot.tokens) if slot.tokens is not None else None
    return {
        "version": slot.version,
        "layout": slot.layout,
        "file_size": slot.file_size,
        "n_token_words": slot.n_token_words,
        "n_tokens": n_tokens,
        "packed_token_blob": slot.packed_tokens,
        "token_note": slot.token_note,
        "cell_ext_bytes": slot.ext_size,
        "n_blocks": len(blocks),
        "n_stream": first["n_stream"],
        "cells_per_stream": first["cells_per_stream"],
        "n_layer": first["n_layer"],
        "v_trans": first["v_trans"],
        "k_types": first["k_types"],
        "v_types": first["v_types"],
        "blocks": blocks,
    }


def _inspect_block(b: KVBlock) -> dict[str, Any]:
    data = [s for s in b.streams if s.k_layers]
    s0 = data[0] if data else None
    return {
        "n_stream": b.n_stream if b.n_stream is not None else 1,
        "cells_per_stream": [s.cell_count for s in b.streams],
        "seq_ids": sorted({i for s in b.streams for i in s.seq_ids}),
        "n_layer": s0.n_layer if s0 else 0,
        "v_trans": s0.v_trans if s0 else None,
        "n_rot_k": s0.n_rot_k if s0 else None,
        "n_rot_v": s0.n_rot_v if s0 else None,
        "k_types": sorted({r.type_name for r in s0.k_layers}) if s0 else [],
        "v_types": sorted({r.type_name for r in s0.v_layers}) if s0 else [],
        "k_row_sizes": [r.row_size for r in s0.k_layers] if s0 else [],
        "v_row_sizes": [r.row_size for r in s0.v_layers] if s0 else [],
        "v_el_size": [r.el_size for r in s0.v_layers if r.transposed] if s0 else [],
        "v_n_embd": [r.n_embd for r in s0.v_layers if r.transposed] if s0 else [],
        "bytes": b.end - b.offset,
    }


def format_inspect(info: dict[str, Any]) -> str:
    """Human-readable lines for `rdmakv slotfile inspect`."""
    lines = [
        f"ggsq version {info['version']} ({info['layout']}), {info['file_size']} bytes",
        f"tokens: {info['n_tokens']} in {info['n_token_words']} words"
        + (" (packed server blob)" if info["packed_token_blob"] else "")
        + (f" [{info['token_note']}]" if info["token_note"] else ""),
    ]
    for i, b in enumerate(info["blocks"]):
        lines.append(
            f"block {i}: n_stream {b['n_stream']}, cells {b['cells_per_stream']}, "
            f"n_layer {b['n_layer']}, v_trans {b['v_trans']}, "
            f"K {','.join(b['k_types'])} rows {sorted(set(b['k_row_sizes']))} B, "
            f"V {','.join(b['v_types']) or '-'} "
            + (f"el {sorted(set(b['v_el_size']))} B x n_embd {sorted(set(b['v_n_embd']))}"
               if b["v_trans"] else f"rows {sorted(set(b['v_row_sizes']))} B")
            + (f", n_rot_k {b['n_rot_k']} n_rot_v {b['n_rot_v']}" if b["n_rot_k"] is not None
               else "")
        )  # fmt: skip
    if info["cell_ext_bytes"]:
        lines.append(f"cell ext: {info['cell_ext_bytes']} bytes per cell")
    return "\n".join(lines)


def load(path: str | Path) -> SlotFile:
    """Read and parse a slot file from disk (CLI helper)."""
    return parse(Path(path).read_bytes())


# --------------------------------------------------------------------------- filenames

_FORBIDDEN_CHARS = set(':*?"<>|/\\')
_LOOKALIKES = {0xFF0E: "U+FF0E (fullwidth full stop)", 0x2215: "U+2215 (division slash)",
               0x2216: "U+2216 (set minus)", 0xFFFD: "U+FFFD (replacement character)",
               0xFEFF: "U+FEFF (byte order mark)"}  # fmt: skip


def validate_filename(name: str | bytes) -> None:
    """llama-server's fs_validate_filename for slot files (no subdirectories).

    Raises ValueError naming the first rule the name breaks.
    """
    if isinstance(name, bytes):
        try:
            name = name.decode("utf-8", "strict")
        except UnicodeDecodeError as e:
            raise ValueError(f"filename is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not name:
        raise ValueError("filename is empty")
    try:
        n_bytes = len(name.encode("utf-8", "strict"))
    except UnicodeEncodeError:
        raise ValueError("filename contains a surrogate code point (invalid UTF-8)") from None
    if n_bytes > 255:
        raise ValueError(f"filename is {n_bytes} bytes long, the limit is 255")
    for ch in name:
        _check_code_point(ch)
    if name[0] == " " or name[-1] == " ":
        raise ValueError("filename has a leading or trailing space")
    if ".." in name:
        raise ValueError("filename contains '..'")
    if name[-1] == ".":
        raise ValueError("filename ends with '.'")
    if name == ".":
        raise ValueError("filename is '.'")


def _check_code_point(ch: str) -> None:
    c = ord(ch)
    if c <= 0x1F or c == 0x7F or 0x80 <= c <= 0x9F:
        raise ValueError(f"filename contains control character U+{c:04X}")
    if c in _LOOKALIKES:
        raise ValueError(f"filename contains {_LOOKALIKES[c]}")
    if 0xD800 <= c <= 0xDFFF:
        raise ValueError(f"filename contains surrogate U+{c:04X}")
    if ch in _FORBIDDEN_CHARS:
        what = "a path separator" if ch in "/\\" else "a forbidden character"
        raise ValueError(f"filename contains {what} {ch!r}")
