"""The frame MAC a client asks for by default (Poly1305) and what it does with a server that does
not know it: a real server of the release before Poly1305, run from its own git tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import rdmakv
from rdmakv import kvgen
from rdmakv.store.server.spawn import ServerProcess
from rdmakv.wire.protocol import MAC_BLAKE3, MAC_HMAC_SHA256, MAC_POLY1305

REPO = Path(__file__).resolve().parent.parent
BEFORE_POLY1305 = "13bd526"  # main just before the Poly1305 frame MAC: its server knows MACs 1 and 2


def _old_tree(tmp_path: Path) -> Path:
    have = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{BEFORE_POLY1305}^{{commit}}"],
                          capture_output=True, check=False)  # fmt: skip
    if have.returncode != 0:
        pytest.skip(f"this checkout has no commit {BEFORE_POLY1305} (a shallow clone?): no older server to run")
    tree = tmp_path / "old"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_POLY1305, "rdmakv", "slab", "fallback_tcp"],
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def _session() -> rdmakv.KVState:
    tokens = kvgen.token_stream(5, 300)
    return kvgen.generate(tokens, kvgen.ModelShape("tiny", 2, 16, 16))


def test_a_new_client_speaks_poly1305_to_a_new_server(server, ns, key):
    with rdmakv.connect(server.url(ns), key=key, transport="tcp") as st:
        assert st.channel.mac == MAC_POLY1305
        kv = _session()
        st.save("a", kv)
        assert st.restore("a").equals(kv)
    with rdmakv.connect(server.url(ns), key=key, transport="tcp", mac="hmac-sha256") as st:
        assert st.channel.mac == MAC_HMAC_SHA256 and st.restore("a").equals(kv)


def test_a_new_client_falls_back_to_blake3_with_a_server_that_knows_no_poly1305(tmp_path):
    key = os.urandom(32).hex()
    old = ServerProcess(str(tmp_path / "data"), "64MiB", key_hex=key)
    tree = _old_tree(tmp_path)
    old.start_prefix = ["env", "-C", str(tree), f"PYTHONPATH={tree}"]  # (python -m puts the cwd first)
    old.start()
    try:
        with rdmakv.connect(old.url("compat"), key=key, transport="tcp") as st:
            assert st.channel.mac == MAC_BLAKE3
            kv = _session()
            st.save("a", kv)
            assert st.restore("a").equals(kv)
    finally:
        old.stop()
