"""The Python half of ``libkv_store_rdmakv.so`` (cffi embedding mode): the ``rdmakv_py_*`` calls the
C side (``kvstore_shim.c``) makes for everything that needs the store.

The library's init code imports this module inside the embedded interpreter and calls
``install(ffi, lib)``, which defines every ``rdmakv_py_*`` function. Each converts C arguments
(checking NULLs and lengths first), runs the call on its handle's backend and converts the result;
nothing raises into C. The C side validates handles (a stale or closed one never gets here) and
holds the handle's lock across each call. Prefetched chunks stay in buffers held here, which the C
side points into until they are dropped (``rdmakv_c_cache_drop``) or the handle closes.

Which prefetched chunks stay: those of the prefetch in progress, and of earlier ones only where the
new one asks for them again (the next turn of a conversation restores its earlier windows from
here, with no round trip). An earlier buffer none of whose chunks is asked for again is let go
before the new one is fetched, so its memory is what the new one lands in (fresh memory costs a
page fault per page), and everything is bounded by ``RDMAKV_KVSTORE_CACHE_BYTES``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..hashing import OPAQUE_WIDTH
from .kvstore_backend import KV_INVALID, KV_NO_MEMORY, KV_OK, Fetched, KVStoreBackend, Pending, say

MAX_NAME = 255  # the store's names are at most 255 bytes: an unterminated name is never read further
MAX_PREFETCH = 1 << 20  # keys in one prefetch_chunks


class _Handle:
    """A backend and the prefetch buffers the C side serves get_chunk from (oldest first)."""

    def __init__(self, backend: KVStoreBackend) -> None:
        self.backend = backend
        self.buffers: OrderedDict[int, Fetched] = OrderedDict()
        self.where: dict[bytes, int] = {}  # key (store form) -> the buffer (gen) the C side serves it from
        self.cached_bytes = 0
        self.gen = 0


def install(ffi: Any, lib: Any) -> None:
    handles: dict[int, _Handle] = {}
    table_lock = threading.Lock()

    def handle_of(h) -> _Handle | None:
        with table_lock:
            return handles.get(int(ffi.cast("uintptr_t", h)))

    def text(p) -> str:
        if p == ffi.NULL:
            raise ValueError("NULL name")
        raw = ffi.string(p, MAX_NAME + 1)
        if len(raw) > MAX_NAME:
            raise ValueError(f"name longer than {MAX_NAME} bytes (or not NUL-terminated)")
        return raw.decode("utf-8")

    def data_of(p, n: int) -> memoryview:
        if n == 0:
            return memoryview(b"")
        if p == ffi.NULL:
            raise ValueError("NULL data with a nonzero length")
        return memoryview(ffi.buffer(p, n))

    def give(out, out_len, data) -> int:
        """Hand ``data`` to C in a fresh malloc (the caller frees it)."""
        if out == ffi.NULL or out_len == ffi.NULL:
            raise ValueError("NULL out pointer")
        n = len(data)
        p = lib.malloc(max(n, 1))
        if p == ffi.NULL:
            return KV_NO_MEMORY
        if n:
            ffi.memmove(p, data, n)
        out[0] = ffi.cast("uint8_t *", p)
        out_len[0] = n
        return KV_OK

    def pending_of(h, backend: KVStoreBackend) -> Pending:
        keys, lens, offs, data = (ffi.new(t) for t in ("uint8_t **", "uint32_t **", "uint64_t **", "uint8_t **"))
        n = lib.rdmakv_c_pending(h, keys, lens, offs, data)
        if n == 0:
            return Pending(np.zeros(0, f"V{OPAQUE_WIDTH}"), np.zeros(0, np.uint32), np.zeros(0, np.uint64),
                           memoryview(b""))  # fmt: skip
        arena = max((int(o) + int(ln) for o, ln in zip(ffi.unpack(offs[0], n), ffi.unpack(lens[0], n))
                     if o != (1 << 64) - 1), default=0)  # fmt: skip
        return Pending(
            np.frombuffer(ffi.buffer(keys[0], n * OPAQUE_WIDTH), dtype=f"V{OPAQUE_WIDTH}"),
            np.frombuffer(ffi.buffer(lens[0], 4 * n), dtype=np.uint32),
            np.frombuffer(ffi.buffer(offs[0], 8 * n), dtype=np.uint64),
            memoryview(ffi.buffer(data[0], arena)) if arena else memoryview(b""),
        )

    def drop(h, hd: _Handle, gen: int) -> None:
        old = hd.buffers.pop(gen)
        lib.rdmakv_c_cache_drop(h, gen)
        hd.cached_bytes -= old.nbytes
        for i in range(len(old.lengths)):
            k = old.keys[i * OPAQUE_WIDTH : (i + 1) * OPAQUE_WIDTH]
            if hd.where.get(k) == gen:
                del hd.where[k]

    def prefetch(h, hd: _Handle, keys: np.ndarray) -> None:
        """Fetch what is not cached; let go first of buffers holding none of ``keys``."""
        asked = keys.tolist()
        keep = {hd.where[k] for k in asked if k in hd.where}
        for gen in [g for g in hd.buffers if g not in keep]:
            drop(h, hd, gen)
        missing = [k for k in asked if k not in hd.where]
        if missing:
            cache(h, hd, hd.backend.prefetch(keys if len(missing) == len(asked) else np.array(missing, keys.dtype)))

    def cache(h, hd: _Handle, fetched: list[Fetched]) -> None:
        """Point the C side's table at freshly fetched buffers; drop the oldest past the limit."""
        for f in fetched:
            hd.gen = (hd.gen + 1) & 0xFFFFFFFF
            n = len(f.lengths)
            base = ffi.cast("uint8_t *", f.buffer.ctypes.data)
            offs = np.ascontiguousarray(f.offsets, dtype=np.uint64)
            lens = np.ascontiguousarray(f.lengths, dtype=np.uint32)
            if lib.rdmakv_c_cache_add(h, hd.gen, ffi.from_buffer(f.keys), base, ffi.from_buffer("uint64_t[]", offs),
                                      ffi.from_buffer("uint32_t[]", lens), n) < 0:  # fmt: skip
                raise MemoryError("no memory for the prefetch table")
            hd.buffers[hd.gen] = f
            hd.cached_bytes += f.nbytes
            for i in range(n):
                hd.where[f.keys[i * OPAQUE_WIDTH : (i + 1) * OPAQUE_WIDTH]] = hd.gen
        limit = hd.backend.opts.cache_bytes
        while hd.cached_bytes > limit and len(hd.buffers) > 1:
            drop(h, hd, next(iter(hd.buffers)))

    def entry(name: str, h, fn) -> int:
        hd = handle_of(h)
        if hd is None:
            say(f"{name}: not an open handle")
            return KV_INVALID
        return hd.backend.call(name, lambda: fn(hd))

    def on_error(exc, value, tb) -> None:  # only reached by a bug in the glue itself
        say(f"internal error in the C glue: {exc.__name__}: {value}")

    @ffi.def_extern(onerror=on_error)
    def rdmakv_py_say(what):
        say(ffi.string(what).decode(errors="replace"))

    @ffi.def_extern(onerror=on_error)
    def rdmakv_py_bad_key(what, hash_len, has_hash):
        where = ffi.string(what).decode()
        say(f"{where}: a key is 1..64 bytes, got {hash_len}" if has_hash else f"{where}: NULL key")

    @ffi.def_extern(onerror=on_error)
    def rdmakv_py_bad_chunk(what, n, has_data):
        where = ffi.string(what).decode()
        say(f"{where}: NULL data with a nonzero length" if not has_data and n else
            f"{where}: chunk of {n} bytes (1 .. 2^31)")  # fmt: skip

    @ffi.def_extern(error=-1, onerror=on_error)
    def rdmakv_py_open(h, uri):
        """The handle's options for the C side (bit 0: BLAKE3 checks; the rest: the pending
        limit), or -1 with the reason on stderr."""
        try:
            b = KVStoreBackend(text(uri))
        except BaseException as e:  # noqa: BLE001 - NULL, with the reason, is the ABI's answer
            shown = ffi.string(uri, MAX_NAME * 16).decode(errors="replace") if uri != ffi.NULL else "NULL"
            say(f"open {shown}: {type(e).__name__}: {e}")
            return -1
        with table_lock:
            handles[int(ffi.cast("uintptr_t", h))] = _Handle(b)
        return (b.opts.pending_bytes << 1) | (1 if b.opts.alg == 4 else 0)

    @ffi.def_extern(onerror=on_error)
    def rdmakv_py_close(h):
        with table_lock:
            hd = handles.pop(int(ffi.cast("uintptr_t", h)), None)
        if hd is not None:
            lib.rdmakv_c_cache_clear(h)
            hd.buffers.clear()
            hd.where.clear()
            hd.backend.close()

    @ffi.def_extern(error=-1, onerror=on_error)
    def rdmakv_py_send_ahead(h):
        def run(hd: _Handle) -> int:
            rc = hd.backend.send_ahead(pending_of(h, hd.backend))
            lib.rdmakv_c_pending_sent(h)
            return rc

        return entry("put_chunk", h, run)

    @ffi.def_extern(error=-1, onerror=on_error)
    def rdmakv_py_put_manifest(h, name, data, n):
        def run(hd: _Handle) -> int:
            body, what = bytes(data_of(data, n)), text(name)
            pending = pending_of(h, hd.backend)
            try:
                return hd.backend.put_manifest(what, body, pending)
            finally:  # a failed save does not leak its chunks into the next one
                del pending
                lib.rdmakv_c_pending_clear(h)

        return entry("put_manifest", h, run)

    @ffi.def_extern(error=-1, onerror=on_error)
    def rdmakv_py_get_manifest(h, name, out, out_len):
        def run(hd: _Handle) -> int:
            if out == ffi.NULL or out_len == ffi.NULL:
                raise ValueError("NULL out pointer")
            return give(out, out_len, hd.backend.get_manifest(text(name)))

        return entry("get_manifest", h, run)

    @ffi.def_extern(error=-1, onerror=on_error)
    def rdmakv_py_get_chunk(h, key, out, out_len):
        def run(hd: _Handle) -> int:
            return give(out, out_len, hd.backend.get_chunk(bytes(ffi.buffer(key, OPAQUE_WIDTH))))

        return entry("get_chunk", h, run)

    @ffi.def_extern(error=-1, onerror=on_error)
    def rdmakv_py_delete_manifest(h, name):
        return entry("delete_manifest", h, lambda hd: hd.backend.delete_manifest(text(name)))

    @ffi.def_extern(error=-1, onerror=on_error)
    def rdmakv_py_prefetch_chunks(h, hashes, count, hash_len):
        def run(hd: _Handle) -> int:
            if count > MAX_PREFETCH or not 0 < hash_len <= 64:
                raise ValueError(f"prefetch of {count} keys of {hash_len} bytes (at most {MAX_PREFETCH} keys of "
                                 "1..64 bytes)")  # fmt: skip
            keys = hd.backend.store_keys(data_of(hashes, count * hash_len), count, hash_len)
            if count:
                prefetch(h, hd, keys)
            return KV_OK  # 0 as for every other call (how many were cached is the backend's business)

        return entry("prefetch_chunks", h, run)
