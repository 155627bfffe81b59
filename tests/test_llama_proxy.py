"""`rdmakv llama-proxy` in front of a real llama-server, with a real `rdmakv serve` behind it.

Everything is a real process on 127.0.0.1: llama-server (built by tests/build_llama_server.sh)
with a tiny random-weight GGUF, the store server, and the proxy started as
``python -m rdmakv llama-proxy``. No part of llama.cpp is mocked.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import string
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import rdmakv
from bench import llama_harness as lf
from rdmakv.llama import slotfile
from rdmakv.llama.slotstore import get_slotfile, put_slotfile

from .conftest import KEY_HEX

pytestmark = pytest.mark.llama

WINDOW = 256  # the proxy's default W


def text(seed: int, n: int) -> str:
    """n random letters, no spaces: the tiny vocab makes one byte token per letter (plus BOS).

    Random, not periodic: a periodic text repeats V rows of layer 0 across windows, and the
    in-file dedup that causes would blur the cross-slot counts."""
    rng = random.Random(seed)
    return "".join(rng.choices(string.ascii_lowercase, k=n))




class Stack:
    """llama-server + proxy sharing one slot dir; the store is a real `rdmakv serve`."""

    def __init__(self, llama: lf.LlamaServer, proxy: lf.LlamaProxy, slot_dir: Path, store_url: str) -> None:
        self.llama, self.proxy, self.slot_dir, self.store_url = llama, proxy, slot_dir, store_url

    def files(self) -> list[str]:
        """What is in the slot dir, leaving out the proxies' own work dirs (spares, local copies)."""
        return sorted(p.name for p in self.slot_dir.iterdir() if not p.name.startswith(".rdmakv-proxy-"))

    def names(self) -> set[str]:
        with rdmakv.connect(self.store_url, KEY_HEX) as store:
            return {m["name"] for m in store.list()}

    def complete(self, prompt: str, slot: int, n_predict: int = 4) -> dict:
        st, res = self.proxy.request(
            "POST", "/completion", {"prompt": prompt, "n_predict": n_predict, "id_slot": slot, "cache_prompt": True}
        )
        assert st == 200, res
        return res

    def slot(self, action: str, slot: int, name: str | None = None, direct: bool = False) -> tuple[int, dict]:
        api = self.llama if direct else self.proxy
        return api.request("POST", f"/slots/{slot}?action={action}", None if name is None else {"filename": name})


def start_stack(
    tmp: Path, binary: Path, model: Path, store_url: str, *args: str, n_ctx: int
) -> tuple[Stack, lf.LlamaServer, lf.LlamaProxy]:
    slot_dir = tmp / "slots"
    slot_dir.mkdir()
    llama = lf.LlamaServer(binary, model, slot_dir, *args, n_ctx=n_ctx).__enter__()
    try:
        proxy = lf.LlamaProxy(llama.url, slot_dir, store_url, KEY_HEX).__enter__()
    except BaseException:
        llama.__exit__()
        raise
    return Stack(llama, proxy, slot_dir, store_url), llama, proxy


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, server_bin: Path, tiny_model: Path, server) -> Iterator[Stack]:
    # -np 2: two slots (two streams) so prefix sharing and concurrent restores can be exercised
    st, llama, proxy = start_stack(
        tmp_path_factory.mktemp("main"), server_bin, tiny_model, server.url("llama-proxy-main"), "-np", "2",
        n_ctx=4096,
    )
    yield st
    proxy.__exit__()
    llama.__exit__()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RDMAKV_AUTH_KEY=KEY_HEX)
    return subprocess.run(
        [sys.executable, "-m", "rdmakv", *args], env=env, capture_output=True, text=True, timeout=120
    )


# --------------------------------------------------------------------------- save / restore


def test_save_goes_to_store_and_warm_save_is_one_round_trip(stack: Stack) -> None:
    stack.complete(text(1, 700), 0)
    st, direct = stack.slot("save", 0, "direct.bin", direct=True)  # llama-server's own answer, for comparison
    assert st == 200, direct
    (stack.slot_dir / "direct.bin").unlink()

    st, saved = stack.slot("save", 0, "warm.bin")
    assert st == 200, saved
    assert stack.files() == []  # not even a scratch file
    assert "warm.bin" in stack.names()
    rep = saved.pop("rdmakv")
    assert set(saved) == set(direct) and saved["filename"] == "warm.bin"
    assert (saved["n_saved"], saved["n_written"]) == (direct["n_saved"], direct["n_written"])
    assert rep["chunked"] and rep["parse_error"] is None and rep["file_bytes"] == saved["n_written"]
    assert rep["chunks_total"] > 0 and rep["chunks_sent"] > 0

    st, again = stack.slot("save", 0, "warm.bin")
    assert st == 200, again
    warm = again["rdmakv"]
    assert (warm["round_trips"], warm["chunks_sent"]) == (1, 0)
    assert warm["chunks_skipped"] == rep["chunks_sent"] and warm["chunks_total"] == rep["chunks_total"]
    assert stack.files() == []


