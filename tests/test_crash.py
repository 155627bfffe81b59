"""kill -9 of the server while a client saves in a loop: acknowledged == durable."""

from __future__ import annotations

import random
import threading
import time

import rdmakv
from rdmakv import kvgen
from rdmakv.errors import RdmakvError
from rdmakv.kvgen import ModelShape

from .conftest import KEY_HEX

SHAPE = ModelShape("crash", 4, 64, 64)


def _kv_for(name: str) -> rdmakv.KVState:
    seed = int(name.split("-")[1]) * 1000 + int(name.split("-")[2])
    # varying lengths with a shared prefix family so dedup paths are exercised too
    return kvgen.generate(kvgen.token_stream(seed % 7, 40 + seed % 90), SHAPE)


def test_kill9_while_saving(fresh_server):
    srv = fresh_server("128MiB")  # default fsync policy: manifest commits are durable
    acked: dict[str, rdmakv.KVState] = {}
    rng = random.Random(1234)
    for rnd in range(6):
        stop = threading.Event()
        attempted: list[str] = []

        def saver(rnd: int = rnd, stop: threading.Event = stop, attempted: list[str] = attempted) -> None:
            try:
                with rdmakv.connect(srv.url("crash"), key=KEY_HEX, transport="tcp", window=16) as st:
                    i = 0
                    while not stop.is_set():
                        name = f"s-{rnd}-{i}"
                        attempted.append(name)
                        st.save(name, _kv_for(name))
                        acked[name] = _kv_for(name)
                        i += 1
            except (RdmakvError, OSError):
                pass

        t = threading.Thread(target=saver)
        t.start()
        time.sleep(rng.uniform(0.3, 1.2))
        srv.kill9()
        stop.set()
        t.join(30)
        assert not t.is_alive()
        assert attempted, "the saver never ran"
        srv.start()
        with rdmakv.connect(srv.url("crash"), key=KEY_HEX, transport="tcp") as st:
            visible = {e["name"] for e in st.list()}
            missing = set(acked) - visible
            assert not missing, f"round {rnd}: acknowledged manifests lost: {sorted(missing)[:5]}"
            for name in visible:
                # anything visible is whole: it restores bit-exact to what was being saved
                assert st.restore(name).equals(_kv_for(name)), name
    assert len(acked) >= 6
