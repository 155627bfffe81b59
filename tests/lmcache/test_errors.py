"""What the plugin does with bad settings and with values that do not fit the engine: start-up
fails with a message that says which; a mismatching value is a miss, logged once."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from lmcache.v1.exceptions import IrrecoverableException
from lmcache.v1.storage_backend.connector import CreateConnector

import rdmakv
from rdmakv.lmcache import values
from rdmakv.lmcache.cpu_engine import Model, kv_for, metadata, prompt, rdmakv_config, remote_connector
from rdmakv.wire import manifest as mf

from ..conftest import OTHER_KEY_HEX

SMALL = Model(layers=4)


def create(url: str, **config):
    """What LMCache's RemoteBackend does at start-up for plugin "rdmakv": load the adapter the
    settings name, and build the connector."""
    loop = asyncio.new_event_loop()
    try:
        return CreateConnector("plugin://rdmakv", loop, None, rdmakv_config(url, **config), metadata(SMALL),
                               plugin_name="rdmakv")  # fmt: skip
    finally:
        loop.close()


@pytest.mark.parametrize("what,url,env,says", [
    ("wrong key", "GOOD", {"RDMAKV_AUTH_KEY": OTHER_KEY_HEX}, "refused the key from RDMAKV_AUTH_KEY for namespace"),
    ("no key", "GOOD", {"RDMAKV_AUTH_KEY": None}, "no key: set RDMAKV_AUTH_KEY"),
    ("bad key", "GOOD", {"RDMAKV_AUTH_KEY": "123"}, "RDMAKV_AUTH_KEY is not a usable key"),
    ("bad URL", "redis://127.0.0.1:6379", {}, "remote_storage_plugin.rdmakv.url='redis://127.0.0.1:6379' is not"),
    ("no URL", None, {}, "remote_storage_plugin.rdmakv.url is not set"),
    ("bad option", "GOOD?window=big", {}, "window must be a number"),
    ("no RDMA", "GOOD?transport=rdma", {}, "RDMA is unavailable"),
])  # fmt: skip
def test_settings_that_cannot_work_fail_start_up_saying_which(server, ns, monkeypatch, what, url, env, says):
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    if url is not None and url.startswith("GOOD"):
        url = server.url(ns) + url[4:]
    extra = {} if url is not None else {"remote_storage_plugin.rdmakv.url": None}
    with pytest.raises(IrrecoverableException, match="rdmakv LMCache plugin: .*" + says.replace("?", r"\?")):
        create(url or "", extra_config=extra)


def test_a_compressing_serde_is_refused(server, ns):
    with pytest.raises(IrrecoverableException, match="remote_serde='cachegen'.*use naive"):
        create(server.url(ns), remote_serde="cachegen")


def test_the_engine_starts_without_the_plugin_and_logs_why(server, ns, engines, monkeypatch, caplog):
    monkeypatch.setenv("RDMAKV_AUTH_KEY", OTHER_KEY_HEX)
    with caplog.at_level(logging.ERROR):
        eng = engines(server.url(ns), SMALL)
    assert remote_connector(eng) is None  # LMCache's own policy for a plugin that cannot start
    assert any("rdmakv LMCache plugin" in r.getMessage() and "refused the key" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def _first_key_name(eng, tokens) -> str:
    _, _, key = next(iter(eng.token_database.process_tokens(tokens)))
    return values.value_name(key.to_string()), key.to_string()


def test_a_value_from_an_engine_of_another_shape_is_a_miss_logged_once(server, ns, engines, caplog):
    url = server.url(ns)
    tokens = prompt(21, 512)
    a = engines(url, SMALL)
    a.store(tokens, kv=kv_for(tokens, SMALL))
    assert remote_connector(a).wait_saves(2, timeout=60)
    other = Model(layers=2)  # the same model name: the same keys, but not the same KV shape
    b = engines(url, other)
    with caplog.at_level(logging.WARNING, logger="rdmakv.lmcache"):
        for _ in range(2):
            out = torch.zeros(2, 2, 512, other.hidden, dtype=other.torch_dtype)
            assert int(b.retrieve(tokens, kv=out).sum()) == 0
            assert not out.any()  # nothing was written into the engine's KV
    conn = remote_connector(b)
    assert conn.counters["values_mismatched"] >= 2 and conn.counters["values_retrieved"] == 0
    said = [r.getMessage() for r in caplog.records if "shape" in r.getMessage()]
    assert len(said) == 1 and "[2, 4, 256, 128]" in said[0] and "[2, 2, 256, 128]" in said[0]


@pytest.mark.parametrize("damage,says", [
    ("kind", "not an LMCache value"),
    ("magic", "unreadable"),
    ("key", "belongs to"),
    ("length", "bytes"),
    ("header", "header"),
])  # fmt: skip
def test_a_value_whose_header_or_length_does_not_match_is_a_miss(server, ns, engines, caplog, damage, says):
    url = server.url(ns)
    tokens = prompt(22, 256)
    kv = kv_for(tokens, SMALL)
    eng = engines(url, SMALL)
    eng.store(tokens, kv=kv)
    conn = remote_connector(eng)
    assert conn.wait_saves(1, timeout=60)
    name, key_string = _first_key_name(eng, tokens)
    with rdmakv.connect(url, transport="tcp") as st:
        m = st.get_manifest(name)
        body = values.decode_body(m.body)
        chunks = [bytes(c) for c in st.load_object(name)[1]]
        kind = mf.KIND_ENGINE
        if damage == "kind":
            kind = mf.KIND_OPAQUE
        elif damage == "magic":
            body_bytes = b"XXXX" + values.encode_body(body)[4:]
        elif damage == "key":
            body = values.Body(key_string.replace("@", "#", 1), body.header, body.window)
        elif damage == "length":
            chunks = chunks[:-1]  # the header still says the whole chunk's bytes
        elif damage == "header":
            body = values.Body(key_string, body.header[:-4], body.window)
        if damage != "magic":
            body_bytes = values.encode_body(body)
        st.save_object(name, kind, body_bytes, chunks, range(len(chunks)))
    assert eng.lookup(tokens) == 256  # it is there...
    with caplog.at_level(logging.WARNING, logger="rdmakv.lmcache"):
        out = torch.zeros_like(kv)
        assert int(eng.retrieve(tokens, kv=out).sum()) == 0  # ...but never returned
        assert int(eng.retrieve(tokens, kv=out).sum()) == 0
    assert not out.any()
    said = [r.getMessage() for r in caplog.records if "a miss" in r.getMessage()]
    assert len(said) == 1 and says in said[0], said
