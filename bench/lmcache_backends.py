"""The tiers the LMCache benchmark compares, each driven through LMCache's own engine: rdmakv
(the plugin, over TCP or RDMA), LMCache's ``lm://`` server, LMCache's Redis connector against
Debian's ``redis-server``, and LMCache's local-disk backend. Each one can be started, stopped
cleanly, killed, asked how many bytes it holds, and waited on until a store has landed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from rdmakv.lmcache.cpu_engine import close_engine, engine_config, rdmakv_config, remote_connector
from rdmakv.store.server.spawn import ServerProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Tier:
    """One backend: ``config()`` for an engine, the server's life, and what it holds."""

    name = ""
    survives = ""  # what the backend promises across a restart, for the report

    def __init__(self, work: Path) -> None:
        self.work = work / self.name
        self.work.mkdir(parents=True, exist_ok=True)

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def kill(self) -> None:
        self.stop()

    def config(self, engine_no: int = 0):
        raise NotImplementedError

    def flush(self, engine) -> None:
        """Forget everything stored (untimed, between runs)."""

    def reset(self) -> None:
        """With the server stopped: remove what it keeps on disk."""

    def stored_bytes(self) -> dict:
        return {}

    def close_engine(self, engine) -> None:
        close_engine(engine)

    def wait_stored(self, engine, keys: list, expected_saves: int, timeout: float = 120.0) -> bool:
        """Until the store of ``keys`` has landed in the backend (not just left the engine)."""
        backend = self.backend(engine)
        deadline = time.monotonic() + timeout
        last = keys[-1]
        while time.monotonic() < deadline:
            if backend.contains(last) and all(backend.contains(k) for k in keys):
                return True
            time.sleep(0.001)
        return False

    def backend(self, engine):
        sb = engine.storage_manager.storage_backends
        return next(b for n, b in sb.items() if n != "LocalCPUBackend")


class Rdmakv(Tier):
    survives = "everything committed (fsync'd before it is acknowledged)"

    def __init__(self, work: Path, transport: str, key: str, window: int | None = None,
                 capacity: str = "3GiB") -> None:  # fmt: skip
        self.name = f"rdmakv-{transport}" + (f"-w{window}" if window is not None else "")
        super().__init__(work)
        self.transport, self.key = transport, key
        self.server = ServerProcess(str(self.work / "data"), capacity, "--index-entries", "65536", key_hex=key)
        self.ns = "bench"
        self.window = window  # tokens per stored piece (None: the plugin's default)

    def start(self) -> None:
        os.environ["RDMAKV_AUTH_KEY"] = self.key
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def kill(self) -> None:
        self.server.kill9()

    def url(self) -> str:
        window = f"&window={self.window}" if self.window is not None else ""
        return f"{self.server.url(self.ns)}?transport={self.transport}{window}"

    def reset(self) -> None:
        shutil.rmtree(self.server.data_dir, ignore_errors=True)

    def config(self, engine_no: int = 0):
        return rdmakv_config(self.url(), max_local_cpu_size=0.25)

    def wait_stored(self, engine, keys: list, expected_saves: int, timeout: float = 120.0) -> bool:
        return remote_connector(engine).wait_saves(expected_saves, timeout)

    def flush(self, engine) -> None:
        from rdmakv.client.store import connect as connect_node

        with connect_node(self.server.url(self.ns), key=self.key, transport="tcp") as st:
            for row in st.list():
                st.delete_manifest(row["name"])

    def stored_bytes(self) -> dict:
        from rdmakv.client.store import connect as connect_node

        with connect_node(self.server.url(self.ns), key=self.key, transport="tcp") as st:
            s = st.stats()
        return {"bytes": s["chunk_bytes"] + s["manifest_bytes"], "chunks": s["chunks"], "memory_used": s["used_bytes"],
                "disk_log": s["disk_bytes"]}  # fmt: skip


