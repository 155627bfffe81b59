"""Parser for ggsq version 1 (spring 2024): a single stream, no v_trans flag on disk."""

from __future__ import annotations

import numpy as np

from .slot_format import (
    MAX_LAYERS,
    MAX_N_EMBD,
    KVBlock,
    SlotFileError,
    SlotFormatFail,
    SlotReader,
    Stream,
    expect,
    rows_layer,
    trans_layer,
)

# v_trans flag on disk, so V is tried as rows, then transposed with a u32 or size_t el size.
_V1_MODES = (("rows", 0), ("trans", 0), ("trans", 4))


def parse_v1(buf: memoryview, start: int) -> tuple[str, int, list[KVBlock]]:
    """("v1", 0, [the one block]) of the v1 KV state at ``start``."""
    fails: list[tuple[str, SlotFormatFail]] = []
    for mode, el_width in _V1_MODES:
        try:
            return "v1", 0, [_parse_v1(buf, start, mode, el_width)]
        except SlotFormatFail as f:
            fails.append((f"v1({mode})", f))
    name, best = max(fails, key=lambda nf: nf[1].offset)
    raise SlotFileError(
        f"ggsq v1: the state does not parse to the end of the file ({len(buf)} bytes); "
        f"closest was {name}, which failed at offset {best.offset}: {best.message}",
        best.offset,
    )


def _parse_v1(buf: memoryview, start: int, mode: str, el_width: int) -> KVBlock:
    r = SlotReader(buf, start)
    szt = r.u32("sizeof(size_t)")
    expect(szt in (4, 8), start, f"v1 sizeof(size_t) must be 4 or 8, found {szt}")
    count_off = r.pos
    n = r.u32("cell_count")
    n_layer = r.u32("n_layer")
    expect(1 <= n_layer <= MAX_LAYERS, r.pos - 4, f"implausible n_layer {n_layer}")
    n_embd_v = r.u32("n_embd_v_gqa")
    meta = r.skip(4 * n, f"{n} cell positions")
    st = Stream(0, n, count_off, np.frombuffer(buf, "<i4", n, meta).astype(np.int32), meta, 4 * n)
    st.n_layer = n_layer
    st.v_trans = int(mode == "trans")
    st.k_layers = [rows_layer(r, n, "K", il, szt) for il in range(n_layer)]
    if mode == "rows":
        st.v_layers = [rows_layer(r, n, "V", il, szt) for il in range(n_layer)]
    else:
        expect(1 <= n_embd_v <= MAX_N_EMBD, start + 12, f"implausible n_embd_v_gqa {n_embd_v}")
        st.v_layers = [trans_layer(r, n, il, el_width or szt, n_embd_v) for il in range(n_layer)]
    if r.pos != r.end:
        raise SlotFormatFail(r.pos, f"{r.left} trailing bytes after the v1 state")
    return KVBlock(0, start, r.pos, None, [st])
