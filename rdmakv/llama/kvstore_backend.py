"""The kv_store_v1 backend in Python: what ``libkv_store_rdmakv.so`` runs behind each C call.

An engine that saves its KV cache through kv_store_v1 (the reference design's chunked-save
llama.cpp) puts content-addressed chunks, then a manifest of its own format that names them.
Here the chunks put through a handle since its last ``put_manifest`` are buffered (bounded),
and ``put_manifest`` stores the engine's manifest as the body of an rdmakv manifest of kind
``engine`` whose chunk table is those chunks: the ordinary commit-if-all-present path, so a
save whose chunks are all stored already is one round trip, and refcounts, eviction, pins and
RDMA locations work as for native sessions. ``get_manifest`` returns the engine's bytes and
remembers the chunk table (and, on an RDMA connection, where each chunk lies), so that
``prefetch_chunks`` is one READ plan (or one batched GET over TCP) into a bounded cache that
``get_chunk`` then serves without a round trip.

Every method returns 0 or a negative ``KV_*`` code, never raises: the C shim maps them 1:1.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..client import Store, connect
from ..errors import (
    AuthError,
    BusyError,
    ConnectionLost,
    DiskFullError,
    NotFoundError,
    StoreFullError,
)
from ..hashing import HASH_BLAKE3_256, HASH_XXH3_64, KEY_BYTES, Key, key_hex, keys_array, matches
from ..kvstate import RestoreReport, SaveReport
from ..wire import manifest as mf
from ..wire.auth import KEY_ENV, parse_key
from ..wire.keyring import KeyRing

# return codes of the C ABI (kv_store_abi.h says the same)
KV_OK = 0
KV_ERROR = -1  # anything else (the reason went to stderr)
KV_NOT_FOUND = -2  # no such manifest, or the chunk is not stored
KV_INVALID = -3  # a bad argument: hash length, a name, a closed handle
KV_UNREACHABLE = -4  # the server cannot be reached or the connection was lost
KV_AUTH = -5  # the key was refused
KV_FULL = -6  # the store or its disk is full (of pinned or in-use data)
KV_NO_MEMORY = -7  # malloc failed, or a bounded buffer is full

KEY_FILE_ENV = "RDMAKV_KEY_FILE"
CACHE_ENV = "RDMAKV_KVSTORE_CACHE_BYTES"
PENDING_ENV = "RDMAKV_KVSTORE_PENDING_BYTES"
DEFAULT_CACHE_BYTES = 512 << 20  # prefetched chunks kept for get_chunk, per handle
DEFAULT_PENDING_BYTES = 256 << 20  # put_chunk bytes buffered before they are sent ahead of the manifest
OPTIONS = {"hash_order", "hash_alg", "transport", "mac", "window"}


class _Say:
    """stderr, rate-limited: each distinct reason once a minute, at most 10 lines a minute."""

    def __init__(self, per_minute: int = 10) -> None:
        self.per_minute = per_minute
        self._last: dict[str, float] = {}
        self._window = (0.0, 0)
        self._lock = threading.Lock()

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(text, -1e9) < 60:
                return
            start, n = self._window
            if now - start >= 60:
                start, n = now, 0
            if n >= self.per_minute:
                return
            self._window = (start, n + 1)
            self._last[text] = now
            if len(self._last) > 1024:
                self._last.clear()
        try:
            print(f"rdmakv kv_store: {text}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # a closed stderr must not fail the host's call


say = _Say()


def code_of(e: BaseException) -> int:
    if isinstance(e, NotFoundError):
        return KV_NOT_FOUND
    if isinstance(e, AuthError):
        return KV_AUTH
    if isinstance(e, ConnectionLost | ConnectionError | TimeoutError | BusyError):
        return KV_UNREACHABLE
    if isinstance(e, StoreFullError | DiskFullError):
        return KV_FULL
    if isinstance(e, MemoryError):
        return KV_NO_MEMORY
    if isinstance(e, ValueError):
        return KV_INVALID
    return KV_ERROR


def client_key(namespace: str) -> bytes:
    """``$RDMAKV_AUTH_KEY``, else the namespace's key in ``$RDMAKV_KEY_FILE`` (64 hex characters,
    or a per-tenant keys file as ``rdmakv serve --keys`` reads)."""
    if os.environ.get(KEY_ENV):
        return parse_key(os.environ[KEY_ENV])
    path = os.environ.get(KEY_FILE_ENV)
    if not path:
        raise AuthError(f"no key: set {KEY_ENV} (64 hex characters) or {KEY_FILE_ENV}")
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise AuthError(f"{KEY_FILE_ENV}={path}: {e.strerror}") from None
    if "[[key]]" in text:
        return KeyRing.parse(text, Path(path)).client_key(namespace)
    return parse_key(text.strip())


class BackendOptions:
    """``rdmakv://host:port/ns?hash_order=le&hash_alg=blake3&transport=tcp&mac=...&window=64``"""

    def __init__(self, uri: str) -> None:
        parts = urlsplit(uri)
        q = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(q) - OPTIONS
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} in {uri!r} (known: {sorted(OPTIONS)})")
        self.url = parts._replace(query="", fragment="").geturl()
        self.little_endian = _choice(q, "hash_order", ("be", "le"), os.environ.get("RDMAKV_KVSTORE_HASH_ORDER", "be"))
        self.little_endian = self.little_endian == "le"
        self.hash_alg = _choice(q, "hash_alg", ("xxh3", "blake3"), "xxh3")
        self.transport = _choice(q, "transport", ("auto", "rdma", "tcp"), "auto")
        self.mac = _choice(q, "mac", ("blake3", "hmac-sha256"), "blake3")
        self.window = int(q.get("window", 64))
        self.cache_bytes = int(os.environ.get(CACHE_ENV, DEFAULT_CACHE_BYTES))
        self.pending_bytes = int(os.environ.get(PENDING_ENV, DEFAULT_PENDING_BYTES))


