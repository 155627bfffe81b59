"""`rdmakv llama-proxy --auto-cache` with a real llama-server and a real `rdmakv serve`.

Every process is real (the tiny random-weight GGUF keeps it quick). Answers are limited to
letters with a logit bias, so that an answer sent back as the next turn's history tokenizes
into the very tokens the model generated (random bytes would not round-trip through UTF-8).
"""

from __future__ import annotations

import http.client
import json
import random
import re
import string
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import rdmakv
from bench import llama_harness as lf
from rdmakv.llama import prefix_entry as pe
from rdmakv.llama import prefix_store as ps
from rdmakv.llama import slotfile

from .conftest import KEY_HEX

pytestmark = pytest.mark.llama

W = 256  # the proxy's default window
LETTERS = [lf.N_SPECIAL + ord(c) for c in string.ascii_lowercase]
LETTERS_ONLY = [[t, False] for t in range(lf.N_VOCAB) if t not in LETTERS]


def text(seed: int, n: int) -> str:
    return "".join(random.Random(seed).choices(string.ascii_lowercase, k=n))


class Stack:
    """llama-server and an auto-cache proxy (with its /metrics) on one slot dir."""

    def __init__(self, tmp: Path, binary: Path, model: Path, store_url: str, *llama_args: str,
                 auto: bool = True, n_ctx: int = 8192) -> None:  # fmt: skip
        self.slot_dir = tmp / "slots"
        self.slot_dir.mkdir(parents=True, exist_ok=True)
        self.store_url = store_url
        self.llama = lf.LlamaServer(binary, model, self.slot_dir, *llama_args, n_ctx=n_ctx).__enter__()
        self.metrics_port = lf.free_port()
        extra = ["--auto-cache", "--metrics-listen", f"127.0.0.1:{self.metrics_port}"] if auto else []
        try:
            self.proxy = lf.LlamaProxy(self.llama.url, self.slot_dir, store_url, KEY_HEX, *extra).__enter__()
        except BaseException:
            self.llama.__exit__()
            raise

    def close(self) -> None:
        self.proxy.__exit__()
        self.llama.__exit__()

    def metric(self, name: str, labels: str = "") -> float:
        raw = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        m = re.search(rf"^{re.escape(name + labels)} (\S+)$", raw, re.M)
        return float(m.group(1)) if m else 0.0

    def wait_saves(self, n: int, timeout: float = 60) -> None:
        """Until n background saves have registered their prefixes."""
        deadline = time.monotonic() + timeout
        while self.metric("rdmakv_llama_proxy_background_saves_total", '{result="ok"}') < n:
            assert time.monotonic() < deadline, self.proxy.log_tail()
            time.sleep(0.05)

    def chat(self, messages: list[dict], via_proxy: bool = True, **extra) -> tuple[dict, dict]:
        """(response JSON, X-Rdmakv headers) of a chat completion, letters only, temperature 0."""
        body = {"messages": messages, "max_tokens": 40, "temperature": 0, "logit_bias": LETTERS_ONLY, **extra}
        port = self.proxy.port if via_proxy else self.llama.port
        return post(port, "/v1/chat/completions", body)


def post(port: int, path: str, body: dict) -> tuple[dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    raw = r.read()
    headers = {k: v for k, v in r.getheaders() if k.lower().startswith("x-rdmakv")}
    conn.close()
    assert r.status == 200, raw[:2000]
    if body.get("stream"):
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith(b"data: {")]
        return {"events": events, "timings": events[-1].get("timings", {})}, headers
    return json.loads(raw), headers


@pytest.fixture
def stack_factory(tmp_path: Path, server_bin: Path, tiny_model: Path) -> Iterator:
    made: list[Stack] = []

    def make(store_url: str, *llama_args: str, auto: bool = True, name: str = "a") -> Stack:
        made.append(Stack(tmp_path / name, server_bin, tiny_model, store_url, *llama_args, auto=auto))
        return made[-1]

    yield make
    for s in made:
        s.close()


