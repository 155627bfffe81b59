"""Shared fixtures: a real `rdmakv serve` process on loopback, keys, KV states."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEY_HEX = "7f" * 32
OTHER_KEY_HEX = "01" * 32


class ServerProcess:
    """`python -m rdmakv serve` in a child process; restartable on the same data dir."""

    def __init__(self, data_dir: str, capacity: str = "256MiB", *extra: str, port: int = 0) -> None:
        self.data_dir = data_dir
        self.capacity = capacity
        self.extra = list(extra)
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []

    def start(self) -> ServerProcess:
        env = dict(os.environ, RDMAKV_AUTH_KEY=KEY_HEX, PYTHONUNBUFFERED="1")
        cmd = [
            sys.executable, "-m", "rdmakv", "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--data-dir", self.data_dir,
            "--capacity", self.capacity,
            *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        deadline = time.monotonic() + 30
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("server exited during start-up:\n" + "".join(self.log))
            self.log.append(line)
            m = re.search(r"listening on rdmakv://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                import threading

                threading.Thread(target=self._drain, daemon=True).start()
                return self
        raise RuntimeError("server did not start in 30 s")

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def url(self, ns: str = "test") -> str:
        return f"rdmakv://127.0.0.1:{self.port}/{ns}"

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill9()

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@pytest.fixture(scope="session")
def server():
    with tempfile.TemporaryDirectory(prefix="rdmakv-test-") as d:
        srv = ServerProcess(d, "512MiB", "--fsync", "never").start()
        yield srv
        srv.stop()


@pytest.fixture
def fresh_server(tmp_path):
    servers: list[ServerProcess] = []

    def make(capacity: str = "256MiB", *extra: str) -> ServerProcess:
        srv = ServerProcess(str(tmp_path / f"data{len(servers)}"), capacity, *extra).start()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def key() -> str:
    return KEY_HEX


_ns_counter = [0]


@pytest.fixture
def ns(request) -> str:
    """A namespace unique to the test, so tests sharing the session server never interfere."""
    _ns_counter[0] += 1
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:200] + f"-{_ns_counter[0]}"
