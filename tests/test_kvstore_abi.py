"""libkv_store_rdmakv.so from C and from ctypes, against a real server: what the chunked-save
engine does (dlopen through KV_STORE_LIBRARY_PATH, put chunks then its manifest, restore by
get_manifest + prefetch + get_chunk), round trips counted by the server, every error case."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rdmakv
from bench import kvstore_abi as ka
from rdmakv.llama import kvstore_lib
from rdmakv.wire import manifest as mf

from .conftest import KEY_HEX, OTHER_KEY_HEX, ServerProcess

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
CTYPES_CONSUMER = Path(__file__).parent / "kvstore_abi" / "consumer_ctypes.py"


@pytest.fixture(scope="module")
def abi(tmp_path_factory):
    """The library as `rdmakv kvstore-lib build --out DIR` makes it, the consumer, and sessions."""
    d = tmp_path_factory.mktemp("kvstore")
    out = subprocess.run([sys.executable, "-m", "rdmakv", "kvstore-lib", "build", "--out", str(d / "lib")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    lib = Path(out.stdout.strip())
    assert lib.name == "libkv_store_rdmakv.so" and lib.exists()
    path = subprocess.run([sys.executable, "-m", "rdmakv", "kvstore-lib", "path", "--out", str(d / "lib")],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert Path(path) == lib.parent
    sessions = ka.write_sessions(d / "sessions.bin", [ka.session_chunks(seed) for seed in (1, 2, 3)])
    return {"lib": lib.parent, "consumer": ka.compile_consumer(d / "consumer"), "sessions": sessions, "dir": d}


ENV = {"RDMAKV_AUTH_KEY": KEY_HEX}


def consumer(abi, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return ka.run(abi["consumer"], abi["lib"], *args, env={**ENV, **(env or {})})


def data_requests(st) -> int:
    """Requests the server counted for the namespace, leaving out the STATS that ask."""
    return sum(n for op, n in st.stats()["requests"].items() if op != "STATS")


def lines(p: subprocess.CompletedProcess) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in p.stdout.strip().splitlines() if " " in line)


def test_cold_then_warm_save_restore_and_delete_from_c(abi, server, ns):
    uri = server.url(ns)
    with rdmakv.connect(uri, key=KEY_HEX, transport="tcp") as st:
        p = consumer(abi, "save", uri, "chat", str(abi["sessions"]))
        assert p.returncode == 0, p.stderr
        cold = data_requests(st)
        assert cold >= 2  # the commit that listed the missing chunks, their upload, the commit
        m = st.get_manifest("chat")
        assert m.kind == mf.KIND_ENGINE and m.n_chunks == 192 and m.total_bytes == 3 << 20
        assert m.body[:4] == b"ENGM"  # the engine's own manifest, stored as it was given

        before = data_requests(st)
        p = consumer(abi, "save", uri, "chat", str(abi["sessions"]))
        assert p.returncode == 0, p.stderr
        assert data_requests(st) - before == 1  # warm save: one round trip, counted by the server
        assert st.stats()["requests"]["PUT_MANIFEST"] >= 3

        before = data_requests(st)
        p = consumer(abi, "restore", uri, "chat", str(abi["sessions"]))
        assert p.returncode == 0, p.stdout + p.stderr  # every chunk compared byte for byte in C
        counts = st.stats()["requests"]
        assert data_requests(st) - before == 2  # GET_MANIFEST, then the whole prefetch as one GET_CHUNKS
        assert counts["GET_CHUNKS"] == 1

        p = consumer(abi, "delete", uri, "chat")
        assert p.returncode == 0 and lines(p) == {"delete": "0", "get_after_delete": "-2"}
        assert [s["name"] for s in st.list()] == []


def test_every_bad_call_returns_its_code_and_the_handle_keeps_working(abi, server, ns):
    p = consumer(abi, "errors", server.url(ns), str(abi["sessions"]))
    assert p.returncode == 0, p.stderr
    # keys are opaque: a 7-byte key and bytes that do not hash to their key are stored as given (the
    # store keeps its own check), and a prefetch of 9-byte keys is a prefetch of keys never put
    assert lines(p) == {
        "short_hash": "0", "wrong_bytes": "0", "null_data": "-3", "unknown_manifest": "-2",
        "unknown_chunk": "-2", "null_out": "-3", "null_name": "-3", "bad_name": "-3",
        "prefetch_hash_len": "0", "delete_unknown": "-2", "after_errors_save": "0",
        "after_errors_restore": "0", "closed_handle": "-3", "null_handle": "-3",
    }  # fmt: skip
    assert "NULL data" in p.stderr and "NULL out pointer" in p.stderr  # the reasons, on stderr
    assert "unknown_manifest" not in p.stderr and "no-such-session" not in p.stderr  # a miss is no fault


def test_wrong_key_and_dead_server_give_null_or_errors_never_a_crash(abi, tmp_path, ns):
    srv = ServerProcess(str(tmp_path / "d"), "64MiB", "--fsync", "never").start()
    try:
        uri = srv.url(ns)
        p = consumer(abi, "open", uri, env={"RDMAKV_AUTH_KEY": OTHER_KEY_HEX})
        assert p.returncode == 0 and p.stdout.strip() == "open NULL"
        assert "authentication failed" in p.stderr
        p = consumer(abi, "open", uri + "?hash_alg=sha1")
        assert p.stdout.strip() == "open NULL" and "hash_alg must be one of" in p.stderr
        p = consumer(abi, "open", uri, env={"RDMAKV_AUTH_KEY": ""})
        assert p.stdout.strip() == "open NULL" and "no key" in p.stderr
        # the server dies while a handle is open: calls fail with UNREACHABLE, then work again
        code = f"""
