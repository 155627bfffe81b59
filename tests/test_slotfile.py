"""Slot-file codec on synthetic files from an independent writer (every known layout)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdmakv.hashing import chunk_key
from rdmakv.llama import slotfile

from .slot_writer import (
    EXT_SIZE,
    TOKENS,
    VERSIONS,
    Block,
    Cell,
    Layer,
    fix_ext,
    keys,
    packed_blob,
    prompt_cells,
    roundtrip,
    write_slot,
)

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