def _choice(q: dict, name: str, allowed: tuple[str, ...], default: str) -> str:
    v = q.get(name, default).lower()
    if v not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {v!r}")
    return v


class KVStoreBackend:
    """One kv_store_v1 handle: a store connection, the chunks of the save in progress, and the
    chunk table and cache of the last manifest read. Safe to share between threads (one lock)."""

    def __init__(self, uri: str, store_factory: Callable[[], Store] | None = None) -> None:
        self.opts = BackendOptions(uri)
        self.uri = uri
        self._connect = store_factory or self._default_store
        self.alg = HASH_BLAKE3_256 if self.opts.hash_alg == "blake3" else HASH_XXH3_64
        self.hash_len = KEY_BYTES[self.alg]
        self.lock = threading.Lock()
        self.pending: OrderedDict[Key, memoryview | None] = OrderedDict()  # None: sent ahead already
        self.pending_lengths: dict[Key, int] = {}
        self.pending_bytes = 0
        self.table: dict[Key, int] = {}  # key -> index in the last manifest read
        self.last: tuple[mf.Manifest, object] | None = None  # (manifest, Locations or None)
        self.cache: OrderedDict[Key, memoryview] = OrderedDict()
        self.cache_bytes = 0
        self.last_save: SaveReport | None = None
        self.last_prefetch: RestoreReport | None = None
        self.closed = False
        self.store: Store | None = self._connect()

    def _default_store(self) -> Store:
        ns = _namespace(self.opts.url)
        return connect(
            self.opts.url, key=client_key(ns), transport=self.opts.transport, window=self.opts.window,
            hash_alg=self.opts.hash_alg, mac=self.opts.mac, timeout=30,
        )  # fmt: skip

    # -- helpers -----------------------------------------------------------------------
    def key(self, hash_bytes: bytes) -> Key:
        if len(hash_bytes) != self.hash_len:
            raise ValueError(
                f"hash of {len(hash_bytes)} bytes on a connection keyed by {self.opts.hash_alg} "
                f"({self.hash_len} bytes; set ?hash_alg= in the URI to match the engine)"
            )
        if self.alg == HASH_BLAKE3_256:
            return bytes(hash_bytes)
        return int.from_bytes(hash_bytes, "little" if self.opts.little_endian else "big")

    def _store(self) -> Store:
        if self.closed:
            raise ValueError("the handle is closed")
        if self.store is None:  # the connection was lost: one reconnect per call
            self.store = self._connect()
        return self.store

    def call(self, what: str, fn: Callable[[], int]) -> int:
        """Run one ABI call under the lock; map any failure to its code, say why (rate-limited)."""
        with self.lock:
            try:
                return fn()
            except BaseException as e:  # noqa: BLE001 - nothing may escape into the engine
                code = code_of(e)
                if code == KV_UNREACHABLE and self.store is not None:
                    self._drop_store()
                if code != KV_NOT_FOUND:  # a miss is an answer, not a fault
                    say(f"{what}: {type(e).__name__}: {e}")
                return code

    def _drop_store(self) -> None:
        try:
            if self.store is not None:
                self.store.close()
        except Exception:  # noqa: BLE001 - it is being thrown away
            pass
        self.store = None

    # -- the ABI -----------------------------------------------------------------------
    def put_chunk(self, hash_bytes: bytes, data: memoryview) -> int:
        """Buffer a chunk for the next put_manifest (checked against its hash now)."""
        key = self.key(hash_bytes)
        if key in self.pending:
            return KV_OK  # putting a chunk twice is a no-op
        if not matches(key, data):
            raise ValueError(f"chunk bytes do not hash to {key_hex(key)} (wrong hash, hash_alg or hash_order)")
        if len(data) == 0 or len(data) > mf.MAX_CHUNK_LEN:
            raise ValueError(f"chunk of {len(data)} bytes (1 .. {mf.MAX_CHUNK_LEN})")
        if len(self.pending) >= mf.MAX_CHUNKS:
            raise MemoryError(f"more than {mf.MAX_CHUNKS} chunks put before one put_manifest")
        self.pending[key] = memoryview(bytes(data))
        self.pending_lengths[key] = len(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > self.opts.pending_bytes:
            self._send_ahead()
        return KV_OK

    def _send_ahead(self) -> None:
        """The buffer is full: send what the store lacks now; the manifest names them later (the
        server holds uncommitted chunks for a while)."""
        keys = [k for k, v in self.pending.items() if v is not None]
        store = self._store()
        have = store.exists(keys_array(keys, self.alg))
        want = [k for k, h in zip(keys, have.tolist()) if not h]
        if want:
            store.channel.put_chunks(want, [self.pending[k] for k in want])
        for k in keys:
            self.pending[k] = None
        self.pending_bytes = 0

    def put_manifest(self, name: str, body: bytes) -> int:
        """Commit the engine's manifest over the chunks put since the last one."""
        keys = list(self.pending)
        chunks = list(self.pending.values())
        lengths = np.fromiter((self.pending_lengths[k] for k in keys), dtype=np.uint32, count=len(keys))
        self._clear_pending()  # a failed save does not leak its chunks into the next one
        m = mf.Manifest(mf.KIND_ENGINE, bytes(body), keys_array(keys, self.alg), lengths,
                        np.arange(len(keys), dtype=np.uint64), self.alg)  # fmt: skip
        store = self._store()
        self.last_save = store.save_manifest(name, m, chunks)  # type: ignore[arg-type]
        return KV_OK

    def _clear_pending(self) -> None:
        self.pending = OrderedDict()
        self.pending_lengths = {}
        self.pending_bytes = 0

    def get_manifest(self, name: str) -> bytes:
        store = self._store()
        rdma = store.rdma is not None and store.rdma.usable
        data, loc, _ = store.channel.get_manifest(name, want_locations=rdma)
        m = mf.decode(data)
        if m.kind != mf.KIND_ENGINE:
            raise NotFoundError(f"{name!r} is a {mf.KIND_NAMES[m.kind]} manifest, not one saved through kv_store_v1")
        self.last = (m, loc)
        self.table = {k: i for i, k in enumerate(m.keys.tolist())}
        return m.body

    def prefetch_chunks(self, hashes: bytes, count: int, hash_len: int) -> int:
        """Fetch the listed chunks in one batch into the cache; returns how many are cached."""
        if hash_len != self.hash_len or len(hashes) != count * hash_len:
            raise ValueError(f"prefetch of {count} hashes of {hash_len} bytes on a {self.opts.hash_alg} connection")
        asked = [self.key(hashes[i * hash_len : (i + 1) * hash_len]) for i in range(count)]
        want = list(dict.fromkeys(k for k in asked if k not in self.cache))
        known = [k for k in want if k in self.table]
        if self.last is not None and known:
            self._prefetch_known(known)
        unknown = [k for k in want if k not in self.table]
        if unknown:  # chunks of no manifest read here: sizes unknown, fetched by key
            for k, data in zip(unknown, self._store().get_chunks(unknown)):
                if data is not None:
                    self._cache_put(k, memoryview(data))
        return sum(1 for k in asked if k in self.cache)

    def _prefetch_known(self, keys: list[Key]) -> None:
        assert self.last is not None
        m, loc = self.last
        idx = np.fromiter((self.table[k] for k in keys), dtype=np.int64, count=len(keys))
        lengths = m.lengths[idx]
        keep = np.cumsum(lengths, dtype=np.uint64) <= max(self.opts.cache_bytes, 1)
        keep[0] = True  # always at least one: the engine asked for it
        idx, lengths = idx[keep], lengths[keep]
        rep = RestoreReport()
        buf, offsets = self._store().fetch_located(m.keys[idx], lengths, loc, idx, rep)
        view = memoryview(buf)
        for i, o, n in zip(idx.tolist(), offsets.tolist(), lengths.tolist()):
            self._cache_put(int(m.keys[i]) if self.alg == HASH_XXH3_64 else bytes(m.keys[i]), view[o : o + n])
        self.last_prefetch = rep

    def _cache_put(self, key: Key, data: memoryview) -> None:
        old = self.cache.pop(key, None)
        if old is not None:
            self.cache_bytes -= len(old)
        self.cache[key] = data
        self.cache_bytes += len(data)
        while self.cache_bytes > self.opts.cache_bytes and len(self.cache) > 1:
            _, gone = self.cache.popitem(last=False)
            self.cache_bytes -= len(gone)

    def get_chunk(self, hash_bytes: bytes) -> memoryview:
        key = self.key(hash_bytes)
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        store = self._store()
        i = self.table.get(key)
        if i is not None and self.last is not None:
            n = int(self.last[0].lengths[i])
            buf = memoryview(bytearray(n))
            store.channel.fetch_chunks([key], [n], buf, [0])
            return buf
        (data,) = store.get_chunks([key])
        if data is None:
            raise NotFoundError(f"chunk {key_hex(key)} is not stored")
        return memoryview(data)

    def delete_manifest(self, name: str) -> int:
        self._store().delete_manifest(name)
        return KV_OK

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._clear_pending()
            self.cache.clear()
            self.cache_bytes = 0
            self._drop_store()


def _namespace(url: str) -> str:
    from ..url import parse_url

    return parse_url(url).namespace
