"""The README's LMCache configuration, exactly as written there (YAML file and environment
variables), loaded by LMCache's own config loader, stores and retrieves through rdmakv."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from lmcache.v1.config import load_engine_config_with_overrides

from rdmakv.lmcache.cpu_engine import Model, close_engine, kv_for, make_engine, prompt, remote_connector, same_bytes

from ..conftest import ROOT

SMALL = Model(layers=4)
README_URL = "rdmakv://10.0.0.5:9900/llm"


def _readme_block(lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use with vLLM through LMCache", 1)[1]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def _works(config, url: str) -> None:
    config.max_local_cpu_size = 0.5  # the README's 5 GB is for a real node
    engine = make_engine(config, SMALL)
    try:
        conn = remote_connector(engine)
        assert conn is not None and str(conn.settings.url) == url.split("?")[0]
        tokens = prompt(41, 512)
        kv = kv_for(tokens, SMALL)
        engine.store(tokens, kv=kv)
        assert conn.wait_saves(2, timeout=60) and conn.counters["values_saved"] == 2
        out = torch.zeros_like(kv)
        assert engine.lookup(tokens) == 512 and int(engine.retrieve(tokens, kv=out).sum()) == 512
        assert same_bytes(out, kv)
    finally:
        close_engine(engine)


def test_the_readme_yaml_works_as_written(server, ns, tmp_path, monkeypatch):
    url = server.url(ns)
    path = tmp_path / "lmcache-rdmakv.yaml"
    path.write_text(_readme_block("yaml").replace(README_URL, url))
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(path))
    config = load_engine_config_with_overrides()
    assert config.remote_storage_plugins == ["rdmakv"] and config.remote_url is None
    _works(config, url)


def test_the_readme_environment_variables_work_as_written(server, ns, monkeypatch):
    url = server.url(ns)
    block = _readme_block("sh").replace(README_URL, url)
    env = subprocess.run(["bash", "-c", block + "\nenv -0"], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout  # fmt: skip
    lmcache_vars = dict(v.split("=", 1) for v in env.split("\0") if v.startswith("LMCACHE_"))
    assert set(lmcache_vars) >= {"LMCACHE_REMOTE_STORAGE_PLUGINS", "LMCACHE_EXTRA_CONFIG", "LMCACHE_CHUNK_SIZE"}
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    for k, v in lmcache_vars.items():
        monkeypatch.setenv(k, v)
    config = load_engine_config_with_overrides()
    assert config.remote_storage_plugins == ["rdmakv"]
    assert config.extra_config["remote_storage_plugin.rdmakv.url"] == url
    _works(config, url)


def test_importing_rdmakv_never_imports_lmcache():
    code = "import sys, rdmakv, rdmakv.lmcache, rdmakv.lmcache.values; assert 'lmcache' not in sys.modules, 1"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("name", ["RdmakvConnectorAdapter", "RdmakvConnector"])
def test_the_names_lmcache_looks_up_are_there(name):
    import importlib

    assert getattr(importlib.import_module("rdmakv.lmcache"), name).__name__ == name
