"""Slot-file codec on synthetic files from an independent writer (every known layout)."""

from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdmakv.errors import CodecError
from rdmakv.hashing import chunk_key
from rdmakv.llama import slotfile
from rdmakv.llama.slotfile import SlotFileError
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


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", list(VERSIONS))
@pytest.mark.parametrize("v_trans", [False, True])
def test_every_layout_roundtrips(layout: str, v_trans: bool) -> None:
    cells = fix_ext(layout, prompt_cells(TOKENS, seq=0, ext=True))
    data = write_slot(layout, TOKENS, [Block([cells], v_trans=v_trans)])
    slot, body, chunks = roundtrip(data, 16)
    info = slotfile.inspect(slot)
    assert info["layout"] == layout
    assert info["version"] == VERSIONS[layout]
    assert info["cells_per_stream"] == [50]
    assert info["v_trans"] == int(v_trans)
    assert info["n_layer"] == 2
    assert info["k_types"] == ["F16"]
    assert info["n_tokens"] == 50 and not info["packed_token_blob"]
    assert info["cell_ext_bytes"] == EXT_SIZE.get(layout, 0)
    st0 = slot.blocks[0].streams[0]
    assert (st0.pos == np.arange(50)).all()
    if layout in EXT_SIZE:
        want = struct.pack("<iii", 3, 4, TOKENS[3])[: EXT_SIZE[layout]]
        assert st0.ext is not None and bytes(st0.ext[3]) == want
    # 4 windows (16,16,16,2) x 2 layers x K,V
    assert len(chunks) == 4 * 2 * 2
    assert slotfile.format_inspect(info).startswith(f"ggsq version {VERSIONS[layout]} ({layout})")


def test_v1_with_size_t_element_size() -> None:
    data = write_slot("v1", TOKENS, [Block([prompt_cells(TOKENS)], v_trans=True)], v1_el=8)
    slot, _, _ = roundtrip(data, 16)
    assert slot.blocks[0].streams[0].v_trans == 1
    assert slot.blocks[0].streams[0].v_layers[0].el_size == 2


@pytest.mark.parametrize("layout", ["v2c", "v2d", "v3", "v4"])
@pytest.mark.parametrize("v_trans", [False, True])
def test_three_streams_with_empty_ones(layout: str, v_trans: bool) -> None:
    cells = fix_ext(layout, prompt_cells(TOKENS[:20], seq=1, ext=True))
    data = write_slot(layout, TOKENS[:20], [Block([[], cells, []], v_trans=v_trans)])
    slot, _, chunks = roundtrip(data, 8)
    info = slotfile.inspect(slot)
    assert info["n_stream"] == 3
    assert info["cells_per_stream"] == [0, 20, 0]
    assert info["blocks"][0]["seq_ids"] == [1]
    assert {slotfile.parse_tag(t)["stream"] for t, _ in chunks} == {1}


def test_two_non_empty_streams() -> None:
    # whole-cache style: several streams with data
    a = prompt_cells(TOKENS[:12], seq=0)
    b = prompt_cells(TOKENS[5:30], seq=2)
    data = write_slot("v3", TOKENS, [Block([a, [], b])])
    slot, _, chunks = roundtrip(data, 4)
    assert slotfile.inspect(slot)["cells_per_stream"] == [12, 0, 25]
    assert len(chunks) == (3 + 7) * 2 * 2


@pytest.mark.parametrize("layout", ["v2b", "v3", "v4"])
def test_quantized_rows(layout: str) -> None:
    q8 = Layer(k_type=8, k_row=68, v_type=8, v_row=68)  # q8_0: 34-byte blocks of 32
    q4 = Layer(k_type=2, k_row=36, v_type=2, v_row=36)  # q4_0: 18-byte blocks
    blk = Block([prompt_cells(TOKENS)], layers=[q8, q4, Layer()], n_rot=(64, 64))
    slot, _, _ = roundtrip(write_slot(layout, TOKENS, [blk]), 16)
    info = slotfile.inspect(slot)
    assert info["k_types"] == ["F16", "Q4_0", "Q8_0"]
    assert info["blocks"][0]["k_row_sizes"] == [68, 36, 64]
    if layout == "v4":
        assert (info["blocks"][0]["n_rot_k"], info["blocks"][0]["n_rot_v"]) == (64, 64)


