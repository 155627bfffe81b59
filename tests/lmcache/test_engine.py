"""LMCache's engine storing into and retrieving from a real rdmakv server, through the plugin
configured exactly as the README says (remote_storage_plugins: ["rdmakv"])."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import xxhash

from rdmakv.lmcache import values
from rdmakv.lmcache.cpu_engine import Model, kv_for, prompt, remote_connector, same_bytes

from ..conftest import request_counts

SMALL = Model(layers=4)


def run_engine(action: str, url: str, n: int, model: Model, seed: int = 1) -> dict:
    """One engine in a fresh process (``python -m rdmakv.lmcache.cpu_engine``): its JSON line."""
    cmd = [sys.executable, "-m", "rdmakv.lmcache.cpu_engine", action, "--url", url, "--tokens", str(n),
           "--layers", str(model.layers), "--dtype", model.dtype, "--seed", str(seed)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype,layers", [("bfloat16", 24), ("float16", 24), ("bfloat16", 4)])
def test_a_new_engine_process_retrieves_bit_exact_what_another_stored_before_the_server_restarted(
    fresh_server, dtype, layers
):
    srv = fresh_server("512MiB")  # fsync=manifest: a commit is on disk before it is acknowledged
    model = Model(layers=layers, dtype=dtype)
    stored = run_engine("store", srv.url("lm"), 1000, model)  # 3 full LMCache chunks and a partial one
    assert stored["settled"] and stored["connector"]["values_saved"] == 4
    srv.stop()
    srv.start()
    got = run_engine("retrieve", srv.url("lm"), 1000, model)
    assert (got["hit_tokens"], got["retrieved_tokens"], got["bit_exact"]) == (1000, 1000, True)
    assert got["connector"]["values_retrieved"] == 4 and got["connector"].get("values_mismatched", 0) == 0


def _pieces(kv: torch.Tensor, window: int = 64) -> list[int]:
    """The content keys rdmakv stores a prompt's LMCache chunks as (computed here independently)."""
    keys = []
    for start in range(0, kv.shape[2], 256):
        chunk = kv[:, :, start : start + 256].contiguous()
        raw = memoryview(chunk.view(torch.uint8).numpy()).cast("B")
        at = 0
        for n in values.piece_lengths([values.Group(tuple(chunk.shape), chunk.element_size())], window):
            keys.append(xxhash.xxh3_64_intdigest(raw[at : at + n]))
            at += n
    return keys


def test_two_engines_share_a_namespace_and_what_they_share_is_stored_once(fresh_server, engines):
    srv = fresh_server("512MiB")
    url = srv.url("shared")
    a, b = engines(url, SMALL), engines(url, SMALL)
    system = prompt(7, 1000)  # a system prompt that ends inside LMCache's fourth chunk
    pa, pb = prompt(8, 512, prefix=system), prompt(9, 512, prefix=system)
    kva, kvb = kv_for(pa, SMALL), kv_for(pb, SMALL)
    a.store(pa, kv=kva)
    assert remote_connector(a).wait_saves(6, timeout=60)
    b.store(pb, kv=kvb)
    assert remote_connector(b).wait_saves(6, timeout=60)
    assert remote_connector(b).counters["values_saved_warm"] == 3  # the three chunks A stored: one round trip

    assert b.lookup(pa) == len(pa)
    out = torch.zeros_like(kva)
    assert int(b.retrieve(pa, kv=out).sum()) == len(pa) and same_bytes(out, kva)

    ka, kb = _pieces(kva), _pieces(kvb)
    with_dups = len(set(ka)) + len(set(kb))
    import rdmakv

    with rdmakv.connect(url, transport="tcp") as st:
        stats = st.stats()
    assert stats["chunks_stored"] == len(set(ka) | set(kb)) < with_dups
    # the shared part: three whole LMCache chunks and the windows of the fourth inside the prompt
    shared = 3 * 2 * SMALL.layers * 4 + 2 * SMALL.layers * 3
    assert len(set(ka) & set(kb)) == shared


def test_batched_contains_of_64_keys_is_one_request(fresh_server, engines):
    srv = fresh_server("512MiB")
    url = srv.url("contains")
    tiny = Model(layers=2)
    eng = engines(url, tiny)
    tokens = prompt(3, 64 * 256)
    eng.store(tokens, kv=kv_for(tokens, tiny))
    conn = remote_connector(eng)
    assert conn.wait_saves(64, timeout=120) and conn.counters["values_saved"] == 64
    before = request_counts(url)
    assert eng.lookup(tokens) == 64 * 256
    after = request_counts(url)
    assert after["HAS_MANIFESTS"] - before.get("HAS_MANIFESTS", 0) == 1
    for op in ("GET_MANIFEST", "GET_MANIFESTS", "EXISTS", "LIST"):
        assert after.get(op, 0) == before.get(op, 0), op