import ctypes, os, signal, sys
sys.path.insert(0, {str(CTYPES_CONSUMER.parent)!r})
import consumer_ctypes as c
vt = c.load()
h = vt.open(b{uri!r})
assert h
os.kill({srv.pid()}, signal.SIGKILL)
print("after_kill", c.put_manifest(vt, h, b"x", b"ENGM"))
print("again", c.put_manifest(vt, h, b"x", b"ENGM"))
vt.close(h)
"""
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **ENV, "KV_STORE_LIBRARY_PATH": str(abi["lib"])})  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert lines(p) == {"after_kill": "-4", "again": "-4"}
        assert p.stderr.count("put_manifest") == 2  # distinct reasons, each said once
    finally:
        srv.stop()
    p = consumer(abi, "open", uri)  # nobody listens any more
    assert p.returncode == 0 and p.stdout.strip() == "open NULL"
    assert "open rdmakv://" in p.stderr and "refused" in p.stderr.lower()


def test_four_threads_with_own_handles_and_four_sharing_one(abi, server, ns):
    p = consumer(abi, "threads", server.url(ns), str(abi["sessions"]), "4")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip() == "threads 8 failures 0"
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        assert len(st.list()) == 32  # 8 threads x 4 rounds, each saved and restored


def test_a_python_consumer_loads_the_same_library_with_ctypes(abi, server, ns):
    p = subprocess.run([sys.executable, str(CTYPES_CONSUMER), server.url(ns), str(abi["sessions"])],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, **ENV, "KV_STORE_LIBRARY_PATH": str(abi["lib"])})  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().endswith("ctypes ok")


def test_blake3_checks_by_uri_option_and_sessions_saved_with_content_keys_still_restore(abi, server, ns):
    b3 = ka.write_sessions(abi["dir"] / "b3.bin", [ka.session_chunks(5)], hash_alg="blake3")
    for name, opt in (("b3", "?check=blake3"), ("b3-alias", "?hash_alg=blake3")):
        uri = server.url(ns) + opt
        assert consumer(abi, "save", uri, name, str(b3)).returncode == 0
        p = consumer(abi, "restore", uri, name, str(b3))
        assert p.returncode == 0, p.stderr
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        assert st.get_manifest("b3").hash_alg == 4  # opaque keys, checked by the store with BLAKE3
        # a session the library saved when kv_store keys had to be xxh3 content hashes (stored as
        # numbers): still restored by the engine's hash bytes, in either byte order
        for name, little in (("old-be", False), ("old-le", True)):
            f = ka.write_sessions(abi["dir"] / f"{name}.bin", [ka.session_chunks(6)], little_endian=little)
            chunks = ka.session_chunks(6)
            m = st.build_object(mf.KIND_ENGINE, ka.engine_manifest(f), chunks, range(len(chunks)))
            st.save_manifest(name, m, chunks)
            opt = "?hash_order=le" if little else ""
            p = consumer(abi, "restore", server.url(ns) + opt, name, str(f))
            assert p.returncode == 0, p.stdout + p.stderr


def test_the_library_takes_the_namespace_key_from_a_keys_file(abi, tmp_path, ns):
    from rdmakv.wire.keyring import new_entry

    keys = tmp_path / "keys.toml"
    keys.write_text(new_entry(ns) + new_entry("someone-else"))
    srv = ServerProcess(str(tmp_path / "d"), "64MiB", "--fsync", "never", "--keys", str(keys)).start()
    try:
        env = {"RDMAKV_AUTH_KEY": "", "RDMAKV_KEY_FILE": str(keys)}
        p = consumer(abi, "save", srv.url(ns), "k", str(abi["sessions"]), env=env)
        assert p.returncode == 0, p.stderr
        p = consumer(abi, "open", srv.url("not-in-the-file"), env=env)
        assert p.stdout.strip() == "open NULL" and "no valid [[key]] for namespace" in p.stderr
    finally:
        srv.stop()
    assert kvstore_lib.LIB_NAME == "libkv_store_rdmakv.so"


# -- the consumer pattern of a paged prefix cache (tests/kvstore_abi/chain_consumer.py) -------------
CHAIN_CONSUMER = Path(__file__).parent / "kvstore_abi" / "chain_consumer.py"


def chain(abi, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **ENV, **(env or {}), "KV_STORE_LIBRARY_PATH": str(abi["lib"])}
    return subprocess.run([sys.executable, str(CHAIN_CONSUMER), *args], capture_output=True, text=True,
                          timeout=300, env=e)  # fmt: skip


def test_chain_keys_and_sentinel_manifests_every_block_reads_back_by_key(abi, server, ns):
    uri = server.url(ns)
    p = chain(abi, uri, "64")
    assert p.returncode == 0, p.stdout + p.stderr
    assert lines(p) == {"put_failures": "0", "read_back": "64", "read_rc": "0", "chain": "ok"}
    with rdmakv.connect(uri, key=KEY_HEX, transport="tcp") as st:
        s = st.stats()
        assert [x["name"] for x in st.list()] == ["__prefix_index__"]
        assert s["orphan_chunks"] == 63 and s["orphan_bytes"] == 63 * (16 << 10)  # kept, as cache
        assert st.get_manifest("__prefix_index__").body == b""  # empty bodies are valid
    # another process, another handle: read by key with one prefetch, then the same by get_chunk alone
    for extra in (["--prefetch"], []):
        p = chain(abi, uri, "64", "--read-only", *extra)
        assert p.returncode == 0, p.stdout + p.stderr


def test_loaded_as_the_reference_backend_with_memkv_urls_and_its_key_variable(abi, server, ns):
    assert (abi["lib"] / "libkv_store_memkv.so").resolve() == (abi["lib"] / "libkv_store_rdmakv.so").resolve()
    uri = server.url(ns).replace("rdmakv://", "memkv://")
    env = {"RDMAKV_AUTH_KEY": "", "MEMKV_AUTH_KEY": KEY_HEX}
    p = chain(abi, uri, "64", "--lib", "memkv", "--prefetch", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    p = chain(abi, uri, "8", "--lib", "memkv", env={"RDMAKV_AUTH_KEY": "", "MEMKV_AUTH_KEY": OTHER_KEY_HEX})
    assert p.stdout.strip() == "open NULL" and "authentication failed" in p.stderr
    p = chain(abi, uri.replace("memkv://", "memkvx://"), "8", "--lib", "memkv", env=env)
    assert p.stdout.strip() == "open NULL" and "unknown scheme 'memkvx'" in p.stderr


def test_chain_consumer_bad_calls_each_get_their_code(abi, server, ns):
    p = chain(abi, server.url(ns), "0", "--errors")
    assert p.returncode == 0, p.stderr
    assert lines(p) == {
        "key_0_bytes": "-3", "key_65_bytes": "-3", "key_64_bytes": "0", "key_1_byte": "0", "null_key": "-3",
        "chunk_over_max": "-3", "empty_chunk": "-3", "null_name": "-3", "unterminated_name": "-3",
        "empty_body_sentinel": "0", "never_put": "-2", "get_key_0_bytes": "-3", "get_1_byte_key": "0",
        "get_64_byte_key": "0", "prefetch_65_byte_keys": "-3",
    }  # fmt: skip
    for reason in ("a key is 1..64 bytes, got 0", "got 65", "NULL key", "chunk of 2147483649 bytes",
                   "NULL name", "name longer than 255 bytes"):  # fmt: skip
        assert reason in p.stderr, reason
    assert "never_put" not in p.stderr and "not stored" not in p.stderr  # a miss is an answer, not logged


def test_two_handles_in_two_threads_put_the_same_keys_at_once(abi, server, ns):
    p = chain(abi, server.url(ns), "32", "--threads")
    assert p.returncode == 0, p.stderr
    assert lines(p) == {"thread_failures": "0", "read_back": "32", "read_rc": "0"}
    with rdmakv.connect(server.url(ns), key=KEY_HEX, transport="tcp") as st:
        assert st.stats()["chunks"] == 32  # each block stored once


def test_the_server_dying_mid_use_is_unreachable_then_the_handle_reconnects(abi, tmp_path, ns):
    srv = ServerProcess(str(tmp_path / "d"), "64MiB", "--fsync", "always").start()
    port = srv.port
    code = f"""
