"""Every error a client can see has a code of its own, and a server's internal error reaches the
client as an id, with the detail only in the server's log."""

from __future__ import annotations

import importlib
import os
import pkgutil

import numpy as np
import pytest

import rdmakv
from fallback_tcp.framed import raise_error_frame
from rdmakv import errors
from rdmakv.store.engine.core import Engine
from rdmakv.store.server.eventloop import Server
from rdmakv.store.server.limits import ServerLimits
from rdmakv.wire import messages as msg
from rdmakv.wire.frames import MessageAssembler
from rdmakv.wire.protocol import FLAG_MORE

# subclasses that share their parent's code on purpose (what the client sees is the parent)
SHARED = {"SaveMustWait": errors.BusyError}  # a parked save whose wait ran out is answered BUSY
NEEDS_EXTRA = ("rdmakv.lmcache.connector", "rdmakv.lmcache.cpu_engine")


def _every_error_class() -> list[type[errors.RdmakvError]]:
    for pkg in ("rdmakv", "fallback_tcp", "slab"):
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            if info.name.endswith("__main__") or info.name in NEEDS_EXTRA:
                continue
            importlib.import_module(info.name)
    found, todo = [], [errors.RdmakvError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def test_every_error_has_a_code_of_its_own() -> None:
    seen: dict[int, str] = {}
    for cls in _every_error_class():
        if cls.__name__ in SHARED:
            assert cls.code == SHARED[cls.__name__].code
            continue
        assert cls.code not in seen, f"{cls.__module__}.{cls.__name__} has code {cls.code}, as {seen.get(cls.code)}"
        seen[cls.code] = f"{cls.__module__}.{cls.__name__}"
    assert len(seen) >= 28


@pytest.mark.parametrize("code", sorted(errors.ERRORS_BY_CODE))
def test_an_error_frame_names_the_class_its_code_names(code: int) -> None:
    cls = errors.ERRORS_BY_CODE[code]
    with pytest.raises(cls) as info:
        raise_error_frame(memoryview(msg.enc_error(code, "what went wrong")))
    assert type(info.value) is cls and "what went wrong" in str(info.value)


def test_rdma_and_cluster_errors_keep_their_old_import_paths() -> None:
    from rdmakv.cluster.membership import ClusterError
    from rdmakv.rdma.errors import RdmaError, RdmaUnavailable

    assert ClusterError is errors.ClusterError and RdmaError is errors.RdmaError
    assert issubclass(RdmaUnavailable, RdmaError) and RdmaUnavailable.code != RdmaError.code


def test_an_internal_error_reaches_the_client_as_an_id_only(tmp_path) -> None:
    """A bug in a handler (here: the engine's EXISTS made to fail with a detail a client must
    not see) answers "internal error (id X)"; the log line with X has the detail."""
    said: list[str] = []
    key = os.urandom(32)
    engine = Engine(tmp_path / "d", 64 << 20)
    engine.open(background=False)
    server = Server(engine, key, "127.0.0.1", 0, log=said.append).start()

    def broken_exists(ns_name: str, keys: np.ndarray) -> np.ndarray:
        raise RuntimeError("secret detail: /var/lib/rdmakv/seg-7 at offset 4096")

    engine.exists = broken_exists  # type: ignore[method-assign]
    try:
        with rdmakv.connect(f"{server.url_base}/ns", key=key.hex(), transport="tcp") as st:
            with pytest.raises(errors.ServerError) as info:
                st.exists([1, 2, 3])
            text = str(info.value)
            assert text.startswith("internal error (id ") and "secret" not in text and "RuntimeError" not in text
            error_id = text.removeprefix("internal error (id ").rstrip(")")
            assert st.stats()["store"]["internal_errors"] == 1  # the connection goes on
        lines = [line for line in said if error_id in line]
        assert len(lines) == 1 and "secret detail" in lines[0] and "internal error" in lines[0]
        assert server.internal_errors == 1
    finally:
        server.stop()
        engine.close()


def test_a_bug_outside_a_handler_answers_an_internal_error_id(tmp_path, monkeypatch) -> None:
    """A bug in the worker's frame handling, before any handler runs (here: joining a continued
    message fails, as a mapping that could not grow did): the client is told "internal error
    (id X)" and why the connection closes, not a bare reset; the log line with X has the detail."""
    said: list[str] = []
    key = os.urandom(32)
    engine = Engine(tmp_path / "d", 64 << 20)
    engine.open(background=False)
    server = Server(engine, key, "127.0.0.1", 0, limits=ServerLimits(max_frame=1 << 20), log=said.append).start()
    joining = MessageAssembler.add

    def broken_add(self, h, payload, owned=None):
        if self.pending and not h.flags & FLAG_MORE:  # the last part: all was read, the close is clean
            raise RuntimeError("secret detail: mremap refused")
        return joining(self, h, payload, owned)

    monkeypatch.setattr(MessageAssembler, "add", broken_add)
    try:
        with rdmakv.connect(f"{server.url_base}/ns", key=key.hex(), transport="tcp") as st:
            with pytest.raises(errors.ServerError) as info:
                st.put_blob("big", bytes(3 << 20))
        text = str(info.value)
        assert "internal error (id " in text and "secret" not in text
        error_id = text.split("internal error (id ", 1)[1].split(")", 1)[0]
        lines = [line for line in said if error_id in line]
        assert len(lines) == 1 and "secret detail" in lines[0]
        assert server.internal_errors == 1
    finally:
        server.stop()
        engine.close()


def test_without_pyverbs_the_reason_is_said_once() -> None:
    """A machine without pyverbs: the server's and the client's probe say so once, not wrapped
    in itself (`./dev demo` printed "pyverbs is not importable (pyverbs is not importable (...")."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['pyverbs'] = None\n"
            "from rdmakv.rdma.device import probe_device\n"
            "from rdmakv.store.server.embedded import EmbeddedServer\n"
            "s = EmbeddedServer(16 << 20)\n"
            "print(probe_device()[1]); print(s.rdma_reason); s.close()\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():
        assert line.count("pyverbs is not importable") == 1, line
