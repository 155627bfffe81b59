"""An independent writer of synthetic llama.cpp slot files, for the slot-file codec tests."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np

from rdmakv.hashing import chunk_key
from rdmakv.llama import slotfile
from rdmakv.wire import manifest

MAGIC = 0x67677371
VERSIONS = {"v1": 1, "v2a": 2, "v2b": 2, "v2c": 2, "v2d": 2, "v3": 3, "v4": 4}
EXT_SIZE = {"v2d": 8, "v3": 12, "v4": 12}


# --------------------------------------------------------------------------- writer
# Written straight from the format notes, sequentially with struct.pack, sharing no
# code with the parser.


@dataclass
class Cell:
    pos: int
    content: str  # what the K/V bytes of this cell derive from (e.g. the token prefix)
    seq: int = 0
    ext: bytes = b""
    seqs: tuple[int, ...] = ()  # whole-cache saves list every seq of the cell


@dataclass
class Layer:
    k_type: int = 1
    k_row: int = 64
    v_type: int = 1
    v_row: int = 64  # non-transposed V row; transposed: v_el * n_embd
    v_el: int = 2


@dataclass
class Block:
    streams: list[list[Cell]]
    layers: list[Layer] = field(default_factory=lambda: [Layer(), Layer()])
    v_trans: bool = False
    n_rot: tuple[int, int] = (0, 0)
    has_v: bool = True


def cell_bytes(block: int, layer: int, kind: str, cell: Cell, n: int) -> bytes:
    seed = hashlib.blake2b(f"{block}/{layer}/{kind}/{cell.pos}/{cell.content}".encode(), digest_size=8)
    return np.random.default_rng(int.from_bytes(seed.digest(), "little")).bytes(n)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def i32(v: int) -> bytes:
    return struct.pack("<i", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def write_layers(bi: int, blk: Block, cells: list[Cell], v1: bool = False, v1_el: int = 4) -> bytes:
    out = []
    sz = u64  # size_t on x86_64
    for il, ly in enumerate(blk.layers):
        out += [i32(ly.k_type), sz(ly.k_row)]
        out += [cell_bytes(bi, il, "K", c, ly.k_row) for c in cells]
    if not blk.has_v:
        return b"".join(out)
    for il, ly in enumerate(blk.layers):
        vecs = [cell_bytes(bi, il, "V", c, ly.v_row) for c in cells]
        if not blk.v_trans:
            out += [i32(ly.v_type), sz(ly.v_row), *vecs]
            continue
        n_embd = ly.v_row // ly.v_el
        el_field = u32(ly.v_el) if v1_el == 4 else u64(ly.v_el)
        if not v1:  # v2+: u32 el size and per-layer n_embd_v_gqa
            out += [i32(ly.v_type), u32(ly.v_el), u32(n_embd)]
        else:
            out += [i32(ly.v_type), el_field]
        for j in range(n_embd):  # dimension-major: j-th element of every cell
            out += [v[j * ly.v_el : (j + 1) * ly.v_el] for v in vecs]
    return b"".join(out)


def write_data(bi: int, blk: Block, cells: list[Cell], layout: str) -> bytes:
    head = u32(int(blk.v_trans)) + u32(len(blk.layers))
    if layout == "v4":
        head += u32(blk.n_rot[0]) + u32(blk.n_rot[1])
    return head + write_layers(bi, blk, cells)


def write_meta(cells: list[Cell], layout: str) -> bytes:
    out = []
    for c in cells:
        if layout == "v2a":
            out.append(i32(c.pos) + u32(0))
        else:
            ext = c.ext if layout in EXT_SIZE else b""
            ids = c.seqs or (c.seq,)
            out.append(i32(c.pos) + u32(len(ids)) + ext + b"".join(i32(s) for s in ids))
    return b"".join(out)


def write_slot(layout: str, words: list[int], blocks: list[Block], v1_el: int = 4) -> bytes:
    out = [struct.pack("<III", MAGIC, VERSIONS[layout], len(words)), struct.pack(f"<{len(words)}i", *words)]
    if layout == "v1":
        (blk,) = blocks
        (cells,) = blk.streams
        n_embd = blk.layers[0].v_row // blk.layers[0].v_el
        out += [u32(8), u32(len(cells)), u32(len(blk.layers)), u32(n_embd)]
        out += [i32(c.pos) for c in cells]
        out.append(write_layers(0, blk, cells, v1=True, v1_el=v1_el))
        return b"".join(out)
    for bi, blk in enumerate(blocks):
        if layout in ("v2a", "v2b"):
            (cells,) = blk.streams
            out += [u32(len(cells)), write_meta(cells, layout), write_data(bi, blk, cells, layout)]
            continue
        out.append(u32(len(blk.streams)))
        for cells in blk.streams:
            out.append(u32(len(cells)))
            if cells:
                out += [write_meta(cells, layout), write_data(bi, blk, cells, layout)]
    return b"".join(out)


def packed_blob(tokens: list[int], media: list[tuple[int, bytes]] = ()) -> list[int]:
    raw = struct.pack("<iII", -1, 1, len(tokens)) + struct.pack(f"<{len(tokens)}i", *tokens)
    raw += u32(len(media)) + b"".join(u32(start) for start, _ in media)
    raw += b"".join(u32(len(blob)) + blob for _, blob in media)
    raw += b"\0" * (-len(raw) % 4)
    return list(struct.unpack(f"<{len(raw) // 4}i", raw))


def prompt_cells(tokens: list[int], seq: int = 0, ext: bool = False) -> list[Cell]:
    # K/V of position p depend on the whole prefix up to p (causal attention)
    cells = []
    for p in range(len(tokens)):
        e = struct.pack("<iii", p, p + 1, tokens[p]) if ext else b""
        cells.append(Cell(p, ",".join(map(str, tokens[: p + 1])), seq, e))
    return cells


def fix_ext(layout: str, cells: list[Cell]) -> list[Cell]:
    size = EXT_SIZE.get(layout, 0)
    for c in cells:
        c.ext = c.ext[:size] if c.ext else b""
    return cells


def roundtrip(data: bytes, window: int) -> tuple[slotfile.SlotFile, bytes, list]:
    slot = slotfile.parse(data)
    body, chunks = slotfile.split(slot, window)
    assert slotfile.rebuild(body, [c for _, c in chunks]) == data
    # and through the manifest container, as the store would keep it
    m = manifest.Manifest(
        manifest.KIND_SLOTFILE,
        body,
        np.array([chunk_key(c) for _, c in chunks], np.uint64),
        np.array([len(c) for _, c in chunks], np.uint32),
        np.array([t for t, _ in chunks], np.uint64),
    )
    m2 = manifest.decode(manifest.encode(m))
    assert slotfile.rebuild(m2.body, [bytes(c) for _, c in chunks]) == data
    return slot, body, chunks


def keys(chunks: list) -> list[int]:
    return [chunk_key(c) for _, c in chunks]


TOKENS = list(range(10, 60))


TOKENS = list(range(10, 60))
