"""The auto-cache's pure parts: prefix names, prefix entries (cut and synthesized slot files),
request parsing and slot choice; and the prefix index against a real store server."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rdmakv
from rdmakv.llama import completion_request as cr
from rdmakv.llama import prefix_entry as pe
from rdmakv.llama import prefix_names as pn
from rdmakv.llama import prefix_store as ps
from rdmakv.llama import slotfile
from rdmakv.llama.slot_table import Choice, SlotsBusyError, SlotTable, common_prefix
from rdmakv.llama.slotstore import get_slotfile

from .conftest import KEY_HEX
from .slot_writer import Block, Cell, Layer, prompt_cells, write_slot

H0 = pn.seed("test-model", 8)
LONG = list(range(100, 180))  # 80 tokens


def plain_file(layout: str, tokens: list[int], v_trans: bool = False, n_stream: int = 1, at: int = 0,
               layers: list[Layer] | None = None) -> bytes:  # fmt: skip
    """A slot file as llama.cpp writes one slot's save: its cells in stream ``at`` of ``n_stream``."""
    streams: list[list[Cell]] = [[] for _ in range(n_stream)]
    streams[at] = prompt_cells(tokens, seq=at)
    rot = (3, 5) if layout == "v4" else (0, 0)
    return write_slot(layout, tokens, [Block(streams, layers or [Layer(), Layer(k_row=32)], v_trans, rot)])


# --------------------------------------------------------------------------- entries


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.sampled_from(["v2c", "v3", "v4"]),
    v_trans=st.booleans(),
    n=st.integers(1, 80),
    window=st.integers(1, 40),
    cut_at=st.floats(0, 1),
    n_stream=st.integers(1, 3),
)
def test_synthesized_prefix_is_the_file_llama_would_write(layout, v_trans, n, window, cut_at, n_stream) -> None:
    """An entry for the first L tokens, written out, is byte for byte the file of a slot holding
    only those L tokens (one stream of n_stream, seq 0): what llama-server itself would save."""
    tokens = LONG[:n]
    cut = pe.cut(slotfile.parse(plain_file(layout, tokens, v_trans, n_stream=2, at=1)), window)
    length = max(1, round(cut_at * n))
    body, chunks, tags, _ = cut.entry(length)
    entry = pe.decode_body(body)
    assert (entry.n_tokens, entry.window, entry.shape.n_stream) == (length, window, 2)
    parts = pe.synthesize(entry, [bytes(c) for c in chunks], n_stream)
    want = plain_file(layout, tokens[:length], v_trans, n_stream=n_stream, at=0)
    assert b"".join(bytes(memoryview(p).cast("B")) for p in parts) == want
    assert pe.entry_tokens(entry, chunks).tolist() == tokens[:length]
    assert [int(x) for x in pe.chunk_lengths(entry)] == [memoryview(c).nbytes for c in chunks]
    assert len(tags) == len(chunks)


def test_entries_of_a_shared_prefix_share_their_window_chunks() -> None:
    a = pe.cut(slotfile.parse(plain_file("v4", LONG[:70])), 16)
    b = pe.cut(slotfile.parse(plain_file("v4", LONG[:40] + list(range(500, 530)))), 16)
    _, ca, _, ida = a.entry(64)
    _, cb, _, idb = b.entry(48)
    shared = {i: bytes(c) for i, c in zip(ida, ca)}
    same = [i for i in idb if i in shared and i[1] < 2]  # windows 0 and 1 (32 tokens) are common
    assert same and all(bytes(c) == shared[i] for i, c in zip(idb, cb) if i in same)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (write_slot("v3", LONG[:20], [Block([prompt_cells(LONG[:20], ext=True)])]), "12 extension bytes"),
        (write_slot("v2d", LONG[:20], [Block([[Cell(p, "x", 0, b"\0" * 8) for p in range(20)]])]), "layout v2d"),
        (write_slot("v4", LONG[:20], [Block([prompt_cells(LONG[:20])]), Block([prompt_cells(LONG[:20])])]),
         "2 KV blocks"),
        (write_slot("v4", LONG[:20], [Block([prompt_cells(LONG[:10]), prompt_cells(LONG[:10])])]), "2 streams"),
        (write_slot("v4", LONG[:20], [Block([[Cell(p + 5, "x") for p in range(20)]])]), "positions 0..n-1"),
        (write_slot("v4", LONG[:12], [Block([prompt_cells(LONG[:20])])]), "does not match its 20 cells"),
        (write_slot("v4", LONG[:20], [Block([prompt_cells(LONG[:20])], has_v=False)]), "V layers"),
    ],
    ids=["ext", "v2d", "iswa", "two-streams", "gap", "tokens", "no-v"],
)
def test_only_plain_slot_files_are_cut(data: bytes, why: str) -> None:
    with pytest.raises(pe.Unsupported, match=why):
        pe.cut(slotfile.parse(data), 8)