def test_per_layer_sizes_differ() -> None:
    layers = [Layer(k_row=32, v_row=48, v_el=4), Layer(k_row=128, v_row=16, v_el=2)]
    for v_trans in (False, True):
        blk = Block([prompt_cells(TOKENS)], layers=layers, v_trans=v_trans)
        slot, _, _ = roundtrip(write_slot("v3", TOKENS, [blk]), 7)
        if v_trans:
            assert [r.n_embd for r in slot.blocks[0].streams[0].v_layers] == [12, 8]


def test_packed_server_token_blob() -> None:
    words = packed_blob(TOKENS, [(3, b"image-chunk-bytes")])
    data = write_slot("v4", words, [Block([prompt_cells(TOKENS)])])
    slot, _, _ = roundtrip(data, 16)
    info = slotfile.inspect(slot)
    assert info["packed_token_blob"] is True
    assert info["n_tokens"] == 50
    assert info["n_token_words"] == len(words)
    assert list(slot.tokens) == TOKENS
    assert list(slot.token_words) == words  # verbatim


def test_packed_blob_of_unknown_version_still_chunks() -> None:
    words = [-1, 7, 3, 1, 2, 3]
    slot, _, _ = roundtrip(write_slot("v3", words, [Block([prompt_cells([1, 2, 3])])]), 2)
    assert slot.packed_tokens and slot.tokens is None
    assert "version 7" in slot.token_note


@pytest.mark.parametrize("layout", ["v2b", "v2c", "v3", "v4"])
def test_iswa_two_blocks(layout: str) -> None:
    cells = prompt_cells(TOKENS)
    base = Block([cells], layers=[Layer(), Layer(k_row=32, v_row=32)])
    swa = Block([cells[-8:]], layers=[Layer(k_type=0, k_row=128, v_type=0, v_row=128, v_el=4)], v_trans=True)
    slot, _, chunks = roundtrip(write_slot(layout, TOKENS, [base, swa]), 16)
    info = slotfile.inspect(slot)
    assert info["n_blocks"] == 2
    assert [b["n_layer"] for b in info["blocks"]] == [2, 1]
    assert info["blocks"][1]["cells_per_stream"] == [8]
    assert info["blocks"][1]["k_types"] == ["F32"]
    assert {slotfile.parse_tag(t)["block"] for t, _ in chunks} == {0, 1}


def test_cache_without_v_tensors() -> None:
    blk = Block([prompt_cells(TOKENS)], has_v=False)
    slot, _, chunks = roundtrip(write_slot("v3", TOKENS, [blk]), 16)
    assert slot.blocks[0].streams[0].v_layers == []
    assert {slotfile.parse_tag(t)["kind"] for t, _ in chunks} == {"K"}


@pytest.mark.parametrize("v_trans", [False, True])
def test_cell_order_differs_from_pos_order(v_trans: bool) -> None:
    cells = prompt_cells(TOKENS)
    shuffled = [cells[i] for i in np.random.default_rng(1).permutation(len(cells))]
    a = write_slot("v3", TOKENS, [Block([cells], v_trans=v_trans)])
    b = write_slot("v3", TOKENS, [Block([shuffled], v_trans=v_trans)])
    assert a != b
    _, _, ca = roundtrip(a, 16)
    _, _, cb = roundtrip(b, 16)
    # windows are keyed by pos and rows sorted by pos, so the chunks are the same
    assert keys(ca) == keys(cb)


