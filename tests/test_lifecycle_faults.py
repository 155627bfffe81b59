"""The store under faults an operator meets: a full disk, a second server on the same data dir,
SIGTERM, a restart with less memory. Real `rdmakv serve` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

import rdmakv
from rdmakv import kvgen
from rdmakv.errors import DiskFullError, RdmakvError, StoreFullError
from rdmakv.kvgen import ModelShape

from .conftest import KEY_HEX, ServerProcess

SHAPE = ModelShape("faults", 4, 128, 128)


def _kv(seed: int, n: int = 200) -> rdmakv.KVState:
    return kvgen.generate(kvgen.token_stream(seed, n), SHAPE)


def _connect(srv, ns: str = "f") -> rdmakv.Store:
    return rdmakv.connect(srv.url(ns), key=KEY_HEX, transport="tcp", window=32)


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs: a data dir on a filesystem smaller than the store's disk budget."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path, leave: int) -> None:
    """Fill the filesystem under ``path`` with a file, leaving about ``leave`` bytes free."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(path / "filler", "wb") as f:
        block = b"\xee" * (1 << 20)
        while free - f.tell() > leave + (1 << 20):
            f.write(block)
        f.write(b"\xee" * max(0, free - f.tell() - leave))


def test_a_full_disk_is_a_clear_error_and_loses_nothing_acknowledged(small_fs):
    data = small_fs / "data"
    srv = ServerProcess(str(data), "64MiB", "--disk-capacity", "1GiB").start()
    assert any("less than --disk-capacity" in line for line in srv.log)  # warned at start-up
    acked: dict[str, rdmakv.KVState] = {}
    try:
        with _connect(srv) as st:
            # 1. unpinned saves never hit the filesystem's end: the store evicts first
            for i in range(80):
                st.save(f"u{i}", _kv(i))
            assert st.stats()["evictions"] > 0
            # 2. another program fills the filesystem: a save gets DISK_FULL, nothing else
            _fill(small_fs, leave=256 << 10)
            with pytest.raises(DiskFullError, match="disk full"):
                for i in range(40):
                    kv = _kv(1000 + i)
                    st.save(f"d{i}", kv, pin=True)
                    acked[f"d{i}"] = kv
            # 3. deletes still work on a full disk, and free room once the filler is gone
            for r in st.list():
                if r["name"].startswith("u"):
                    st.delete_manifest(r["name"])
            (small_fs / "filler").unlink()
            st.compact()
            for i in range(5):
                kv = _kv(2000 + i)
                st.save(f"after{i}", kv)
                acked[f"after{i}"] = kv
    except RdmakvError as e:
        assert isinstance(e, (DiskFullError, StoreFullError)), f"not a clear error: {e!r}"
        raise
    finally:
        srv.stop()
    srv.start()
    with _connect(srv) as st:
        for name, kv in acked.items():
            assert st.restore(name).equals(kv), name
    srv.stop()


def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path):
    first = ServerProcess(str(tmp_path / "d"), "16MiB").start()
    try:
        with pytest.raises(RuntimeError, match=rf"in use by another rdmakv server \(pid {first.pid()}\)"):
            ServerProcess(str(tmp_path / "d"), "16MiB").start()
        with _connect(first) as st:  # the first one is untouched
            st.save("x", _kv(1))
    finally:
        first.stop()


def test_sigterm_finishes_requests_and_closes_the_log(tmp_path):
    srv = ServerProcess(str(tmp_path / "d"), "64MiB").start()
    acked: dict[str, rdmakv.KVState] = {}
    stop = threading.Event()

    def saver() -> None:
        try:
            with _connect(srv) as st:
                i = 0
                while not stop.is_set():
                    kv = _kv(i % 7, 100 + i % 50)
                    st.save(f"s{i}", kv)
                    acked[f"s{i}"] = kv
                    i += 1
        except (RdmakvError, OSError):
            pass

    t = threading.Thread(target=saver)
    t.start()
    time.sleep(1.0)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(20) == 0
    stop.set()
    t.join(30)
    assert any("stopped (log synced and closed)" in line for line in srv.log), srv.log[-5:]
    assert acked
    srv.start()
    with _connect(srv) as st:
        for name, kv in acked.items():
            assert st.restore(name).equals(kv), name
    srv.stop()


def test_a_restart_with_less_memory_demotes_instead_of_crashing(tmp_path):
    srv = ServerProcess(str(tmp_path / "d"), "32MiB").start()
    kvs = {f"s{i}": _kv(50 + i) for i in range(30)}  # 12 MiB
    with _connect(srv) as st:
        for name, kv in kvs.items():
            st.save(name, kv, pin=name == "s0")
    srv.stop()
    srv.capacity = "4MiB"
    srv.start()
    with _connect(srv) as st:
        stats = st.stats()
        assert stats["demoted_sessions"] > 0 and stats["used_bytes"] <= 4 << 20
        for name, kv in kvs.items():
            assert st.restore(name).equals(kv), name
    srv.stop()
