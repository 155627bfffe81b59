"""Shared fixtures: a real `rdmakv serve` process on loopback, keys, KV states."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest

from rdmakv.store.server.spawn import ServerProcess as _ServerProcess

ROOT = Path(__file__).resolve().parents[1]
KEY_HEX = "7f" * 32
OTHER_KEY_HEX = "01" * 32


class ServerProcess(_ServerProcess):
    def __init__(self, data_dir: str, capacity: str = "256MiB", *extra: str, port: int = 0,
                 host: str = "127.0.0.1") -> None:  # fmt: skip
        super().__init__(data_dir, capacity, *extra, key_hex=KEY_HEX, port=port, host=host)


@pytest.fixture(scope="module")
def server_bin() -> Path:
    """The cached real llama-server binary (tests/build_llama_server.sh builds it)."""
    from bench import llama_harness as lf

    binary = lf.find_llama_server()
    if binary is None:
        pytest.skip("llama-server not built: run tests/build_llama_server.sh (about 6 min on 2 cores)")
    return binary


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' random-weight llama GGUF (written once per module)."""
    from bench import llama_harness as lf

    pytest.importorskip("gguf", reason="the gguf package writes the test model")
    pytest.importorskip("aiohttp", reason="the proxy needs aiohttp")
    return lf.write_tiny_llama_gguf(tmp_path_factory.mktemp("model") / "tiny-llama.gguf")


def request_counts(url: str) -> dict[str, int]:
    """What the server counted for the URL's namespace, per op (STATS ``requests``)."""
    import rdmakv

    with rdmakv.connect(url, key=KEY_HEX, transport="tcp") as st:
        return dict(st.stats()["requests"])


def exit_code_in_a_child(body) -> int:
    """Run ``body()`` in a forked child and return its exit code (``body``'s return value; 1 if it
    raised). SIGXFSZ is ignored there, so a file-size limit the child sets (RLIMIT_FSIZE) makes a
    write fail with EFBIG, as a full disk would, instead of killing it."""
    import signal

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        code = 1
        try:
            code = body()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run_concurrently(worker, n: int) -> list[BaseException]:
    """Run worker(0..n-1) on n threads; the exceptions they raised (empty = all passed)."""
    import threading

    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            worker(i)
        except Exception as e:  # noqa: BLE001 - collected and asserted on by the caller
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


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
def etcd(tmp_path):
    """A real etcd (Debian's etcd-server) on loopback, for the cluster tests."""
    from rdmakv.cluster.etcd_server import Etcd

    e = Etcd(tmp_path / "etcd").start()
    yield e
    e.stop()


@pytest.fixture
def key() -> str:
    return KEY_HEX


_ns_counter = [0]


@pytest.fixture
def ns(request) -> str:
    """A namespace unique to the test, so tests sharing the session server never interfere."""
    _ns_counter[0] += 1
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:200] + f"-{_ns_counter[0]}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Where a suite is required (./dev test sets RDMAKV_REQUIRE_LLAMA=1), a skip is a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("RDMAKV_REQUIRE_LLAMA") and item.get_closest_marker("llama"):
        report.outcome = "failed"
        report.longrepr = f"required llama.cpp test was skipped: {report.longrepr}"