def test_duplicate_positions_keep_cell_order() -> None:
    # M-RoPE image tokens can share a temporal position
    cells = [Cell(p // 3, f"c{p}") for p in range(30)][::-1]
    data = write_slot("v3", list(range(30)), [Block([cells], v_trans=True)])
    roundtrip(data, 4)


def test_negative_positions_and_v2a_label() -> None:
    cells = [Cell(p, f"c{p}") for p in range(-5, 5)]
    slot, _, chunks = roundtrip(write_slot("v2a", list(range(10)), [Block([cells])]), 4)
    assert slot.layout == "v2a"
    assert sorted({slotfile.parse_tag(t)["window"] for t, _ in chunks}) == [-2, -1, 0, 1]


def test_empty_slot_file_like_a_missing_slot() -> None:
    # what a newer server writes for a slot id that holds nothing: 36 bytes
    data = write_slot("v4", packed_blob([]), [Block([[]])])
    assert len(data) == 36
    slot, body, chunks = roundtrip(data, 16)
    assert chunks == [] and slotfile.inspect(slot)["cells_per_stream"] == [0]


def test_v2b_empty_cache_still_writes_layer_headers() -> None:
    slot, _, chunks = roundtrip(write_slot("v2b", [], [Block([[]])]), 16)
    assert chunks == [] and slot.layout == "v2b"


def test_cells_with_varying_seq_id_counts() -> None:
    # a whole-cache save: cells shared by several sequences list all of them
    cells = [Cell(p, f"c{p}", seqs=tuple(range(1 + p % 3)), ext=bytes(12)) for p in range(20)]
    slot, _, _ = roundtrip(write_slot("v3", list(range(20)), [Block([cells])]), 8)
    st0 = slot.blocks[0].streams[0]
    assert st0.seq_ids == [0, 1, 2] and list(st0.n_seq_id[:4]) == [1, 2, 3, 1]
    assert st0.ext is not None and st0.ext.shape == (20, 12)


def test_tags_roundtrip() -> None:
    for args in [(0, 0, 0, "K", False, 0), (15, 1023, 65535, "V", True, -3), (2, 5, 7, "V", False, 123456)]:
        t = slotfile.make_tag(*args)
        d = slotfile.parse_tag(t)
        assert (d["block"], d["stream"], d["layer"], d["kind"], d["transposed"], d["window"]) == args


# --------------------------------------------------------------------------- dedup


@pytest.mark.parametrize("layout", ["v2c", "v3", "v4"])
@pytest.mark.parametrize("v_trans", [False, True])
def test_shared_prefix_dedups_full_windows(layout: str, v_trans: bool) -> None:
    w = 16
    prefix = list(range(100, 100 + 2 * w + 5))  # 2 full windows + a partial one
    p1, p2 = prefix + [1, 2, 3, 4, 5, 6, 7], prefix + [9] * 20
    f1 = write_slot(layout, p1, [Block([prompt_cells(p1, seq=0)], v_trans=v_trans)])
    # other slot, other stream of a 3-stream server, longer prompt: the body differs,
    # the full windows of the shared prefix do not
    f2 = write_slot(layout, p2, [Block([[], [], prompt_cells(p2, seq=2)], v_trans=v_trans)])
    _, b1, c1 = roundtrip(f1, w)
    _, b2, c2 = roundtrip(f2, w)
    shared = set(keys(c1)) & set(keys(c2))
    assert len(shared) == 2 * 2 * 2  # 2 full windows x 2 layers x K,V
    tags = {slotfile.parse_tag(t)["window"] for t, c in c1 if chunk_key(c) in shared}
    assert tags == {0, 1}


def test_transposed_chunks_independent_of_cell_count() -> None:
    cells = prompt_cells(TOKENS)
    short = write_slot("v3", TOKENS[:20], [Block([cells[:20]], v_trans=True)])
    long = write_slot("v3", TOKENS, [Block([cells], v_trans=True)])
    _, _, cs = roundtrip(short, 10)
    _, _, cl = roundtrip(long, 10)
    assert set(keys(cs)) <= set(keys(cl))


# --------------------------------------------------------------------------- property


@st.composite
def slot_specs(draw: st.DrawFn) -> tuple[str, bytes, int]:
    layout = draw(st.sampled_from(list(VERSIONS)))
    multi = layout in ("v2c", "v2d", "v3", "v4")
    n_blocks = 1 if layout == "v1" else draw(st.integers(1, 2))
    blocks = []
    for _ in range(n_blocks):
        n_stream = draw(st.integers(1, 3)) if multi else 1
        streams = []
        for _ in range(n_stream):
            n = draw(st.integers(0 if multi else 1, 40))
            pos = draw(st.permutations(range(n))) if draw(st.booleans()) else list(range(n))
            ext = EXT_SIZE.get(layout, 0)
            streams.append([Cell(p, f"x{p}", 0, bytes(range(ext))) for p in pos])
        el = draw(st.sampled_from([1, 2, 4]))
        layers = [
            Layer(
                k_type=draw(st.sampled_from([0, 1, 8, 30])),
                k_row=draw(st.integers(1, 40)),
                v_type=1,
                v_row=el * draw(st.integers(1, 12)),
                v_el=el,
            )
            for _ in range(draw(st.integers(1, 3)))
        ]
        if layout == "v1":  # n_embd_v_gqa is global in v1
            for ly in layers:
                ly.v_row = layers[0].v_row
        blocks.append(Block(streams, layers, v_trans=draw(st.booleans()), n_rot=(1, 2)))
    words = draw(st.lists(st.integers(0, 1000), max_size=20))
    return layout, write_slot(layout, words, blocks), draw(st.integers(1, 17))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slot_specs())
def test_property_roundtrip(spec: tuple[str, bytes, int]) -> None:
    layout, data, window = spec
    slot, _, chunks = roundtrip(data, window)
    assert slot.version == VERSIONS[layout]
    assert sum(len(c) for _, c in chunks) <= len(data)
    body, chunks2, err = slotfile.split_any(data, window)
    assert err is None and slotfile.rebuild(body, [c for _, c in chunks2]) == data


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 9))
def test_property_split_any_never_fails(data: bytes, window: int) -> None:
    body, chunks, _ = slotfile.split_any(data, window)
    assert slotfile.rebuild(body, [c for _, c in chunks]) == data


