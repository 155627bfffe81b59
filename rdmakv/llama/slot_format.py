"""The slot-file model shared by every version's parser: limits, errors, the parsed structure
(blocks, streams, layer regions) and a bounds-checked reader.

Format facts: ``docs/llama-slot-format.md``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

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
MAX_BODY_PAYLOAD = 256 << 20  # a slot manifest body's inflated payload (skeleton, cell order, tables)

GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0", 42: "Q2_0",
}  # fmt: skip

U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
U64 = struct.Struct("<Q")
HEADER = struct.Struct("<III")

Buffer = bytes | bytearray | memoryview


def ggml_type_name(type_id: int) -> str:
    return GGML_TYPE_NAMES.get(type_id, f"type{type_id}")


class SlotFileError(CodecError):
    """Bytes that are not a slot file this codec can chunk (or a bad manifest body)."""

    code = 27

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


class SlotFormatFail(Exception):
    """A candidate layout does not fit; carries where and why."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message


class SlotReader:
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
            raise SlotFormatFail(self.pos, f"{what}: needs {n} bytes, only {self.left} left")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def i32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def uint(self, width: int, what: str) -> int:
        return self.u64(what) if width == 8 else self.u32(what)

    def skip(self, n: int, what: str) -> int:
        self.need(n, what)
        start = self.pos
        self.pos += n
        return start


def expect(cond: bool, offset: int, message: str) -> None:
    if not cond:
        raise SlotFormatFail(offset, message)


# --------------------------------------------------------------------------- layer regions (every version)


def _layer_type(r: SlotReader, kind: str, il: int) -> int:
    at = r.pos
    t = r.i32(f"{kind} layer {il} type")
    expect(0 <= t < MAX_TYPE_ID, at, f"{kind} layer {il}: implausible ggml type {t}")
    return t


def rows_layer(r: SlotReader, n: int, kind: str, il: int, width: int) -> LayerRegion:
    hoff = r.pos
    t = _layer_type(r, kind, il)
    row = r.uint(width, f"{kind} layer {il} row size")
    expect(1 <= row <= MAX_ROW_BYTES, hoff + 4, f"{kind} layer {il}: implausible row size {row}")
    doff = r.skip(n * row, f"{kind} layer {il} data ({n} rows x {row} B)")
    return LayerRegion(kind, il, t, hoff, doff, row, cell_count=n)


def trans_layer(r: SlotReader, n: int, il: int, el_width: int, n_embd: int | None) -> LayerRegion:
    hoff = r.pos
    t = _layer_type(r, "V", il)
    el = r.uint(el_width, f"V layer {il} element size")
    expect(1 <= el <= 8, hoff + 4, f"V layer {il}: implausible transposed element size {el}")
    if n_embd is None:
        n_embd = r.u32(f"V layer {il} n_embd_v_gqa")
        expect(1 <= n_embd <= MAX_N_EMBD, hoff + 8, f"V layer {il}: implausible n_embd {n_embd}")
    doff = r.skip(n * n_embd * el, f"V layer {il} transposed data ({n_embd} x {n} x {el} B)")
    return LayerRegion("V", il, t, hoff, doff, n_embd * el, True, el, n_embd, n)
