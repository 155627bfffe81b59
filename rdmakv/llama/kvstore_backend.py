"""The kv_store_v1 backend in Python: what ``libkv_store_rdmakv.so`` runs behind the calls that
need the store (its C side, ``kvstore_shim.c``, answers put_chunk and prefetched get_chunk alone).

An engine puts chunks under keys of its own, then a manifest of its own format. Keys are opaque
here: whatever the engine passes (1 to 64 bytes: a hash of the bytes, or a chain hash of token
ids), compared as bytes; the store keeps its own check of each chunk's bytes beside the key
(xxh3-64, or BLAKE3 with ``?check=blake3``) and verifies every read against it, by TCP or by READ.
``put_manifest`` stores the engine's manifest as the body of an rdmakv manifest of kind ``engine``
whose chunk table is the chunks put since the last one: the ordinary commit-if-all-present path,
so a save whose chunks are all stored already is one round trip, and refcounts, eviction, pins and
RDMA locations work as for native sessions. A chunk whose last manifest is replaced (an engine
rewriting a sentinel manifest after every block) stays readable by key as evictable cache.
``get_manifest`` returns the engine's bytes and remembers the chunk table (and, on an RDMA
connection, where each chunk lies), so that ``prefetch_chunks`` is one READ plan (or one batched
GET) into one buffer the C side then serves ``get_chunk`` from. Keys of no manifest read here are
located by one LOCATE (then READ) or fetched by one batched GET.

Every method raises; ``call`` maps failures to the ABI's negative codes and says why on stderr
(rate-limited), so nothing escapes into the engine.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..client.reports import RestoreReport, SaveReport
from ..client.store import Store, connect
from ..errors import AuthError, BusyError, ConnectionLost, DiskFullError, NotFoundError, StoreFullError
from ..hashing import (
    HASH_BLAKE3_256,
    HASH_XXH3_64,
    KEY_OPAQUE_BLAKE3,
    KEY_OPAQUE_XXH3,
    OPAQUE_MAX,
    OPAQUE_WIDTH,
    keys_array,
    opaque_key,
)
from ..wire import manifest as mf
from ..wire.auth import KEY_ENV
from ..wire.keyring import client_key_from_env
from ..wire.messages import NO_REGION, Locations

# return codes of the C ABI (kv_store_abi.h says the same)
KV_OK = 0
KV_ERROR = -1  # anything else (the reason went to stderr)
KV_NOT_FOUND = -2  # no such manifest, or the chunk is not stored
KV_INVALID = -3  # a bad argument: key length, a name, a closed handle
KV_UNREACHABLE = -4  # the server cannot be reached or the connection was lost
KV_AUTH = -5  # the key was refused
KV_FULL = -6  # the store or its disk is full (of pinned or in-use data)
KV_NO_MEMORY = -7  # malloc failed, or a bounded buffer is full

MEMKV_KEY_ENV = "MEMKV_AUTH_KEY"  # the reference backend's variable: read when RDMAKV_AUTH_KEY is not set
CACHE_ENV = "RDMAKV_KVSTORE_CACHE_BYTES"
PENDING_ENV = "RDMAKV_KVSTORE_PENDING_BYTES"
DEFAULT_CACHE_BYTES = 512 << 20  # prefetched chunks kept for get_chunk, per handle
DEFAULT_PENDING_BYTES = 256 << 20  # put_chunk bytes buffered before they are sent ahead of the manifest
SCHEMES = {"rdmakv": "rdmakv", "rdmakvs": "rdmakvs", "memkv": "rdmakv"}  # memkv:// is the reference's name
OPTIONS = {"check", "hash_alg", "hash_order", "transport", "mac", "window"}
SENT = (1 << 64) - 1  # a pending chunk's offset once its bytes were sent ahead (kvstore_shim.c)


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
    """``$RDMAKV_AUTH_KEY``, else ``$MEMKV_AUTH_KEY`` (the reference backend's name), else the
    namespace's key in ``$RDMAKV_KEY_FILE`` (64 hex characters, or a per-tenant keys file as
    ``rdmakv serve --keys`` reads)."""
    return client_key_from_env(namespace, (KEY_ENV, MEMKV_KEY_ENV))


class BackendOptions:
    """``rdmakv://host:port/ns`` (or the reference's ``memkv://host:port/ns``) with options
    ``check=xxh3|blake3`` (the store's check of each chunk; blake3 for collision resistance),
    ``transport=auto|rdma|tcp``, ``mac=poly1305|blake3|hmac-sha256``, ``window=N``. ``hash_alg`` (an alias
    of ``check``) and ``hash_order=be|le`` are still accepted: ``hash_order`` says how sessions
    saved before keys were opaque (xxh3 keys stored as numbers) are read back."""

    def __init__(self, uri: str) -> None:
        parts = urlsplit(uri)
        scheme = SCHEMES.get(parts.scheme.lower())
        if scheme is None:
            raise ValueError(f"unknown scheme {parts.scheme!r} in {uri!r} (known: {sorted(SCHEMES)})")
        q = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(q) - OPTIONS
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} in {uri!r} (known: {sorted(OPTIONS)})")
        self.url = parts._replace(scheme=scheme, query="", fragment="").geturl()
        order = _choice(q, "hash_order", ("be", "le"), os.environ.get("RDMAKV_KVSTORE_HASH_ORDER", "be"))
        self.little_endian = order == "le"
        check = _choice(q, "check", ("xxh3", "blake3"), _choice(q, "hash_alg", ("xxh3", "blake3"), "xxh3"))
        self.alg = KEY_OPAQUE_BLAKE3 if check == "blake3" else KEY_OPAQUE_XXH3
        self.transport = _choice(q, "transport", ("auto", "rdma", "tcp"), "auto")
        self.mac = _choice(q, "mac", ("poly1305", "blake3", "hmac-sha256"), "poly1305")
        self.window = _positive(q, "window", 64)
        self.cache_bytes = _positive(os.environ, CACHE_ENV, DEFAULT_CACHE_BYTES)
        self.pending_bytes = _positive(os.environ, PENDING_ENV, DEFAULT_PENDING_BYTES)


def _choice(q: dict, name: str, allowed: tuple[str, ...], default: str) -> str:
    v = q.get(name, default).lower()
    if v not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {v!r}")
    return v


def _positive(q, name: str, default: int) -> int:
    raw = q.get(name)
    try:
        v = int(raw) if raw is not None else default
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return v


@dataclass
class Pending:
    """The chunks put since the last put_manifest, as the C side holds them: keys in the store's
    opaque form, lengths, offsets into one arena (SENT: sent ahead already), the arena itself."""

    keys: np.ndarray  # V65
    lengths: np.ndarray  # uint32
    offsets: np.ndarray  # uint64
    arena: memoryview

    def chunks(self) -> list[memoryview | None]:
        spans = zip(self.offsets.tolist(), self.lengths.tolist())
        return [None if o == SENT else self.arena[o : o + n] for o, n in spans]


@dataclass
class Fetched:
    """Chunks a prefetch landed in one buffer: the C side answers get_chunk from them."""

    buffer: np.ndarray  # kept alive while the C side points into it
    keys: bytes  # n x 65, the engine's keys in the store's form
    offsets: np.ndarray  # uint64
    lengths: np.ndarray  # uint32

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum(dtype=np.uint64))


class KVStoreBackend:
    """One kv_store_v1 handle's connection and the chunk table of the last manifest read. The C
    side serializes calls per handle; the lock here covers Python callers too."""

    def __init__(self, uri: str, store_factory: Callable[[], Store] | None = None) -> None:
        self.opts = BackendOptions(uri)
        self.uri = uri
        self._connect = store_factory or self._default_store
        self.lock = threading.Lock()
        self.table: dict[bytes, int] = {}  # engine key (store form) -> index in the last manifest read
        self.last: tuple[mf.Manifest, Locations | None] | None = None
        self.last_save: SaveReport | None = None
        self.last_prefetch: RestoreReport | None = None
        self.closed = False
        self.store: Store | None = self._connect()

    def _default_store(self) -> Store:
        ns = _namespace(self.opts.url)
        return connect(
            self.opts.url, key=client_key(ns), transport=self.opts.transport, window=self.opts.window,
            mac=self.opts.mac, timeout=30,
        )  # fmt: skip

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

    def store_keys(self, hashes: bytes | memoryview, count: int, hash_len: int) -> np.ndarray:
        """``count`` engine keys of ``hash_len`` bytes each, in the store's opaque form (V65)."""
        if not 0 < hash_len <= OPAQUE_MAX:
            raise ValueError(f"an engine key is 1..{OPAQUE_MAX} bytes, got {hash_len}")
        if len(hashes) != count * hash_len:
            raise ValueError(f"{len(hashes)} bytes of keys for {count} keys of {hash_len} bytes")
        out = np.zeros((count, OPAQUE_WIDTH), dtype=np.uint8)
        out[:, 0] = hash_len | (0x80 if self.opts.alg == KEY_OPAQUE_BLAKE3 else 0)
        out[:, 1 : 1 + hash_len] = np.frombuffer(hashes, dtype=np.uint8).reshape(count, hash_len)
        return out.reshape(-1).view(f"V{OPAQUE_WIDTH}")

    # -- saves -------------------------------------------------------------------------
    def put_manifest(self, name: str, body: bytes, pending: Pending) -> int:
        """Commit the engine's manifest over the chunks put since the last one."""
        n = len(pending.keys)
        m = mf.Manifest(mf.KIND_ENGINE, bytes(body), pending.keys, pending.lengths, np.arange(n, dtype=np.uint64),
                        self.opts.alg)  # fmt: skip
        self.last_save = self._store().save_manifest(name, m, pending.chunks())
        return KV_OK

    def send_ahead(self, pending: Pending) -> int:
        """The pending arena is full: send what the store lacks now; the manifest names them
        later (the server holds a connection's uncommitted chunks for a while)."""
        todo = [i for i, o in enumerate(pending.offsets.tolist()) if o != SENT]
        if not todo:
            return KV_OK
        store = self._store()
        keys = pending.keys[todo]
        have = store.exists(keys)
        chunks = pending.chunks()
        want = [i for i, h in zip(todo, have.tolist()) if not h]
        if want:
            sending = [c for i in want if (c := chunks[i]) is not None]  # (every one: none of them was sent)
            store.channel.put_chunks(pending.keys[want].tolist(), sending)
        return KV_OK

    def delete_manifest(self, name: str) -> int:
        self._store().delete_manifest(name)
        return KV_OK

    # -- restores ----------------------------------------------------------------------
    def get_manifest(self, name: str) -> bytes:
        store = self._store()
        rdma = store.active_transport == "rdma"
        data, loc, _ = store.channel.get_manifest(name, want_locations=rdma)
        m = mf.decode(data)
        if m.kind != mf.KIND_ENGINE:
            raise NotFoundError(f"{name!r} is a {mf.KIND_NAMES[m.kind]} manifest, not one saved through kv_store_v1")
        self.last = (m, loc)
        self.table = {k: i for i, k in enumerate(self._engine_keys(m))}
        return m.body

    def _engine_keys(self, m: mf.Manifest) -> list[bytes]:
        """The manifest's keys as an engine asks for them (a session saved when kv_store keys were
        content hashes has xxh3 numbers or BLAKE3 digests: they are the engine's hash bytes)."""
        if m.hash_alg == self.opts.alg:
            return m.keys.tolist()
        if m.hash_alg == HASH_XXH3_64:
            order: Literal["little", "big"] = "little" if self.opts.little_endian else "big"
            return [opaque_key(int(k).to_bytes(8, order), self.opts.alg) for k in m.keys.tolist()]
        if m.hash_alg == HASH_BLAKE3_256:
            return [opaque_key(k, self.opts.alg) for k in m.keys.tolist()]
        return []  # opaque keys checked another way: asked for under this handle's form, never found

    def prefetch(self, keys: np.ndarray) -> list[Fetched]:
        """Fetch the chunks of ``keys`` (store form) into as few buffers as possible: those of the
        last manifest read at the locations it came with, the rest by key."""
        want = list(dict.fromkeys(keys.tolist()))
        out: list[Fetched] = []
        known = [k for k in want if k in self.table]
        if known and self.last is not None:
            out.append(self._prefetch_known(known))
        unknown = [k for k in want if k not in self.table]
        if unknown:
            out += self._prefetch_by_key(unknown)
        return out

    def _prefetch_known(self, keys: list[bytes]) -> Fetched:
        assert self.last is not None
        m, loc = self.last
        idx = np.fromiter((self.table[k] for k in keys), dtype=np.int64, count=len(keys))
        lengths = m.lengths[idx]
        keep = np.cumsum(lengths, dtype=np.uint64) <= self.opts.cache_bytes
        keep[0] = True  # always at least one: the engine asked for it
        idx, lengths = idx[keep], lengths[keep]
        rep = RestoreReport()
        buf, offsets = self._store().fetch_located(m.keys[idx], lengths, loc, idx, rep)
        self.last_prefetch = rep
        return Fetched(buf, b"".join(keys[i] for i in np.flatnonzero(keep).tolist()), offsets, lengths)

    def _prefetch_by_key(self, keys: list[bytes]) -> list[Fetched]:
        """Chunks of no manifest read here (an engine that reads blocks by key): one LOCATE and
        one READ plan for those in memory on an RDMA connection, one batched GET for the rest."""
        store = self._store()
        arr = keys_array(keys, self.opts.alg)
        out: list[Fetched] = []
        rest = list(range(len(keys)))
        if store.active_transport == "rdma":
            loc = store.channel.locate(arr)
            located = np.flatnonzero(loc.slots["region"] != NO_REGION)
            if len(located) and loc.lengths is not None:
                lengths = loc.lengths[located]
                keep = located[np.cumsum(lengths, dtype=np.uint64) <= self.opts.cache_bytes]
                rep = RestoreReport()
                buf, offsets = store.fetch_located(arr[keep], loc.lengths[keep], loc, keep, rep)
                self.last_prefetch = rep
                out.append(Fetched(buf, arr[keep].tobytes(), offsets, loc.lengths[keep].copy()))
                taken = set(keep.tolist())
                rest = [i for i in rest if i not in taken and loc.slots["region"][i] == NO_REGION]
        if rest:
            got = store.get_chunks([keys[i] for i in rest])
            present = [(keys[i], d) for i, d in zip(rest, got) if d is not None]
            if present:
                lengths = np.array([len(d) for _, d in present], dtype=np.uint32)
                offsets = mf.packed_offsets(lengths)
                buf = np.frombuffer(b"".join(d for _, d in present), dtype=np.uint8)
                out.append(Fetched(buf, b"".join(k for k, _ in present), offsets, lengths))
        return out

    def get_chunk(self, key: bytes) -> memoryview:
        """A chunk the C side had not prefetched: from the store by key (NotFoundError if absent)."""
        store = self._store()
        i = self.table.get(key)
        if i is not None and self.last is not None:
            m = self.last[0]
            n = int(m.lengths[i])
            buf = memoryview(bytearray(n))
            store.channel.fetch_chunks(m.keys[i : i + 1].tolist(), [n], buf, [0])
            return buf
        (data,) = store.get_chunks([key])
        if data is None:
            raise NotFoundError("chunk is not stored")
        return memoryview(data)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.table = {}
            self.last = None
            self._drop_store()


def _namespace(url: str) -> str:
    from ..client.url import parse_url

    return parse_url(url).namespace

