"""The byte-rate floor (--min-frame-rate) blames only clients: the time a server spends not
reading a connection is its own."""

from __future__ import annotations

import os
import time

import rdmakv
from rdmakv.store.engine.core import Engine
from rdmakv.store.server.eventloop import Server


def test_a_server_short_of_cpu_does_not_blame_its_client_for_slow_bytes(tmp_path, monkeypatch) -> None:
    """The byte-rate floor counts only the time the server is reading: while a worker holds the
    connection (here each frame's worker is made 0.15 s slow, as on a starved CPU), the client's
    bytes wait in the socket, and that wait is not the client's."""
    from rdmakv.store.server import connection
    from rdmakv.store.server.limits import ServerLimits

    serve = connection.Connection.serve

    def starved(self, frame):  # type: ignore[no-untyped-def]
        time.sleep(0.15)
        return serve(self, frame)

    monkeypatch.setattr(connection.Connection, "serve", starved)
    key = os.urandom(32)
    engine = Engine(tmp_path / "d", 64 << 20)
    engine.open(background=False)
    limits = ServerLimits(max_frame=64 << 10, min_frame_rate=1 << 20, frame_grace=0.5)
    server = Server(engine, key, "127.0.0.1", 0, limits=limits, log=lambda _: None).start()
    try:
        with rdmakv.connect(f"{server.url_base}/ns", key=key.hex(), transport="tcp") as st:
            blob = os.urandom(1 << 20)  # 16+ frames of 64 KiB: ~2.5 s of worker time, beyond the grace
            st.put_blob("big", blob)
            assert st.get_blob("big") == blob
        assert server.slow_closed == 0
    finally:
        server.stop()
        engine.close()
