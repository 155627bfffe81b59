"""Slot-file codec: bad files, bad manifest bodies and slot filenames, each with a clear error."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from rdmakv.errors import CodecError
from rdmakv.llama import slotfile
from rdmakv.llama.slotfile import SlotFileError

from .slot_writer import (
    MAGIC,
    TOKENS,
    Block,
    i32,
    prompt_cells,
    u32,
    u64,
    write_slot,
)

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