def conversation(seed: int, system: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": text(seed, 300)}]


# --------------------------------------------------------------------------- resuming


def test_chat_resumes_after_llama_server_restart_only_with_auto_cache(stack_factory, server) -> None:
    results = {}
    for auto in (True, False):
        st = stack_factory(server.url(f"auto-restart-{auto}"), "-np", "2", auto=auto, name=f"auto-{auto}")
        turn1 = conversation(1, text(2, 400))
        first, _ = st.chat(turn1)
        answer = first["choices"][0]["message"]["content"]
        assert len(answer) == 40 and answer.isalpha()
        held = first["timings"]["prompt_n"] + first["timings"]["predicted_n"]  # prompt and answer
        if auto:
            assert first["rdmakv"]["prefix_source"] == "none"
            st.wait_saves(1)
        st.llama.restart()  # every slot empty
        turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": text(3, 50)}]
        second, headers = st.chat(turn2)
        results[auto] = (second["timings"]["cache_n"], held, second.get("rdmakv"), headers)
    cache_n, held, report, headers = results[True]
    assert held % W and cache_n >= held // W * W, results[True]  # at least the window-rounded history
    assert cache_n >= held - 1  # in fact all of it: the exact state the slot held is stored too
    assert report["prefix_source"] == "store" and report["tokens_restored"] >= cache_n
    assert headers["X-Rdmakv-Prefix-Source"] == "store" and int(headers["X-Rdmakv-Tokens-Restored"]) == cache_n
    assert results[False][0] == 0  # llama-server alone: restarted, nothing cached


def test_a_new_conversation_reuses_a_shared_system_prompt(stack_factory, server) -> None:
    st = stack_factory(server.url("auto-system-prompt"), "-np", "2")
    system = text(10, 700)
    st.chat(conversation(11, system))
    st.wait_saves(1)
    tokens = st.llama.request("POST", "/tokenize", {"content": system})[1]["tokens"]
    st.llama.restart()
    other, _ = st.chat(conversation(12, system))  # another user, the same system prompt
    assert other["rdmakv"]["prefix_source"] == "store"
    assert other["timings"]["cache_n"] >= len(tokens) // W * W >= 2 * W, other["timings"]
    # and without a restart, the slot that holds it is reused: no restore
    again, _ = st.chat(conversation(13, system))
    assert again["rdmakv"]["prefix_source"] == "slot" and again["timings"]["cache_n"] >= 2 * W
    assert st.metric("rdmakv_llama_proxy_prefix_hits_total", '{source="store"}') == 1
    assert st.metric("rdmakv_llama_proxy_prefix_hits_total", '{source="slot"}') == 1
    assert st.metric("rdmakv_llama_proxy_prefix_misses_total") == 1
    assert st.metric("rdmakv_llama_proxy_tokens_restored_total") == other["rdmakv"]["tokens_restored"]


def test_two_servers_share_one_store_and_tenants_do_not(stack_factory, server) -> None:
    url = server.url("auto-two-servers")
    one = stack_factory(url, "-np", "1", name="one")
    two = stack_factory(url, "-np", "3", name="two")  # another server, another stream count
    tenant = stack_factory(server.url("auto-other-tenant"), "-np", "1", name="tenant")
    history = conversation(20, text(21, 600))
    first, _ = one.chat(history)
    one.wait_saves(1)
    nxt = [*history, {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
           {"role": "user", "content": "andmore"}]  # fmt: skip
    reused, _ = two.chat(nxt)
    assert reused["rdmakv"]["prefix_source"] == "store" and reused["timings"]["cache_n"] >= 3 * W, reused
    alone, _ = tenant.chat(nxt)
    assert alone["rdmakv"]["prefix_source"] == "none" and alone["timings"]["cache_n"] == 0


def test_four_concurrent_conversations_each_get_their_own_prefix(stack_factory, server) -> None:
    st = stack_factory(server.url("auto-concurrent"), "-np", "4")
    systems = [text(30 + i, 500) for i in range(4)]  # distinct: a wrong prefix would not match
    histories = [conversation(40 + i, systems[i]) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        firsts = list(pool.map(lambda h: st.chat(h)[0], histories))
    assert len({f["rdmakv"]["slot"] for f in firsts}) == 4  # never two requests on one slot
    st.wait_saves(4)
    st.llama.restart()
    turns = [[*h, {"role": "assistant", "content": f["choices"][0]["message"]["content"]},
              {"role": "user", "content": text(50 + i, 30)}] for i, (h, f) in enumerate(zip(histories, firsts))]
    with ThreadPoolExecutor(4) as pool:  # two streamed, two not
        seconds = list(pool.map(lambda i: st.chat(turns[i], stream=i % 2 == 1, max_tokens=24), range(4)))
    assert len({int(h["X-Rdmakv-Slot"]) for _, h in seconds}) == 4
    for i, ((res, headers), first) in enumerate(zip(seconds, firsts)):
        held = first["timings"]["prompt_n"] + first["timings"]["predicted_n"]
        restored = int(headers["X-Rdmakv-Tokens-Restored"])
        assert restored >= held // W * W and res["timings"]["cache_n"] >= restored - 1, (i, res["timings"], headers)
        if i % 2:  # streamed: complete, and ended by llama-server's own last event
            content = "".join(e["choices"][0]["delta"].get("content") or "" for e in res["events"] if e.get("choices"))
            assert len(content) == 24 and res["events"][-1].get("timings")
        else:
            assert len(res["choices"][0]["message"]["content"]) == 24
            assert res["choices"][0]["finish_reason"] == "length"


def test_a_slot_changed_behind_the_proxy_is_not_trusted(stack_factory, server) -> None:
    st = stack_factory(server.url("auto-behind"), "-np", "1")
    history = text(90, 700)
    post(st.proxy.port, "/completion", {"prompt": history, "n_predict": 4})
    st.wait_saves(1)
    res, _ = post(st.proxy.port, "/completion", {"prompt": history + "a", "n_predict": 4})
    assert res["rdmakv"]["prefix_source"] == "slot" and res["timings"]["cache_n"] >= 700  # held: reused
    st.wait_saves(2)
    assert st.llama.request("POST", "/slots/0?action=erase")[0] == 200  # behind the proxy's back
    res, _ = post(st.proxy.port, "/completion", {"prompt": history + "b", "n_predict": 4})
    assert res["rdmakv"]["prefix_source"] == "store" and res["timings"]["cache_n"] >= 700, res["rdmakv"]


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("fa", ["on", "off"], ids=["rows", "transposed-v"])
def test_restored_kv_is_the_stored_chunks_and_the_answer_is_well_formed(stack_factory, server, fa: str) -> None:
    st = stack_factory(server.url(f"auto-exact-{fa}"), "-np", "1", "-fa", fa)
    prompt = text(60, 900)
    body = {"prompt": prompt, "n_predict": 16, "temperature": 0, "logit_bias": LETTERS_ONLY}
    post(st.proxy.port, "/completion", body)
    st.wait_saves(1)
    st.llama.restart()
    longer = dict(body, prompt=prompt + text(61, 20))
    restored, _ = post(st.proxy.port, "/completion", longer)
    assert restored["rdmakv"]["prefix_source"] == "store" and restored["timings"]["cache_n"] >= 3 * W
    assert len(restored["content"]) == 16 and restored["content"].isalpha() and restored["stop"]

    # the KV llama-server holds for the restored positions is byte for byte the stored chunks
    st.llama.request("POST", "/slots/0?action=save", {"filename": "after.bin"})
    after = slotfile.parse((st.slot_dir / "after.bin").read_bytes())
    tokens = np.array(st.llama.request("POST", "/tokenize", {"content": longer["prompt"], "add_special": True})[1][
        "tokens"], np.int32)  # fmt: skip
    h0 = _seed(st)
    with rdmakv.connect(st.store_url, KEY_HEX) as store:
        n = restored["rdmakv"]["tokens_restored"]
        found = ps.longest_prefix(store, h0, tokens[:n], W)  # the entry the proxy restored
        entry, chunks = ps.fetch_entry(store, found.name)
        assert found.length == entry.n_tokens == n
        n_win = len(pe.window_counts(entry.n_tokens, W))
        kv = [bytes(c) for c in chunks[n_win:]]
    held = pe.cut(after, W).entry(entry.n_tokens)[1][n_win:]
    assert [bytes(memoryview(c).cast("B")) for c in held] == kv

    # the same prompt prefilled by llama-server itself, at temperature 0
    st.llama.request("POST", "/slots/0?action=erase")
    direct, _ = post(st.llama.port, "/completion", dict(longer, cache_prompt=False))
    print(f"\nrestored path: {restored['content']!r}\nprefilled:     {direct['content']!r}\n"
          f"match: {restored['content'] == direct['content']}")
    assert direct["timings"]["cache_n"] == 0


def _seed(st: Stack) -> bytes:
    from rdmakv.llama import completion_request as cr
    from rdmakv.llama import prefix_names as pn

    return pn.seed(cr.model_key(st.llama.request("GET", "/v1/models")[1]), W)


def test_an_entry_holding_other_tokens_is_a_miss_not_a_wrong_restore(stack_factory, server) -> None:
    st = stack_factory(server.url("auto-collision"), "-np", "1")
    p, q = text(70, 600), text(71, 600)
    post(st.proxy.port, "/completion", {"prompt": p, "n_predict": 4, "temperature": 0})
    st.wait_saves(1)
    h0 = _seed(st)
    tok_q = np.array(st.llama.request("POST", "/tokenize", {"content": q, "add_special": True})[1]["tokens"])
    tok_p = np.array(st.llama.request("POST", "/tokenize", {"content": p, "add_special": True})[1]["tokens"])
    with rdmakv.connect(st.store_url, KEY_HEX) as store:  # p's entry under q's name: a forged collision
        name_p = ps.longest_prefix(store, h0, tok_p[: 2 * W], W).name
        from rdmakv.llama import prefix_names as pn

        name_q = pn.entry_name(pn.window_chain(h0, tok_q, W)[1])
        store.put_manifest(name_q, store.channel.get_manifest(name_p)[0])
    st.llama.restart()
    res, _ = post(st.proxy.port, "/completion", {"prompt": q, "n_predict": 4, "temperature": 0})
    assert res["rdmakv"]["stored_prefix_tokens"] == 2 * W  # found by name ...
    assert res["rdmakv"]["tokens_restored"] == 0 and res["timings"]["cache_n"] == 0  # ... refused by its tokens
    assert st.metric("rdmakv_llama_proxy_restore_failures_total", '{reason="mismatch"}') == 1
    assert "holds other tokens than the prompt" in st.proxy.log_tail()


# --------------------------------------------------------------------------- the store down


def test_store_unreachable_requests_still_work_uncached(stack_factory, fresh_server) -> None:
    store = fresh_server()
    st = stack_factory(store.url("auto-down"), "-np", "1")
    history = text(80, 600)
    post(st.proxy.port, "/completion", {"prompt": history, "n_predict": 4})
    st.wait_saves(1)
    store.stop()
    st.llama.restart()
    for i in range(3):
        # ignore_eos: the random tiny model may end or emit tokens that decode to nothing at once;
        # served in full is what says the request worked
        res, headers = post(st.proxy.port, "/completion",
                            {"prompt": history + text(81 + i, 9), "n_predict": 4, "ignore_eos": True})  # fmt: skip
        assert res["timings"]["cache_n"] == 0 if i == 0 else res["timings"]["cache_n"] > 0
        assert res["rdmakv"]["tokens_restored"] == 0 and res["timings"]["predicted_n"] == 4
    assert st.proxy.log_tail().count("unreachable") == 1  # said once
    store.start()
    st.llama.restart()
    time.sleep(2.5)  # past the retry pause
    res, _ = post(st.proxy.port, "/completion", {"prompt": history + "x", "n_predict": 4})
    assert res["rdmakv"]["prefix_source"] == "store" and res["timings"]["cache_n"] >= 2 * W
    assert "answers again" in st.proxy.log_tail()


def test_requests_it_does_not_manage_pass_through_unchanged(stack_factory, server) -> None:
    st = stack_factory(server.url("auto-bypass"), "-np", "1")
    for path, body in (
        ("/completion", b"{not json"),
        ("/completion", json.dumps({"prompt": ["one", "two"], "n_predict": 2}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "n_predict": 2, "cache_prompt": False}).encode()),
    ):
        for port in (st.proxy.port, st.llama.port):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            raw = r.read()
            if port == st.proxy.port:
                via = (r.status, r.getheader("X-Rdmakv-Slot"), "rdmakv" in raw.decode(errors="replace"))
            else:
                assert (r.status, None, False) == via, (path, body)
            conn.close()