def test_restore_brings_back_the_cache(stack: Stack) -> None:
    prompt, follow = text(2, 600), text(2, 600) + "thenmore"
    stack.complete(prompt, 0)
    st, saved = stack.slot("save", 0, "restore-me.bin")
    assert st == 200, saved

    assert stack.slot("erase", 0)[0] == 200
    fresh = stack.complete(follow, 0)["timings"]  # baseline: an erased slot evaluates everything
    assert stack.slot("erase", 0)[0] == 200

    st, restored = stack.slot("restore", 0, "restore-me.bin")
    assert st == 200, restored
    assert restored["n_restored"] == saved["n_saved"] and restored["filename"] == "restore-me.bin"
    assert restored["n_read"] == saved["n_written"] == restored["rdmakv"]["file_bytes"]
    assert stack.files() == []
    reused = stack.complete(follow, 0)["timings"]
    assert fresh["cache_n"] == 0 and fresh["prompt_n"] > 600
    assert reused["cache_n"] >= 600 and reused["prompt_n"] <= 16, (fresh, reused)


def test_two_slots_sharing_a_prefix_share_chunks(stack: Stack) -> None:
    shared = text(3, 3 * WINDOW + 40)
    stack.complete(shared + text(4, 100), 0)
    stack.complete(shared + text(5, 150), 1)
    st, a = stack.slot("save", 0, "prefix-a.bin")
    assert st == 200, a
    st, b = stack.slot("save", 1, "prefix-b.bin")
    assert st == 200, b
    # BOS + shared letters cover 3 whole windows; each is 2 layers x (K, V) chunks
    assert b["rdmakv"]["chunks_skipped"] >= 3 * 2 * 2, b["rdmakv"]
    assert b["rdmakv"]["chunks_sent"] < b["rdmakv"]["chunks_total"]
    with rdmakv.connect(stack.store_url, KEY_HEX) as store:
        keys = [set(store.get_manifest(n).keys.tolist()) for n in ("prefix-a.bin", "prefix-b.bin")]
    assert len(keys[0] & keys[1]) >= 3 * 2 * 2


def test_concurrent_restores_and_saves_of_one_name(stack: Stack) -> None:
    # e.g. one shared system prompt restored into every slot at once
    stack.complete(text(6, 400), 0)
    stack.complete(text(7, 300), 1)
    st, saved = stack.slot("save", 0, "shared.bin")
    assert st == 200, saved
    with ThreadPoolExecutor(4) as pool:
        restores = list(pool.map(lambda i: stack.slot("restore", i % 2, "shared.bin"), range(8)))
        saves = list(pool.map(lambda i: stack.slot("save", i % 2, "both.bin"), range(4)))
    for st, res in restores:
        assert st == 200 and res["n_restored"] == saved["n_saved"], res
    for st, res in saves:
        assert st == 200 and res["filename"] == "both.bin", res
    assert stack.files() == []


