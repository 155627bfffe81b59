"""An in-process server on a free loopback port with a temporary data dir (demo, bench)."""

from __future__ import annotations

import os
import shutil
import tempfile

from ...wire.auth import KEY_BYTES
from ..engine.core import Engine
from .eventloop import Server


class EmbeddedServer:
    def __init__(self, capacity: int = 2 << 30, *, transport: str = "auto", fsync: str = "manifest") -> None:
        self.key = os.urandom(KEY_BYTES)
        self.dir = tempfile.mkdtemp(prefix="rdmakv-embedded-")
        self.engine = Engine(self.dir, capacity, fsync=fsync)
        self.engine.open()
        self.rdma_reason = "disabled"
        exporter = None
        if transport != "tcp":
            from .rdma_exporter import make_exporter

            exporter, self.rdma_reason = make_exporter(self.engine)
        self.server = Server(self.engine, self.key, "127.0.0.1", 0, rdma=exporter, log=lambda _: None).start()

    def url(self, namespace: str) -> str:
        return f"{self.server.url_base}/{namespace}"

    def close(self) -> None:
        self.server.stop()
        self.engine.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