class LMServer(Tier):
    name = "lm"
    survives = "nothing (an in-memory dict in the server process)"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.values_held = _count_lm_puts()

    def start(self) -> None:
        self.values_held.clear()  # its server keeps nothing across a restart
        cmd = [sys.executable, "-m", "lmcache.v1.server", "127.0.0.1", str(self.port), "cpu"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def config(self, engine_no: int = 0):
        return engine_config(remote_url=f"lm://127.0.0.1:{self.port}", max_local_cpu_size=0.25)

    def wait_stored(self, engine, keys: list, expected_saves: int, timeout: float = 120.0) -> bool:
        backend = self.backend(engine)  # the lm connector puts one key at a time: its tasks say when
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with backend.lock:
                if not backend.put_tasks:
                    return True
            time.sleep(0.001)
        return False

    def stored_bytes(self) -> dict:
        """Its server has no LIST (commented out in 0.5.6) and RSS moves with the allocator, so: the
        value bytes PUT for distinct keys, which its server keeps one each in a dict; RSS beside."""
        rss = rss_bytes(self.proc.pid) if self.proc is not None else 0
        return {"bytes": sum(self.values_held.values()), "keys": len(self.values_held), "rss": rss}


def _count_lm_puts() -> dict[str, int]:
    """{key: value bytes} of every PUT LMCache's lm connector sends from this process."""
    from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector

    held: dict[str, int] = {}
    put = LMCServerConnector.put

    async def counted(self, key, memory_obj):
        await put(self, key, memory_obj)
        held[key.to_string()] = len(memory_obj.byte_array)

    LMCServerConnector.put = counted
    return held


class Redis(Tier):
    name = "redis"
    survives = "a clean shutdown writes an RDB snapshot (Debian's save points); a crash loses what came since the last"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.abandoned: list = []

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server)")
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.work), "--save", "3600 1",
               "--save", "300 100", "--save", "60 10000", "--appendonly", "no", "--protected-mode", "no",
               "--daemonize", "no", "--logfile", str(self.work / "redis.log")]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc)
        self._wait_loaded()

    def _wait_loaded(self, timeout: float = 600.0) -> None:
        """Until its snapshot is loaded: meanwhile it accepts connections but answers LOADING,
        which LMCache's connector takes as a miss (rdmakv's server listens once it has replayed)."""
        deadline = time.monotonic() + timeout
        while int(self._client().info("persistence").get("loading", 0)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server still loading its snapshot after {timeout} s")
            time.sleep(0.05)

    def reset(self) -> None:
        (self.work / "dump.rdb").unlink(missing_ok=True)

    def close_engine(self, engine) -> None:
        """Left open: in LMCache 0.5.6 closing the Redis connector deadlocks its event loop (its
        AsyncPQExecutor.shutdown waits, on that loop, for a job of that loop). The worker exits."""
        self.abandoned.append(engine)

    def _client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # redis-server saves its snapshot on SIGTERM
            self.proc.wait(60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def config(self, engine_no: int = 0):
        return engine_config(remote_url=f"redis://127.0.0.1:{self.port}", max_local_cpu_size=0.25)

    def flush(self, engine) -> None:
        self._client().flushall()

    def stored_bytes(self) -> dict:
        c = self._client()
        keys = list(c.scan_iter(count=1000))
        return {"bytes": sum(c.strlen(k) for k in keys), "keys": len(keys),
                "used_memory": int(c.info("memory")["used_memory"])}  # fmt: skip


class LocalDisk(Tier):
    name = "local-disk"
    survives = "nothing for a new engine: its index is in the engine process's memory"

    def dir(self, engine_no: int) -> Path:
        return self.work / f"engine{engine_no}"

    def config(self, engine_no: int = 0):
        return engine_config(local_disk=f"file://{self.dir(engine_no)}/", max_local_disk_size=8.0,
                             max_local_cpu_size=0.25)  # fmt: skip

    def flush(self, engine) -> None:
        backend = self.backend(engine)
        for key in list(backend.dict):
            backend.remove(key)

    def reset(self) -> None:
        for d in self.work.glob("engine*"):
            shutil.rmtree(d, ignore_errors=True)

    def stored_bytes(self) -> dict:
        files = [p for p in self.work.rglob("*") if p.is_file()]
        return {"bytes": sum(p.stat().st_size for p in files), "files": len(files)}