@pytest.mark.parametrize(
    ("args", "slot", "v_trans", "n_stream", "k_type"),
    [
        (("-np", "1", "-fa", "on"), 0, 0, 1, "F16"),
        (("-np", "1", "-fa", "off"), 0, 1, 1, "F16"),
        (("-np", "3"), 1, 0, 3, "F16"),
        (("-np", "1", "-ctk", "q8_0"), 0, 0, 1, "Q8_0"),
    ],
    ids=["fa-on-np1", "fa-off-np1", "np3", "q8k"],
)
def test_real_files_round_trip_byte_identical(
    tmp_path: Path, server_bin: Path, tiny_model: Path, server, args: tuple, slot: int, v_trans: int,
    n_stream: int, k_type: str,
) -> None:  # fmt: skip
    url = server.url(f"llama-proxy-{tmp_path.name}")
    st_, llama, proxy = start_stack(tmp_path, server_bin, tiny_model, url, *args, n_ctx=1536)
    try:
        prompt = text(8, 300)
        st_.complete(prompt, slot)
        st, direct = st_.slot("save", slot, "orig.bin", direct=True)
        assert st == 200, direct
        orig = (st_.slot_dir / "orig.bin").read_bytes()
        info = slotfile.inspect(slotfile.parse(orig))
        assert (info["v_trans"], info["n_stream"], info["k_types"]) == (v_trans, n_stream, [k_type]), info
        assert info["cells_per_stream"][slot] == direct["n_saved"]

        st, saved = st_.slot("save", slot, "via-proxy.bin")  # the same slot state, through the proxy
        assert st == 200 and saved["rdmakv"]["chunked"], saved
        out = tmp_path / "exported.bin"
        r = cli("slotfile", "get", url, "via-proxy.bin", str(out))
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == orig and json.loads(r.stdout)["file_bytes"] == len(orig)

        r = cli("slotfile", "put", url, "imported.bin", str(st_.slot_dir / "orig.bin"))
        assert r.returncode == 0, r.stderr
        put = json.loads(r.stdout)
        assert put["chunked"] and put["file_bytes"] == len(orig) and put["chunks_sent"] == 0  # all deduplicated
        with rdmakv.connect(url, KEY_HEX) as store:
            assert get_slotfile(store, "imported.bin") == orig

        assert st_.slot("erase", slot)[0] == 200
        st, restored = st_.slot("restore", slot, "via-proxy.bin")
        assert st == 200 and restored["n_restored"] == direct["n_saved"], restored
        assert st_.files() == ["orig.bin"]
        reused = st_.complete(prompt + "more", slot)["timings"]
        assert reused["cache_n"] >= 300 and reused["prompt_n"] <= 16, reused
    finally:
        proxy.__exit__()
        llama.__exit__()


# --------------------------------------------------------------------------- bad files


def test_corrupt_and_unknown_files_are_stored_opaque(stack: Stack, tmp_path: Path) -> None:
    stack.complete(text(9, 200), 0)
    assert stack.slot("save", 0, "real.bin", direct=True)[0] == 200
    real = (stack.slot_dir / "real.bin").read_bytes()
    (stack.slot_dir / "real.bin").unlink()
    future = bytearray(real)
    struct.pack_into("<I", future, 4, 99)
    variants = {
        "truncated": (real[:-100], "end"),
        "future-version": (bytes(future), "version 99"),
        "garbage": (b"GGUF not a slot file" * 10, "bad magic"),
        "trailing": (real + b"\0" * 8, "closest was v4"),
    }
    for label, (data, found) in variants.items():
        path = tmp_path / f"{label}.bin"
        path.write_bytes(data)
        r = cli("slotfile", "inspect", str(path))
        assert r.returncode == 1 and "not a slot file" in r.stderr and found in r.stderr, (label, r.stderr)
        if label in ("truncated", "garbage"):  # the CLI path for two, the library for the rest (time)
            r = cli("slotfile", "put", stack.store_url, f"bad-{label}.bin", str(path))
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["chunked"] is False and "whole (opaque)" in r.stderr, r
            out = tmp_path / f"{label}.out"
            r = cli("slotfile", "get", stack.store_url, f"bad-{label}.bin", str(out))
            assert r.returncode == 0, r.stderr
            assert out.read_bytes() == data
        else:
            with rdmakv.connect(stack.store_url, KEY_HEX) as store:
                _, error = put_slotfile(store, f"bad-{label}.bin", data)
                assert error and get_slotfile(store, f"bad-{label}.bin") == data
    r = cli("slotfile", "inspect", "--json", str(tmp_path / "future-version.bin"))
    assert r.returncode == 1 and "version 99" in json.loads(r.stdout)["error"]

    # restoring a corrupt file: llama-server itself refuses it, the proxy passes that on and cleans up
    st, res = stack.slot("restore", 0, "bad-truncated.bin")
    assert st == 400 and set(res["error"]) >= {"code", "message", "type"}, res
    assert stack.files() == []


# --------------------------------------------------------------------------- pass-through


def test_streaming_completion_passes_through_incrementally(stack: Stack) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", stack.proxy.port, timeout=60)
    body = {"prompt": "abc", "n_predict": 200, "ignore_eos": True, "stream": True, "id_slot": 1}
    t0 = time.perf_counter()
    conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/event-stream")
    stamps = []
    last = {}
    while line := resp.readline():
        if line.startswith(b"data: "):
            stamps.append(time.perf_counter() - t0)
            last = json.loads(line[6:])
    conn.close()
    assert len(stamps) >= 50  # random byte tokens: incomplete UTF-8 waits for the next token
    # A buffering proxy would deliver every event at once, after generation ended; streamed,
    # the events arrive spread over (most of) the generation time llama-server reports.
    generation_s = last["timings"]["predicted_ms"] / 1e3
    assert stamps[-1] - stamps[0] >= 0.5 * generation_s, (stamps[0], stamps[-1], generation_s)