# --------------------------------------------------------------------------- errors

GOOD = write_slot("v3", TOKENS, [Block([[], prompt_cells(TOKENS, seq=1)], v_trans=True)])


def expect_error(data: bytes, *needles: str) -> SlotFileError:
    with pytest.raises(SlotFileError) as ei:
        slotfile.parse(data)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    assert isinstance(ei.value, CodecError)
    body, chunks, err = slotfile.split_any(data, 8)
    assert err == msg and len(chunks) == (1 if data else 0)
    assert slotfile.rebuild(body, [c for _, c in chunks]) == data
    assert slotfile.describe_body(body) == {
        "file_size": len(data),
        "file_xxh3": slotfile.describe_body(body)["file_xxh3"],
        "opaque": True,
        "error": msg,
    }
    return ei.value


@pytest.mark.parametrize("cut", [0, 5, 11, 12, 100, 200, len(GOOD) // 2, len(GOOD) - 1])
def test_truncated(cut: int) -> None:
    expect_error(GOOD[:cut])


def test_truncated_message_names_offset() -> None:
    e = expect_error(GOOD[:-1], "ggsq v3", "offset")
    assert e.offset is not None and e.offset > 12


def test_extended_by_one_byte() -> None:
    expect_error(GOOD + b"\0", "trailing")


def test_wrong_magic() -> None:
    expect_error(b"GGUF" + GOOD[4:], "bad magic", "offset 0")


def test_session_file_magic() -> None:
    expect_error(struct.pack("<I", 0x6767736E) + GOOD[4:], "'ggsn'")


def test_unknown_version() -> None:
    expect_error(GOOD[:4] + u32(5) + GOOD[8:], "unsupported ggsq version 5", "offset 4")


def test_token_count_beyond_file() -> None:
    expect_error(GOOD[:8] + u32(10**6) + GOOD[12:], "token words")


def test_header_only() -> None:
    expect_error(struct.pack("<III", MAGIC, 3, 2) + i32(1) + i32(2), "no KV state")


def write_recurrent(tokens: list[int]) -> bytes:
    # recurrent memory: cell_count, META, s_trans, n_layer, r rows per layer, s rows per layer
    out = [u32(1), i32(len(tokens) - 1) + u32(1) + i32(0), u32(0), u32(2)]
    for _ in range(2):
        out += [i32(0), u64(96), b"\x11" * 96]
    for _ in range(2):
        out += [i32(0), u64(512), b"\x22" * 512]
    return b"".join(out)


def test_recurrent_body() -> None:
    hdr = struct.pack("<III", MAGIC, 3, len(TOKENS)) + struct.pack(f"<{len(TOKENS)}i", *TOKENS)
    expect_error(hdr + write_recurrent(TOKENS), "recurrent")


def test_hybrid_body() -> None:
    kv = write_slot("v3", TOKENS, [Block([prompt_cells(TOKENS)])])
    expect_error(kv + write_recurrent(TOKENS), "hybrid")


def test_garbage_body() -> None:
    hdr = struct.pack("<III", MAGIC, 4, 1) + i32(7)
    e = expect_error(hdr + bytes(range(256)) * 3, "no known KV layout", "tried v4")
    assert e.offset is not None


# --------------------------------------------------------------------------- rebuild checks


def test_rebuild_rejects_bad_inputs() -> None:
    slot = slotfile.parse(GOOD)
    body, chunks = slotfile.split(slot, 16)
    parts = [bytes(c) for _, c in chunks]
    with pytest.raises(SlotFileError, match="needs 16 chunks, got 15"):
        slotfile.rebuild(body, parts[:-1])
    with pytest.raises(SlotFileError, match="expected"):
        slotfile.rebuild(body, parts[:3] + [parts[3] + b"x"] + parts[4:])
    with pytest.raises(SlotFileError, match="does not match"):
        slotfile.rebuild(body, [parts[1], parts[0], *parts[2:]])
    with pytest.raises(SlotFileError, match="corrupt"):
        slotfile.rebuild(body[:-5], parts)
    with pytest.raises(SlotFileError, match="not a slot-file manifest body"):
        slotfile.rebuild(b"XXXX" + body[4:], parts)
    with pytest.raises(SlotFileError, match="too short"):
        slotfile.rebuild(b"", parts)
    obody, _ = slotfile.split_opaque(GOOD, "why")
    with pytest.raises(SlotFileError, match="opaque slot file needs 1"):
        slotfile.rebuild(obody, [])
    with pytest.raises(ValueError):
        slotfile.split(slot, 0)


def test_corrupt_body_payload_raises_only_slotfileerror() -> None:
    # mutate the (decompressed) body and re-wrap it: rebuild must fail cleanly or be exact
    import random
    import zlib

    head_size = 4 + 1 + 1 + 2 + 8 + 8
    rng = random.Random(7)
    shuffled = prompt_cells(TOKENS)[::-1]
    for data in (GOOD, write_slot("v3", TOKENS, [Block([shuffled], v_trans=True)])):
        body, chunks = slotfile.split(slotfile.parse(data), 8)
        parts = [bytes(c) for _, c in chunks]
        payload = zlib.decompress(body[head_size:])
        for _ in range(300):
            bad = bytearray(payload)
            for _ in range(rng.randint(1, 3)):
                bad[rng.randrange(len(bad))] = rng.randrange(256)
            try:
                assert slotfile.rebuild(body[:head_size] + zlib.compress(bytes(bad)), parts) == data
            except SlotFileError:
                pass


def test_body_is_small_and_described() -> None:
    slot = slotfile.parse(GOOD)
    body, chunks = slotfile.split(slot, 16)
    info = slotfile.describe_body(body)
    assert info["opaque"] is False and info["layout"] == "v3" and info["n_chunks"] == len(chunks)
    assert len(body) < 0.1 * len(GOOD)


def test_sixteen_k_cells_split_fast() -> None:
    n = 16384
    tokens = list(range(n))
    # built with numpy (the test writer is too slow for this size): v3, 1 stream,
    # 4 layers, F16 K rows of 256 B, transposed V (128 x 2 B)
    meta = np.zeros(n, dtype=[("pos", "<i4"), ("k", "<u4"), ("s", "<i4")])
    meta["pos"], meta["k"] = np.arange(n), 1
    rng = np.random.default_rng(0)
    parts = [struct.pack("<III", MAGIC, 3, n), np.arange(n, dtype="<i4").tobytes(), u32(1), u32(n)]
    parts += [meta.tobytes(), u32(1), u32(4)]
    for _ in range(4):
        parts += [i32(1), u64(256), rng.bytes(n * 256)]
    for _ in range(4):
        parts += [i32(1), u32(2), u32(128), rng.bytes(n * 256)]
    data = b"".join(parts)
    t0 = time.perf_counter()
    body, chunks = slotfile.split(slotfile.parse(data), 256)
    split_s = time.perf_counter() - t0
    assert slotfile.rebuild(body, [c for _, c in chunks]) == data
    assert len(chunks) == 64 * 8 and len(tokens) == n
    assert split_s < 1.0, f"split of a {len(data) >> 20} MiB 16k-cell file took {split_s:.2f}s"


# --------------------------------------------------------------------------- filenames


@pytest.mark.parametrize(
    "name",
    ["slot.bin", ".hidden", "a b", "ünïcödé-名前.bin", "x" * 255, "a.b.c", "-", "日" * 85],
)
def test_valid_filenames(name: str) -> None:
    slotfile.validate_filename(name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("x" * 256, "255"),
        ("日" * 86, "255"),
        ("a\nb", "control"),
        ("a\x7fb", "control"),
        ("a\x85b", "control"),
        ("a\uff0eb", "FF0E"),
        ("a\u2215b", "2215"),
        ("a\u2216b", "2216"),
        ("a\ufffdb", "FFFD"),
        ("\ufeffa", "FEFF"),
        ("a\ud800b", "surrogate"),
        ("a:b", "forbidden"),
        ("a*b", "forbidden"),
        ("a?b", "forbidden"),
        ('a"b', "forbidden"),
        ("a<b", "forbidden"),
        ("a>b", "forbidden"),
        ("a|b", "forbidden"),
        ("a/b", "separator"),
        ("a\\b", "separator"),
        (" a", "space"),
        ("a ", "space"),
        ("a.", "'.'"),
        ("a..b", "'..'"),
        ("..", "'..'"),
        (".", "'.'"),
        (b"a\xc0\xafb", "UTF-8"),
        (b"a\xffb", "UTF-8"),
    ],
)
def test_invalid_filenames(name: str | bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=None) as ei:
        slotfile.validate_filename(name)
    assert reason in str(ei.value)