LMCACHE_SAW_AN_ERROR = ("batched put error", "Error occurred", "Remote connection failed", "Put task failed")


def test_the_server_killed_while_an_engine_stores(fresh_server, engines, caplog):
    srv = fresh_server("1GiB")
    url = srv.url("crash") + "?timeout=3"
    eng = engines(url, Model(layers=8))
    conn = remote_connector(eng)
    backend = eng.storage_manager.storage_backends["RemoteBackend-rdmakv"]
    model = Model(layers=8)
    prompts = [prompt(100 + i, 2048) for i in range(12)]
    expected = 0
    for i, p in enumerate(prompts):
        eng.store(p, kv=kv_for(p, model))  # never raises, whatever the store does
        expected += 8
        if i == 3:
            srv.kill9()  # while this prompt's eight values are being saved
        if i == 8:
            srv.start()  # the same data dir and port
        assert conn.wait_saves(expected, timeout=60)
        assert eng.lookup(prompts[0]) in (0, 2048)  # a lookup never raises either
    dropped = conn.counters["values_dropped"]
    assert dropped >= 8, conn.stats()
    deadline = time.monotonic() + 30  # after the restart: saves resume once the lane reconnected
    saved_before = conn.counters["values_saved"]
    resumed = []
    while conn.counters["values_saved"] == saved_before and time.monotonic() < deadline:
        p = prompt(500 + len(resumed), 256)
        resumed.append(p)
        eng.store(p, kv=kv_for(p, model))
        expected += 1
        assert conn.wait_saves(expected, timeout=30)
        time.sleep(0.2)
    assert conn.counters["values_saved"] > saved_before, conn.stats()
    assert backend.put_failed_count == 0  # nothing ever raised into LMCache...
    raised = [r.getMessage() for r in caplog.records if r.name.startswith("lmcache")
              and any(t in r.getMessage() for t in LMCACHE_SAW_AN_ERROR)]  # fmt: skip
    assert not raised  # ...which logs what its backends raise
    # a new engine sees every prompt either whole (bit-exact) or not at all: nothing half-written
    fresh = engines(srv.url("crash"), model)
    whole = []
    for p in prompts + resumed:
        kv = kv_for(p, model)
        hit = fresh.lookup(p)
        out = torch.zeros_like(kv)
        got = int(fresh.retrieve(p, kv=out).sum())
        assert got == hit and hit % 256 == 0
        assert same_bytes(out[:, :, :got], kv[:, :, :got])
        whole.append(got == len(p))
    assert whole[:3] == [True] * 3  # saved before the kill
    assert not all(whole[4:8])  # stored while the server was down: dropped
    assert whole[-1]  # the save that showed the store was back


def test_the_server_down_at_start_up_then_up(fresh_server, engines, tmp_path):
    from .conftest_helpers import free_port

    port = free_port()
    url = f"rdmakv://127.0.0.1:{port}/late?timeout=2"
    eng = engines(url, SMALL)  # starts: the store is not there yet
    conn = remote_connector(eng)
    assert conn is not None and not conn.stats()["lookup_up"]
    p = prompt(11, 512)
    kv = kv_for(p, SMALL)
    eng.store(p, kv=kv)
    assert conn.wait_saves(2, timeout=30) and conn.counters["values_dropped"] == 2
    assert eng.lookup(p) == 0
    from ..conftest import ServerProcess

    srv = ServerProcess(str(tmp_path / "late"), "256MiB", port=port).start()
    try:
        deadline = time.monotonic() + 30  # both connections come back within their retry interval
        while eng.lookup(p) == 0 and time.monotonic() < deadline:
            if conn.counters["values_saved"] == 0:
                settled = conn.counters["values_saved"] + conn.counters["values_dropped"] + 2
                eng.store(p, kv=kv)
                assert conn.wait_saves(settled, timeout=30)
            time.sleep(0.5)
        assert eng.lookup(p) == 512
        out = torch.zeros_like(kv)
        assert int(eng.retrieve(p, kv=out).sum()) == 512 and same_bytes(out, kv)
        assert conn.stats()["lookup_reconnects"] >= 1
    finally:
        srv.stop()


def test_pinned_values_are_sessions_like_any_other(fresh_server, engines):
    import rdmakv

    srv = fresh_server("256MiB")
    url = srv.url("pins")
    eng = engines(url + "?pin=1&ttl=3600", SMALL)
    tokens = prompt(13, 512)
    eng.store(tokens, kv=kv_for(tokens, SMALL))
    assert remote_connector(eng).wait_saves(2, timeout=60)
    with rdmakv.connect(url, transport="tcp") as st:
        rows = st.list(values.NAME_PREFIX)
        assert len(rows) == 2 and all(r["pinned"] and 3500 < r["expires_in"] <= 3600 for r in rows)
        st.unpin(rows[0]["name"])  # an operator can manage them with the usual tools
        assert sorted(r["pinned"] for r in st.list(values.NAME_PREFIX)) == [False, True]