def test_a_shuffled_cache_cuts_in_position_order() -> None:
    cells = prompt_cells(LONG[:30])
    shuffled = cells[15:] + cells[:15]  # cell order is not position order (a reused cache)
    data = write_slot("v4", LONG[:30], [Block([shuffled], [Layer(), Layer(k_row=32)], n_rot=(3, 5))])
    body, chunks, _, _ = pe.cut(slotfile.parse(data), 8).entry(30)
    parts = pe.synthesize(pe.decode_body(body), chunks)
    assert b"".join(bytes(memoryview(p).cast("B")) for p in parts) == plain_file("v4", LONG[:30])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_entry_bodies_reject_garbage_cleanly(data: bytes) -> None:
    for body in (data, pe.BODY_MAGIC + data[4:]):
        try:
            pe.decode_body(body)
        except pe.PrefixEntryError:
            pass


def test_entry_body_round_trip_and_defects() -> None:
    cut = pe.cut(slotfile.parse(plain_file("v4", LONG[:20], True)), 8)
    body, chunks, _, _ = cut.entry(20)
    entry = pe.decode_body(body)
    assert entry.shape.same_cache(cut.shape) and pe.encode_body(entry.shape, 8, 20) == body
    for bad, msg in (
        (body[:-1], "layers need"),
        (body[:4] + b"\x09" + body[5:], "not a prefix entry body"),
        (body[:7] + b"\x80" + body[8:], "unknown flags"),
        (body[:6] + b"\x09" + body[7:], "layout code 9"),
    ):
        with pytest.raises(pe.PrefixEntryError, match=msg):
            pe.decode_body(bad)
    with pytest.raises(pe.PrefixEntryError, match="needs 15 chunks, got 14"):
        pe.synthesize(entry, chunks[:-1])
    with pytest.raises(pe.PrefixEntryError, match="chunk 3 has"):
        pe.synthesize(entry, [*chunks[:3], bytes(memoryview(chunks[3]))[:-1], *chunks[4:]])


# --------------------------------------------------------------------------- names


def test_names_chain_by_window_and_never_collide_across_lengths_models_or_windows() -> None:
    tokens = np.array(LONG, np.int32)
    chain = pn.window_chain(H0, tokens, 8)
    assert len(chain) == 10
    for k in range(1, 11):
        assert pn.prefix_digest(H0, chain, tokens, 8 * k, 8) == chain[k - 1]
    # what follows a prefix does not change its name
    other = np.array(LONG[:24] + [7] * 30, np.int32)
    assert pn.window_chain(H0, other, 8)[:3] == chain[:3] and pn.window_chain(H0, other, 8)[3] != chain[3]
    names = {pn.prefix_digest(H0, chain, tokens, n, 8) for n in range(1, 81)}
    assert len(names) == 80
    assert pn.window_chain(pn.seed("another-model", 8), tokens, 8)[0] != chain[0]
    assert pn.window_chain(pn.seed("test-model", 16), tokens, 16)[0] != chain[1]
    assert list(pn.tail_lengths(2, 80, 8)) == list(range(17, 24))
    assert list(pn.tail_lengths(2, 20, 8)) == list(range(17, 21))
    assert len(pn.window_chain(H0, tokens, 8, limit=3)) == 3
    with pytest.raises(ValueError):
        pn.as_tokens([1, -2])


# --------------------------------------------------------------------------- requests


