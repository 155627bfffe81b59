"""Slot files in a real store: a byte-identical re-save commits from the remembered manifest in
one round trip, and falls back to cutting and sending when the store no longer has the chunks."""

from __future__ import annotations

import rdmakv
from rdmakv.llama.slotstore import RecentManifests, get_slotfile, put_slotfile

from .conftest import KEY_HEX
from .slot_writer import Block, prompt_cells, write_slot

TOKENS = list(range(1, 401))


def test_identical_resave_is_one_round_trip_and_survives_missing_chunks(server, ns):
    data = write_slot("v3", TOKENS, [Block([prompt_cells(TOKENS, ext=True)])])
    recent = RecentManifests()
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp", window=64) as st:
        cold, err = put_slotfile(st, "a.bin", data, recent=recent)
        assert err == "" and cold.chunks_sent > 1
        warm, _ = put_slotfile(st, "b.bin", data, recent=recent)
        assert (warm.round_trips, warm.chunks_sent, warm.chunks_total) == (1, 0, cold.chunks_total)
        assert get_slotfile(st, "b.bin") == data
    # another namespace holds none of the chunks: the remembered manifest is not enough
    with rdmakv.connect(server.url(ns + "-other"), key=KEY_HEX, transport="tcp", window=64) as st:
        again, _ = put_slotfile(st, "a.bin", data, recent=recent)
        assert again.chunks_sent == cold.chunks_sent
        assert get_slotfile(st, "a.bin") == data


def test_the_recent_manifests_are_bounded_in_bytes(server, ns):
    recent = RecentManifests(limit=8_000)
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp", window=64) as st:
        for n in range(1, 9):
            toks = TOKENS[: 40 * n]
            put_slotfile(st, f"s{n}", write_slot("v3", toks, [Block([prompt_cells(toks, ext=True)])]), recent=recent)
    assert recent.used <= 8_000 and len(recent._items) < 8
