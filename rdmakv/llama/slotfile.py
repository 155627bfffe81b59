"""llama.cpp sequence-state ("ggsq") slot-file codec: parse, chunk, rebuild. The entry point.

Pure: bytes in, objects out (``load`` is the only helper that touches a path).
The format facts are in ``docs/llama-slot-format.md``; in short, a slot file is::

    u32 magic 'ggsq' | u32 version | u32 n_words | n_words x i32 token words | KV state

and the KV state is one or more KV blocks (iSWA models write the base cache and
then the SWA cache), each holding per-stream cells (META: pos, n_seq_id,
optional cell-ext bytes, seq ids) and per-layer K/V rows (V possibly transposed).

Where the parts live: the shared model and reader in ``slot_format``, the parser of each
file-format version in ``parse_v1`` and ``parse_v2`` (versions 2-4), the chunk mapping in
``slot_chunks``, the body decoding and rebuild in ``slot_rebuild``, llama-server's filename
rules in ``names``. This module parses the header and token words, dispatches on the version
and offers everything under one name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .names import validate_filename
from .parse_v1 import parse_v1
from .parse_v2 import parse_state
from .slot_chunks import make_tag, parse_tag, split, split_opaque
from .slot_format import (
    HEADER,
    MAGIC_GGSN,
    MAGIC_GGSQ,
    SUPPORTED_VERSIONS,
    TOKEN_NULL,
    U32,
    Buffer,
    KVBlock,
    LayerRegion,
    SlotFile,
    SlotFileError,
    Stream,
    ggml_type_name,
)
from .slot_rebuild import describe_body, rebuild, rebuild_parts

__all__ = [
    "KVBlock",
    "LayerRegion",
    "SlotFile",
    "SlotFileError",
    "Stream",
    "describe_body",
    "format_inspect",
    "ggml_type_name",
    "inspect",
    "load",
    "make_tag",
    "parse",
    "parse_tag",
    "rebuild",
    "rebuild_parts",
    "split",
    "split_any",
    "split_opaque",
    "validate_filename",
]


# --------------------------------------------------------------------------- parse


def parse(data: Buffer) -> SlotFile:
    """Parse a ggsq slot file; raise SlotFileError naming what was found."""
    buf = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    if len(buf) < HEADER.size:
        raise SlotFileError(f"file too short for a ggsq header ({len(buf)} bytes, need 12)", 0)
    magic, version, n_words = HEADER.unpack_from(buf, 0)
    _check_magic(magic, bytes(buf[:4]))
    if version not in SUPPORTED_VERSIONS:
        raise SlotFileError(
            f"unsupported ggsq version {version} at offset 4 "
            f"(this build reads {', '.join(map(str, SUPPORTED_VERSIONS))})",
            4,
        )
    body_start = HEADER.size + 4 * n_words
    if body_start > len(buf):
        raise SlotFileError(
            f"ggsq v{version}: header declares {n_words} token words ({4 * n_words} bytes) "
            f"but the file has only {len(buf) - HEADER.size} bytes after the header",
            8,
        )
    if body_start == len(buf):
        raise SlotFileError(
            f"ggsq v{version}: no KV state after the {n_words} token words "
            f"(file ends at offset {body_start})",
            body_start,
        )
    words = np.frombuffer(buf, dtype="<i4", count=n_words, offset=HEADER.size)
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
    return parse_v1(buf, start) if version == 1 else parse_state(buf, start, version)


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
        off += 4 + U32.unpack_from(raw, off)[0]
    if (off + 3) // 4 != len(words):
        raise ValueError(f"packed token blob: {4 * len(words) - off} unexpected trailing bytes")
    return words[3 : 3 + n_tok]


# --------------------------------------------------------------------------- split


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
