"""The C entry points of ``libkv_store_rdmakv.so``, in Python (cffi embedding mode).

The library's init code imports this module inside the embedded interpreter and calls
``install(ffi, lib)``, which defines every ``rdmakv_kvs_*`` function the vtable points at.
Each one converts C arguments (checking NULLs and lengths first), runs the call on its
handle's backend and converts the result; nothing raises into C. A handle is a 1-byte
``malloc`` whose address keys the backend here, so a stale or double-closed handle is an
unknown key (``KV_STORE_INVALID``), never a dereference.
"""

from __future__ import annotations

import threading
from typing import Any

from .kvstore_backend import KV_INVALID, KV_NO_MEMORY, KV_OK, KVStoreBackend, say

MAX_NAME = 4096


def install(ffi: Any, lib: Any) -> None:
    handles: dict[int, KVStoreBackend] = {}
    table_lock = threading.Lock()

    def backend(h) -> KVStoreBackend | None:
        if h == ffi.NULL:
            return None
        with table_lock:
            return handles.get(int(ffi.cast("uintptr_t", h)))

    def text(p) -> str:
        if p == ffi.NULL:
            raise ValueError("NULL name")
        raw = ffi.string(p, MAX_NAME + 1)
        if len(raw) > MAX_NAME:
            raise ValueError(f"name longer than {MAX_NAME} bytes")
        return raw.decode("utf-8")

    def data_of(p, n: int) -> memoryview:
        if n == 0:
            return memoryview(b"")
        if p == ffi.NULL:
            raise ValueError("NULL data with a nonzero length")
        return memoryview(ffi.buffer(p, n))

    def outs(out, out_len) -> None:
        if out == ffi.NULL or out_len == ffi.NULL:
            raise ValueError("NULL out pointer")

    def give(out, out_len, data) -> int:
        """Hand ``data`` to C in a fresh malloc (the caller frees it)."""
        n = len(data)
        p = lib.malloc(max(n, 1))
        if p == ffi.NULL:
            return KV_NO_MEMORY
        if n:
            ffi.memmove(p, data, n)
        out[0] = ffi.cast("uint8_t *", p)
        out_len[0] = n
        return KV_OK

    def on_error(exc, value, tb) -> None:  # only reached by a bug in the glue itself
        say(f"internal error in the C glue: {exc.__name__}: {value}")

    @ffi.def_extern(onerror=on_error)
    def rdmakv_kvs_open(uri):
        try:
            b = KVStoreBackend(text(uri))
        except BaseException as e:  # noqa: BLE001 - NULL, with the reason, is the ABI's answer
            say(f"open {ffi.string(uri).decode(errors='replace') if uri != ffi.NULL else 'NULL'}: "
                f"{type(e).__name__}: {e}")  # fmt: skip
            return ffi.NULL
        token = lib.malloc(1)
        if token == ffi.NULL:
            b.close()
            return ffi.NULL
        with table_lock:
            handles[int(ffi.cast("uintptr_t", token))] = b
        return ffi.cast("kv_store_v1 *", token)

    @ffi.def_extern(onerror=on_error)
    def rdmakv_kvs_close(h):
        if h == ffi.NULL:
            return
        with table_lock:
            b = handles.pop(int(ffi.cast("uintptr_t", h)), None)
        if b is not None:
            b.close()
            lib.free(ffi.cast("void *", h))

    def entry(name: str, h, fn) -> int:
        b = backend(h)
        if b is None:
            say(f"{name}: not an open handle")
            return KV_INVALID
        return b.call(name, lambda: fn(b))

    @ffi.def_extern(error=-1, onerror=on_error)
    def rdmakv_kvs_put_chunk(h, hash_, hash_len, data, n):
        return entry("put_chunk", h, lambda b: b.put_chunk(bytes(data_of(hash_, hash_len)), data_of(data, n)))

    @ffi.def_extern(error=-1, onerror=on_error)
    def rdmakv_kvs_get_chunk(h, hash_, hash_len, out, out_len):
        def run(b: KVStoreBackend) -> int:
            outs(out, out_len)
            return give(out, out_len, b.get_chunk(bytes(data_of(hash_, hash_len))))

        return entry("get_chunk", h, run)

    @ffi.def_extern(error=-1, onerror=on_error)
    def rdmakv_kvs_put_manifest(h, name, data, n):
        return entry("put_manifest", h, lambda b: b.put_manifest(text(name), bytes(data_of(data, n))))

    @ffi.def_extern(error=-1, onerror=on_error)
    def rdmakv_kvs_get_manifest(h, name, out, out_len):
        def run(b: KVStoreBackend) -> int:
            outs(out, out_len)
            return give(out, out_len, b.get_manifest(text(name)))

        return entry("get_manifest", h, run)

    @ffi.def_extern(error=-1, onerror=on_error)
    def rdmakv_kvs_delete_manifest(h, name):
        return entry("delete_manifest", h, lambda b: b.delete_manifest(text(name)))

    @ffi.def_extern(error=-1, onerror=on_error)
    def rdmakv_kvs_prefetch_chunks(h, hashes, count, hash_len):
        def run(b: KVStoreBackend) -> int:
            if count > (1 << 20) or hash_len > 64:
                raise ValueError(f"prefetch of {count} hashes of {hash_len} bytes is out of range")
            b.prefetch_chunks(bytes(data_of(hashes, count * hash_len)), count, hash_len)
            return KV_OK  # 0 as for every other call (how many were cached is the backend's business)

        return entry("prefetch_chunks", h, run)