def test_which_completions_are_managed() -> None:
    def parse(path: str, body: object) -> cr.Completion | None:
        return cr.parse(path, json.dumps(body).encode())

    c = parse("/completion", {"prompt": "hi", "stream": True, "id_slot": 2})
    assert c and (c.kind, c.prompt, c.pinned, c.stream) == ("native", "hi", 2, True)
    assert json.loads(c.forwarded(1)) == {"prompt": "hi", "stream": True, "id_slot": 1, "cache_prompt": True}
    assert parse("/v1/completions", {"prompt": ["hi"]}).prompt == "hi"
    assert parse("/completion", {"prompt": [1, 2, "x"]}).prompt == [1, 2, "x"]
    assert parse("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}).kind == "chat"
    text_parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert parse("/chat/completions", text_parts) is not None
    for path, body in (
        ("/completion", {"prompt": ["a", "b"]}),  # two prompts: two slots
        ("/completion", {"prompt": "a", "cache_prompt": False}),
        ("/completion", {"prompt": "a", "n_cmpl": 2}),
        ("/v1/completions", {"prompt": "a", "n": 3}),
        ("/completion", {"prompt": "a", "id_slot": "0"}),
        ("/completion", {"prompt": "a", "multimodal_data": ["..."]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ("/v1/chat/completions", {"messages": []}),
        ("/completion", ["not", "an", "object"]),
        ("/v1/embeddings", {"input": "a"}),
    ):
        assert parse(path, body) is None, (path, body)
    assert cr.parse("/completion", b"{not json") is None
    assert cr.parse("/completion", b"\xff\xfe") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(sorted(cr.ENDPOINTS)))
def test_request_parsing_never_raises(raw: bytes, path: str) -> None:
    cr.parse(path, raw)


def test_model_key_ignores_context_size_only() -> None:
    models = {"data": [{"id": "/m/a.gguf", "meta": {"n_ctx": 4096, "n_params": 5, "n_embd": 64}}]}
    same = {"data": [{"id": "/other/dir/a.gguf", "meta": {"n_ctx": 512, "n_params": 5, "n_embd": 64}}]}
    other = {"data": [{"id": "/m/a.gguf", "meta": {"n_ctx": 4096, "n_params": 6, "n_embd": 64}}]}
    assert cr.model_key(models) == cr.model_key(same) != cr.model_key(other)
    assert cr.model_key(models, "x") != cr.model_key(models)
    assert cr.model_key(None) == cr.model_key({"data": "junk"})


# --------------------------------------------------------------------------- slots


def listing(*sigs: tuple | None, busy: int | None = None) -> list[dict]:
    out = []
    for i, sig in enumerate(sigs):
        d = {"id": i, "is_processing": i == busy}
        if sig is not None:
            d["id_task"], d["n_prompt_tokens"] = sig
        out.append(d)
    return out


def test_slot_choice_reuses_restores_and_never_trusts_memory_over_llama_server() -> None:
    t = SlotTable(min_gain=4)
    t.reconcile(listing(None, None, None))
    a, b = np.arange(100, dtype=np.int32), np.arange(500, 600, dtype=np.int32)
    t.record(0, a[:60], (7, 61))
    t.record(1, b[:30], (8, 31))
    assert t.choose(a, 0) == Choice(0, 60, False)
    assert t.choose(a, 62).restore is False  # 2 more tokens: not worth a file
    c = t.choose(a, 80)
    assert c.restore and c.slot == 2 and c.slot_prefix == 0  # restored into the empty slot, slot 0 kept
    assert t.choose(a, 80, pinned=4) == t.choose(a, 80, pinned=1)  # llama-server wraps the id
    assert t.choose(b[:10], 0).slot == 1
    # llama-server says slot 0 ran another task (or restarted, or was erased): its record goes
    assert t.reconcile(listing((9, 61), (8, 31), None)) == 1
    assert t.choose(a, 0).slot_prefix == 0
    t.reconcile(listing(None, (8, 31), None, busy=1))  # another client's request runs on slot 1
    assert all(c.slot != 1 for c in (t.choose(b, 0), t.choose(a, 0)))
    t.reconcile(listing(None, None))  # a restart with -np 2
    assert t.n_slots == 2 and common_prefix(t.slots[0].tokens, a) == 0


def test_leases_never_share_a_slot_and_waiting_is_bounded() -> None:
    async def scenario() -> None:
        t = SlotTable(max_waiters=1)
        t.resize(1)
        tokens = np.arange(10, dtype=np.int32)

        async def refresh() -> None:
            pass

        first = await t.acquire(tokens, 0, None, refresh)
        second = asyncio.ensure_future(t.acquire(tokens, 0, None, refresh))
        await asyncio.sleep(0.05)
        assert not second.done() and t.waiting == 1
        with pytest.raises(SlotsBusyError, match="1 requests already wait for one of 1 slots"):
            await t.acquire(tokens, 0, None, refresh)
        await t.release(first.slot)
        assert (await asyncio.wait_for(second, 2)).slot == 0

    asyncio.run(scenario())


# --------------------------------------------------------------------------- the index in a real store


def test_longest_prefix_in_a_store_any_session_any_length(server) -> None:
    w = 8
    first = pe.cut(slotfile.parse(plain_file("v4", LONG[:43])), w)
    second = pe.cut(slotfile.parse(plain_file("v4", LONG[:20] + list(range(300, 330)))), w)
    with rdmakv.connect(server.url("prefix-index"), KEY_HEX, transport="tcp") as store:
        rep = ps.register(store, first, H0, also=(30,))
        assert (rep.wanted, rep.committed, rep.stored) == (7, 7, 0)  # 5 windows, the exact 43, the prompt's 30
        again = ps.register(store, first, H0, also=(30,))
        assert (again.committed, again.stored, again.round_trips) == (0, 7, 1)
        rep2 = ps.register(store, second, H0)
        assert rep2.stored == 2 and rep2.committed == 5  # shares 2 whole windows
        sent_once = store.stats()

        def longest(tokens: list[int]) -> int:
            return ps.longest_prefix(store, H0, np.array(tokens, np.int32), w).length

        assert longest(LONG[:43] + [1, 2, 3]) == 43  # the exact state of the first
        assert longest(LONG[:42]) == 40  # ends before it: its last whole window
        assert longest(LONG[:30] + [5, 5]) == 30  # where its prompt ended (a regenerated answer)
        assert longest(LONG[:20] + list(range(300, 340))) == 50  # the second, exactly
        assert longest(LONG[:20] + [9] * 30) == 16  # shared by both
        assert longest([9] * 30) == 0
        found = ps.longest_prefix(store, H0, np.array(LONG[:60], np.int32), w)
        entry, chunks = ps.fetch_entry(store, found.name)
        assert entry.n_tokens == 43 and pe.entry_tokens(entry, chunks).tolist() == LONG[:43]
        assert found.round_trips == 2
        # an operator can export an entry as the slot file it restores
        exported = slotfile.parse(get_slotfile(store, found.name))
        assert exported.tokens.tolist() == LONG[:43] and exported.blocks[0].streams[0].cell_count == 43
        # a slot file name of the same store is not an entry
        store.put_blob("not-an-entry", b"x")
        with pytest.raises(pe.PrefixEntryError):
            ps.fetch_entry(store, "not-an-entry")
        # deleted (evicted) entries are misses, never errors
        store.delete_manifest(found.name)
        assert longest(LONG[:43] + [1]) == 40
        assert sent_once["chunk_bytes"] > 0
    with rdmakv.connect(server.url("prefix-index-other-tenant"), KEY_HEX, transport="tcp") as other:
        assert ps.longest_prefix(other, H0, np.array(LONG, np.int32), w).length == 0


def test_mapped_scratch_files_keep_their_maps_and_are_bounded(tmp_path) -> None:
    from rdmakv.llama.mapped_scratch import MappedScratch

    ms = MappedScratch(tmp_path, keep=1)
    a, b = tmp_path / "a.slot", tmp_path / "b.slot"
    m = ms.take(a, 10_000)
    m[:5] = b"hello"
    assert a.read_bytes()[:5] == b"hello" and a.stat().st_size == 10_000  # llama-server reads these bytes
    ms.give_back(a, m)
    assert not a.exists()
    again = ms.take(b, 4_000)  # the same file and map, resized to the file needed now
    assert again is m and b.stat().st_size == 4_000 and b.read_bytes()[:5] == b"hello"
    other = ms.take(a, 100)  # none free: a new one
    assert other is not m
    ms.give_back(b, again)
    ms.give_back(a, other)  # past keep: unmapped and removed
    assert other.closed and not a.exists() and len(list((ms.dir).iterdir())) == 1
    ms.close()
    assert again.closed and not list(ms.dir.iterdir())
