"""A real etcd (Debian's etcd-server) on loopback, for the cluster tests, benchmarks and guests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """One etcd member with its data dir; ``host`` is where clients reach it (loopback by default;
    the first two-node guest uses its link address)."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1") -> None:
        self.dir = Path(data_dir)
        self.host = host
        self.port, self.peer = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Etcd:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd not installed (apt-get install etcd-server; ./dev test does it)")
        client, peer = f"http://{self.host}:{self.port}", f"http://127.0.0.1:{self.peer}"
        log = open(self.dir.parent / f"etcd-{self.port}.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [binary, "--name", "t", "--data-dir", str(self.dir), "--listen-client-urls", client,
             "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited ({self.proc.returncode})")
            time.sleep(0.1)
        raise RuntimeError("etcd not healthy after 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
