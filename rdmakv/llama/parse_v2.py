"""Parser for ggsq versions 2, 3 and 4: one or more KV blocks of per-stream cells and layers.

Version 2 had four on-disk variants over its life (v2a..v2d: with or without n_stream, cell-ext
bytes for M-RoPE); 3 and 4 added cell-ext bytes and (4) rotation counts. Each candidate layout
is tried until one parses to the end of the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .slot_format import (
    MAX_BLOCKS,
    MAX_LAYERS,
    MAX_SEQ_IDS,
    MAX_STREAMS,
    U32,
    KVBlock,
    SlotFileError,
    SlotFormatFail,
    SlotReader,
    Stream,
    expect,
    rows_layer,
    trans_layer,
)


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


def parse_state(buf: memoryview, start: int, version: int) -> tuple[str, int, list[KVBlock]]:
    """(layout label, cell-ext bytes, blocks) of the KV state at ``start``."""
    fails: list[tuple[_Layout, SlotFormatFail]] = []
    for lay in _candidates(version):
        try:
            blocks = _parse_blocks(buf, start, lay)
        except SlotFormatFail as f:
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
    buf: memoryview, start: int, version: int, fails: list[tuple[_Layout, SlotFormatFail]]
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
    except SlotFormatFail:
        pass
    # Hybrid models: attention KV block(s) first, then a recurrent block.
    r = SlotReader(buf, start)
    kv = _candidates(version)[0]
    try:
        while r.left:
            _parse_block(r, kv, 0)
            mark = r.pos
            try:
                _parse_blocks(buf, mark, rec, multi_block=False)
                return f"hybrid memory: attention KV block then a recurrent block at offset {mark}"
            except SlotFormatFail:
                continue
    except SlotFormatFail:
        pass
    return ""


def _parse_blocks(
    buf: memoryview, start: int, lay: _Layout, multi_block: bool = True
) -> list[KVBlock]:
    r = SlotReader(buf, start)
    blocks: list[KVBlock] = []
    while True:
        blocks.append(_parse_block(r, lay, len(blocks)))
        if r.pos == r.end:
            return blocks
        # 8 bytes is the smallest possible block (n_stream 1, cell_count 0)
        if not multi_block or len(blocks) >= MAX_BLOCKS or r.left < 8:
            raise SlotFormatFail(r.pos, f"{r.left} trailing bytes after KV block {len(blocks) - 1}")


def _parse_block(r: SlotReader, lay: _Layout, index: int) -> KVBlock:
    start = r.pos
    n_stream: int | None = None
    if lay.multi_stream:
        n_stream = r.u32(f"block {index} n_stream")
        expect(1 <= n_stream <= MAX_STREAMS, start, f"implausible n_stream {n_stream}")
    streams = [_parse_stream(r, lay, s) for s in range(n_stream or 1)]
    return KVBlock(index, start, r.pos, n_stream, streams)


def _parse_stream(r: SlotReader, lay: _Layout, index: int) -> Stream:
    offset = r.pos
    n = r.u32(f"stream {index} cell_count")
    empty = np.zeros(0, dtype=np.int32)
    if n == 0 and not lay.empty_has_data:
        return Stream(index, 0, offset, empty)
    min_meta = 8 + lay.ext_size
    expect(
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


def _parse_meta(r: SlotReader, n: int, ext: int) -> _Meta:
    if n == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.uint32), [], None
    start = r.pos
    r.need(8, "META cell 0")
    (k,) = U32.unpack_from(r.buf, start + 4)
    expect(k <= MAX_SEQ_IDS, start + 4, f"META cell 0: implausible n_seq_id {k}")
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


def _parse_meta_slow(r: SlotReader, n: int, ext: int) -> _Meta:
    pos = np.empty(n, np.int32)
    nseq = np.empty(n, np.uint32)
    exts = np.empty((n, ext), np.uint8) if ext else None
    seqs: set[int] = set()
    for i in range(n):
        pos[i] = r.i32(f"META cell {i} pos")
        k = r.u32(f"META cell {i} n_seq_id")
        expect(k <= MAX_SEQ_IDS, r.pos - 4, f"META cell {i}: implausible n_seq_id {k}")
        nseq[i] = k
        at = r.skip(ext, f"META cell {i} ext")
        if exts is not None:
            exts[i] = np.frombuffer(r.buf, np.uint8, ext, at)
        at = r.skip(4 * k, f"META cell {i} seq ids")
        seqs.update(int(x) for x in np.frombuffer(r.buf, "<i4", k, at))
    return pos, nseq, sorted(seqs), exts


def _parse_data(r: SlotReader, st: Stream, lay: _Layout) -> None:
    at = r.pos
    st.v_trans = r.u32("v_trans")
    expect(st.v_trans in (0, 1), at, f"v_trans must be 0 or 1, found {st.v_trans}")
    st.n_layer = r.u32("n_layer")
    expect(1 <= st.n_layer <= MAX_LAYERS, at + 4, f"implausible n_layer {st.n_layer}")
    if lay.rot_fields:
        st.n_rot_k = r.u32("n_rot_k")
        st.n_rot_v = r.u32("n_rot_v")
    n = st.cell_count
    st.k_layers = [rows_layer(r, n, "K", il, 8) for il in range(st.n_layer)]
    if not lay.v_layers:
        return
    if st.v_trans:
        st.v_layers = [trans_layer(r, n, il, 4, None) for il in range(st.n_layer)]
    else:
        st.v_layers = [rows_layer(r, n, "V", il, 8) for il in range(st.n_layer)]