import os, signal, sys, time
sys.path.insert(0, {str(CHAIN_CONSUMER.parent)!r})
import chain_consumer as cc
from consumer_ctypes import get_chunk
vt = cc.load("rdmakv")
h = vt.open(b{srv.url(ns)!r})
items = cc.blocks(4)
print("put", sum(cc.put_all(vt, h, items)))
os.kill({srv.pid()}, signal.SIGKILL)
print("dead", get_chunk(vt, h, b"z" * 32)[0])
print("still_dead", vt.put_manifest(h, cc.SENTINEL, b"", 0))
sys.stdout.flush()
open({str(tmp_path / "killed")!r}, "w").close()
while not os.path.exists({str(tmp_path / "restarted")!r}):
    time.sleep(0.05)
key, data = items[-1]  # the block the sentinel names survives a restart (orphans are cache: they do not)
rc, got = get_chunk(vt, h, key)
print("after_restart", rc, got == data)
vt.close(h)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV, "KV_STORE_LIBRARY_PATH": str(abi["lib"])})  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "killed").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        srv.proc.wait()
        srv.start()  # the same data dir and port
        assert srv.port == port
        (tmp_path / "restarted").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        srv.stop()
    assert lines(subprocess.CompletedProcess([], 0, out, err)) == {
        "put": "0", "dead": "-4", "still_dead": "-4", "after_restart": "0 True"}, err
