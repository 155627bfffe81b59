"""Run `rdmakv serve` as a child process (tests and benchmarks talk to a real server process)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time


class ServerProcess:
    """`python -m rdmakv serve` on ``host`` (127.0.0.1 by default); restartable on the same data dir."""

    def __init__(self, data_dir: str, capacity: str = "256MiB", *extra: str, key_hex: str, port: int = 0,
                 host: str = "127.0.0.1") -> None:  # fmt: skip
        self.host = host
        self.data_dir = data_dir
        self.capacity = capacity
        self.extra = list(extra)
        self.key_hex = key_hex
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []
        self.start_prefix: list[str] = []  # e.g. ["prlimit", "--nofile=300:300"]

    def start(self, timeout: float = 60.0) -> ServerProcess:
        env = dict(os.environ, RDMAKV_AUTH_KEY=self.key_hex, PYTHONUNBUFFERED="1")
        cmd = [
            *self.start_prefix,
            sys.executable, "-m", "rdmakv", "serve",
            "--listen", f"{self.host}:{self.port}",
            "--data-dir", self.data_dir,
            "--capacity", self.capacity,
            *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("server exited during start-up:\n" + "".join(self.log))
            self.log.append(line)
            m = re.search(rf"listening on rdmakv://{re.escape(self.host)}:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        raise RuntimeError(f"server did not start in {timeout} s")

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def rdma(self) -> bool:
        return any("rdma=on" in line for line in self.log)

    def url(self, ns: str = "test") -> str:
        return f"rdmakv://{self.host}:{self.port}/{ns}"

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_ticks(self) -> int:
        """user + system CPU of the server process, in clock ticks (from /proc)."""
        with open(f"/proc/{self.pid()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

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