def test_ordinary_endpoints_pass_through_unchanged(stack: Stack) -> None:
    def raw(base_port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", base_port, timeout=60)
        conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        r = conn.getresponse()
        out = (r.status, r.getheader("Content-Type", ""), r.read())
        conn.close()
        return out

    for method, path, body in (
        ("GET", "/health", None),
        ("GET", "/props", None),
        ("GET", "/v1/models", None),
        ("POST", "/tokenize", b'{"content": "hello proxy"}'),
        ("POST", "/detokenize", b'{"tokens": [107, 104, 111]}'),
        ("GET", "/no-such-endpoint", None),
    ):
        direct = raw(stack.llama.port, method, path, body)
        via = raw(stack.proxy.port, method, path, body)
        if path == "/v1/models":  # carries a creation timestamp
            direct = (direct[0], direct[1], json.loads(direct[2])["data"][0]["id"])
            via = (via[0], via[1], json.loads(via[2])["data"][0]["id"])
        assert via == direct, (path, via, direct)


# --------------------------------------------------------------------------- errors


def test_restore_of_unknown_name_is_404(stack: Stack) -> None:
    st, res = stack.slot("restore", 0, "never-saved.bin")
    assert st == 404 and res["error"]["code"] == 404, res
    assert "never-saved.bin" in res["error"]["message"] and res["error"]["type"]
    assert stack.files() == []


BAD_NAMES = ["../x", "a/b.bin", "a\\b", "", " x.bin", "x.bin ", "x.", "..", ".", "x:y", "a..b", "q?.bin",
             "\u2215x", "\x01x", "x" * 256]  # fmt: skip


def test_filename_rules_are_llama_servers(stack: Stack) -> None:
    before = stack.names()
    bodies: list[dict] = [{"filename": n} for n in BAD_NAMES] + [{}, {"filename": 5}]
    for action in ("save", "restore"):
        for body in bodies:
            direct = stack.llama.request("POST", f"/slots/0?action={action}", body)
            via = stack.proxy.request("POST", f"/slots/0?action={action}", body)
            assert direct[0] >= 400 and via == direct, (action, body, via, direct)
    assert stack.files() == [] and stack.names() == before
    stack.complete(text(10, 100), 0)
    for name in (".hidden.bin", "ünï côdé.bin", "a b c.bin"):  # unusual but valid for llama-server
        st, saved = stack.slot("save", 0, name)
        assert st == 200 and saved["filename"] == name, saved
        st, restored = stack.slot("restore", 0, name)
        assert st == 200 and restored["n_restored"] == saved["n_saved"], restored
        assert name in stack.names()
    assert stack.files() == []


def test_store_unreachable_is_503_and_leaves_no_file(stack: Stack, fresh_server) -> None:
    store = fresh_server()
    url = store.url("unreachable")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = stack.slot_dir / f".rdmakv-{dead.pid}-7.slot"  # as if a proxy was killed mid-restore
    stale.write_bytes(b"ggsq")
    stale_work = stack.slot_dir / f".rdmakv-proxy-{dead.pid}"  # and its spares and local copies
    (stale_work / "cache").mkdir(parents=True)
    (stale_work / "cache" / "0.slot").write_bytes(b"ggsq")
    with lf.LlamaProxy(stack.llama.url, stack.slot_dir, url, KEY_HEX) as proxy:
        assert not stale.exists() and not stale_work.exists()  # swept at start-up
        stack.complete(text(11, 300), 0)
        st, saved = proxy.request("POST", "/slots/0?action=save", {"filename": "kept.bin"})
        assert st == 200, saved
        store.stop()

        st, res = proxy.request("POST", "/slots/0?action=restore", {"filename": "kept.bin"})
        assert st == 503 and res["error"]["code"] == 503 and "unreachable" in res["error"]["message"], res
        assert stack.files() == []  # nothing half-written, nothing left over

        st, res = proxy.request("POST", "/slots/0?action=save", {"filename": "lost.bin"})
        assert st == 503 and "unreachable" in res["error"]["message"], res
        # the save is not lost: llama-server's complete file stays under its own name
        assert stack.files() == ["lost.bin"]
        slotfile.parse((stack.slot_dir / "lost.bin").read_bytes())
        (stack.slot_dir / "lost.bin").unlink()

        store.start()  # same port, same data: the proxy reconnects by itself
        st, res = proxy.request("POST", "/slots/0?action=restore", {"filename": "kept.bin"})
        assert st == 200 and res["n_restored"] == saved["n_saved"], res
        assert stack.files() == []


# --------------------------------------------------------------------------- the node-local hot copy


def test_local_cache_serves_this_nodes_saves_and_defers_to_the_store(stack: Stack, fresh_server) -> None:
    import shutil

    store = fresh_server()
    url = store.url("local-cache")
    stack.complete(text(21, 500), 0)
    st, other_file = stack.slot("save", 0, "other-node.bin", direct=True)  # a file "another node" will save
    assert st == 200, other_file
    other = (stack.slot_dir / "other-node.bin").read_bytes()
    (stack.slot_dir / "other-node.bin").unlink()
    stack.complete(text(22, 700), 0)
    assert stack.slot("save", 0, "size.bin", direct=True)[0] == 200
    size = (stack.slot_dir / "size.bin").stat().st_size
    (stack.slot_dir / "size.bin").unlink()
    room = size * 3 // 2  # this slot's file fits once, not beside a second one
    work = None
    try:
        with lf.LlamaProxy(stack.llama.url, stack.slot_dir, url, KEY_HEX, "--local-cache", str(room)) as proxy:
            work = stack.slot_dir / f".rdmakv-proxy-{proxy.proc.pid}"
            cache_dir = work / "cache"
            def slot(action: str, name: str) -> tuple[int, dict]:
                return proxy.request("POST", f"/slots/0?action={action}", {"filename": name})

            st, saved = slot("save", "hot.bin")
            assert st == 200 and saved["rdmakv"]["local_copy"] is True, saved
            assert len(list(cache_dir.iterdir())) == 1  # llama-server's file, moved in
            st, res = slot("restore", "hot.bin")
            assert st == 200 and res["rdmakv"]["source"] == "local" and res["rdmakv"]["local_verified"], res
            assert res["n_restored"] == saved["n_saved"] and res["rdmakv"]["transport"] == "local"

            # another node saves the same name: the store's version wins over the copy here
            with rdmakv.connect(url, KEY_HEX) as s:
                put_slotfile(s, "hot.bin", other, WINDOW)
            st, res = slot("restore", "hot.bin")
            assert st == 200 and res["rdmakv"]["source"] == "store", res
            assert res["n_restored"] == other_file["n_saved"] != saved["n_saved"]
            st, res = slot("restore", "hot.bin")  # what the store gave is now the local copy
            assert st == 200 and res["rdmakv"]["source"] == "local", res

            # bounded: the slot's file does not fit beside the other node's
            stack.complete(text(22, 700), 0)
            st, two = slot("save", "second.bin")
            assert st == 200 and two["rdmakv"]["local_copy"], two
            assert len(other) + size > room and len(list(cache_dir.iterdir())) == 1
            assert sum(p.stat().st_size for p in cache_dir.iterdir()) <= room
            st, res = slot("restore", "hot.bin")
            assert st == 200 and res["rdmakv"]["source"] == "store", res  # evicted, fetched again

            # deleted in the store: gone here too
            with rdmakv.connect(url, KEY_HEX) as s:
                s.delete_manifest("second.bin")
            st, res = slot("restore", "second.bin")
            assert st == 404, res

            # the store down: the copy still restores, and the report says it was not checked
            store.stop()
            st, res = slot("restore", "hot.bin")
            assert st == 200 and res["rdmakv"]["source"] == "local" and res["rdmakv"]["local_verified"] is False
            assert res["n_restored"] == other_file["n_saved"]
            store.start()
        assert stack.files() == [] and not work.exists()  # a clean exit takes its work dir along
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def test_store_pool_is_bounded_and_waits_with_a_limit(server, monkeypatch) -> None:
    import threading

    from rdmakv.llama.store_pool import PoolBusyError, StorePool

    monkeypatch.setenv("RDMAKV_AUTH_KEY", KEY_HEX)
    pool = StorePool(server.url("pool"), "tcp", 256, size=2, wait_s=0.3)
    held, release = threading.Barrier(3), threading.Event()

    def hold(store):
        held.wait(5)
        release.wait(5)
        return store

    with ThreadPoolExecutor(2) as ex:
        a, b = ex.submit(pool.run, hold), ex.submit(pool.run, hold)
        held.wait(5)  # both connections are busy
        t0 = time.monotonic()
        with pytest.raises(PoolBusyError, match="all 2 store connections stayed busy for 0.3 s"):
            pool.run(lambda s: s.stats())
        assert 0.25 < time.monotonic() - t0 < 2
        release.set()
        assert a.result() is not b.result()  # two connections, one per caller
    assert pool.run(lambda s: s.stats())["namespace"] == "pool"  # an idle one is reused
    assert pool._open == 2
    pool.close()
