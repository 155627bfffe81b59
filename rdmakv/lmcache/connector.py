"""rdmakv as LMCache's remote storage: the ``RemoteConnector`` and the adapter LMCache loads.

Configured through LMCache's plugin settings, with no patch to LMCache::

    remote_storage_plugins: ["rdmakv"]
    extra_config:
      remote_storage_plugin.rdmakv.module_path: rdmakv.lmcache
      remote_storage_plugin.rdmakv.class_name: RdmakvConnectorAdapter
      remote_storage_plugin.rdmakv.url: rdmakv://HOST:PORT/NAMESPACE

Each LMCache chunk is one rdmakv session (``values``). Two connections, each on its own thread
(``lanes``): lookups and retrieves on one, saves on the other, so a retrieve never waits behind a
save. With RDMA, a retrieve looks its values up in the server's one-sided index and READs their
chunks straight into the MemoryObjs LMCache allocated, inside LMCache's CPU buffer, registered
once per connection; saves WRITE their missing chunks. Nothing ever raises into LMCache: a store
that is down makes lookups miss and drops saves (counted in ``counters``) while the lanes
reconnect; a stored value that does not match this engine's metadata is a miss, logged once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.exceptions import IrrecoverableException
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.protocol import RemoteMetadata
from lmcache.v1.storage_backend.connector import ConnectorAdapter, ConnectorContext, extract_plugin_type
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

from ..client.reports import RestoreReport
from ..client.store import Store, connect
from ..errors import AuthError, CodecError, ManifestError, RdmakvError
from ..wire import manifest as mf
from . import batch, values
from .lanes import Lane, Unavailable
from .settings import Settings, SettingsError, load_key, parse_settings

log = logging.getLogger("rdmakv.lmcache")
T = TypeVar("T")
PLUGIN_TYPE = "rdmakv"
MAX_REASONS = 256  # distinct reasons logged once each; past that, counted only


class RdmakvConnector(RemoteConnector):
    def __init__(self, settings: Settings, key: bytes, loop: asyncio.AbstractEventLoop, local_cpu_backend: Any,
                 config: Any, metadata: Any) -> None:  # fmt: skip
        super().__init__(config, metadata)
        self.settings = settings
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.counters: Counter[str] = Counter()
        self.last_get = RestoreReport()  # the last retrieve: transport "rdma" only when it went by READ
        self._key = key
        self._said: set[str] = set()
        self._buffer = _allocator_buffer(local_cpu_backend)  # LMCache's CPU buffer: every MemoryObj lies in it
        self._dest: batch.Dest | None = None  # it, registered on the lookup connection (RDMA)
        self._mr: tuple[Any, Any] | None = None
        self.gets = Lane("lookup", self._open_store)
        self.gets.on_connect, self.gets.on_drop = self._register_buffer, self._unregister_buffer
        self.puts = Lane("save", self._open_store)

    @classmethod
    def start(cls, ctx: ConnectorContext) -> RdmakvConnector:
        """From LMCache's context; SettingsError or AuthError (start-up must fail) say what is wrong."""
        setting = f"remote_storage_plugin.{ctx.plugin_name or PLUGIN_TYPE}.url"
        extra = (ctx.config.extra_config if ctx.config is not None else None) or {}
        settings = parse_settings(extra.get(setting), setting)
        key = load_key(settings.url.namespace)
        if ctx.config is not None and (ctx.config.remote_serde or "naive") != "naive":
            raise SettingsError(
                f"remote_serde={ctx.config.remote_serde!r}: rdmakv stores LMCache's raw KV chunks "
                "(content-addressed, so that shared layers and prefixes are stored once); use naive"
            )
        if ctx.config is not None and ctx.config.use_layerwise:
            raise SettingsError("use_layerwise=True: the rdmakv plugin stores whole chunks; turn layerwise off")
        conn = cls(settings, key, ctx.loop, ctx.local_cpu_backend, ctx.config, ctx.metadata)
        conn.first_connect()
        return conn

    def _open_store(self) -> Store:
        s = self.settings
        return connect(s.store_url, key=self._key, transport=s.transport, timeout=s.timeout, hash_alg=s.hash_alg,
                       mac=s.mac)  # fmt: skip

    def first_connect(self) -> None:
        """Connect now: a refused key or an impossible transport fails start-up; a server that is
        down only delays (the lanes connect when it is back)."""
        try:
            transport = self.gets.call(lambda st: st.active_transport, self.settings.timeout + 5)
        except Unavailable:
            err = self.gets.last_error
            if isinstance(err, AuthError) or (isinstance(err, RdmakvError) and "transport=" in str(err)):
                self.gets.close()
                self.puts.close()
                if isinstance(err, AuthError):
                    where = "RDMAKV_AUTH_KEY" if os.environ.get("RDMAKV_AUTH_KEY") else "RDMAKV_KEY_FILE"
                    raise AuthError(f"{self.settings.url} refused the key from {where} for namespace "
                                    f"{self.settings.url.namespace!r}: {err}") from None  # fmt: skip
                raise err from None
            log.warning("rdmakv: %s is not reachable now (%s); LMCache runs without it until it is",
                        self.settings.url, self.gets.down_reason)  # fmt: skip
            return
        log.info("rdmakv: LMCache stores in %s over %s (pieces of %s tokens)", self.settings.url, transport,
                 self.settings.window or "whole-layer")  # fmt: skip

    # -- LMCache's buffer, registered once per lookup connection ---------------------------
    def _register_buffer(self, store: Store) -> None:
        rdma = store.rdma
        if rdma is None or not rdma.usable:
            return
        if self._buffer is None:
            self._say("LMCache's CPU allocator has no single buffer to register: retrieves land by TCP")
            return
        addr, n = self._buffer.data_ptr(), self._buffer.numel()
        mr = rdma.pd.register(addr, n, remote_read=False, keepalive=self._buffer)
        self._mr = (rdma.pd, mr)
        self._dest = batch.Dest(self._buffer.numpy(), addr, mr.lkey)
        self.counters["buffer_registrations"] += 1

    def _unregister_buffer(self, store: Store) -> None:
        self._dest = None
        mr, self._mr = self._mr, None
        if mr is not None:
            mr[0].deregister(mr[1])

    # -- lookups ---------------------------------------------------------------------------
    def _contains(self, store: Store, keys: Sequence[CacheEngineKey]) -> int:
        """How many of ``keys``, from the first, are stored: one-sided index READs when the
        connection has RDMA (the server does nothing), one HAS_MANIFESTS for what they leave."""
        names = [values.value_name(k.to_string()) for k in keys]
        n = 0
        rdma = store.rdma if store.active_transport == "rdma" else None
        if rdma is not None and rdma.index is not None and rdma.one_sided:
            from ..rdma.errors import RdmaError

            rep = RestoreReport()
            try:
                found = rdma.index.lookup_many(names, rep)
                n = next((i for i, f in enumerate(found) if f is None), len(names))
            except RdmaError as e:
                rdma.latch(f"RDMA READ of the lookup index failed ({e}); this connection now uses TCP")
                n = 0
            self.counters["contains_one_sided"] += n
        if n < len(names):
            have = store.has_manifests(names[n:])
            self.counters["contains_requests"] += 1
            miss = np.flatnonzero(~have)
            n += int(miss[0]) if len(miss) else len(have)
        return n

    def batched_contains(self, keys: list[CacheEngineKey]) -> int:
        return self._wait("contains", 0, lambda st: self._contains(st, keys))

    def support_batched_contains(self) -> bool:
        return True

    async def batched_async_contains(self, lookup_id: str, keys: list[CacheEngineKey], pin: bool = False) -> int:
        return await self._guarded("contains", 0, self.gets, lambda st: self._contains(st, keys))

    async def exists(self, key: CacheEngineKey) -> bool:
        return await self._guarded("contains", 0, self.gets, lambda st: self._contains(st, [key])) == 1

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return self._wait("contains", 0, lambda st: self._contains(st, [key])) == 1

    # -- retrieves -------------------------------------------------------------------------
    def _fetch(self, store: Store, keys: Sequence[CacheEngineKey], one_sided: bool = True) -> list[MemoryObj | None]:
        rep = RestoreReport()
        strings = [k.to_string() for k in keys]
        located = batch.lookup_many(store, [values.value_name(s) for s in strings], rep, one_sided=one_sided)
        objs: list[MemoryObj | None] = [None] * len(keys)
        plan: list[tuple[mf.Manifest, batch.Located, MemoryObj]] = []
        try:
            for i, (key_string, found) in enumerate(zip(strings, located)):
                checked = self._check(key_string, found.manifest) if found is not None else None
                if checked is None or found is None:  # (found is None: checked is too)
                    continue
                m, meta = checked
                obj = self.local_cpu_backend.allocate(meta.shapes, meta.dtypes, meta.fmt)
                if obj is None:  # LMCache's memory is full: the rest would be dropped anyway
                    self.counters["allocation_failures"] += 1
                    break
                objs[i] = obj
                plan.append((m, found, obj))
            if self._read(store, plan, rep, strict=any(f.one_sided for _, f, _ in plan)) == "moved":
                _release(objs)
                return self._fetch(store, keys, one_sided=False)  # a chunk moved under the READs
        except BaseException:
            _release(objs)
            raise
        self.last_get = rep
        hits = sum(o is not None for o in objs)
        self.counters["values_retrieved"] += hits
        self.counters[f"values_retrieved_{rep.transport}"] += hits
        self.counters["values_missed"] += len(keys) - hits
        return objs

    def _check(self, key_string: str, data: bytes) -> tuple[mf.Manifest, RemoteMetadata] | None:
        """The value's manifest and LMCache header when both match this engine, else None
        (a miss, logged once per reason): never a tensor of another shape, type or key."""
        try:
            m = mf.decode(data)
            if m.kind != mf.KIND_ENGINE:
                raise CodecError(f"a {mf.KIND_NAMES[m.kind]} manifest, not an LMCache value")
            body = values.decode_body(m.body)
        except (CodecError, ManifestError) as e:
            self._mismatch(f"the stored value is unreadable: {e}", key_string)
            return None
        if body.key_string != key_string:
            self._mismatch(f"the stored value under its name belongs to {body.key_string!r}", key_string)
            return None
        if len(body.header) != self.remote_metadata_bytes:
            theirs, ours = len(body.header), self.remote_metadata_bytes
            self._mismatch(f"a stored header of {theirs} bytes; this engine's are {ours} (another number "
                           "of KV groups)", key_string)  # fmt: skip
            return None
        try:
            meta = RemoteMetadata.deserialize(body.header)
        except Exception as e:  # noqa: BLE001 - LMCache's decoder raises anything for a bad header
            self._mismatch(f"the stored header does not decode: {e!r}", key_string)
            return None
        why = self._metadata_mismatch(meta, m.total_bytes)
        if why:
            self._mismatch(f"the stored value has {why}", key_string)
            return None
        return m, meta

    def _metadata_mismatch(self, meta: RemoteMetadata, stored: int) -> str:
        if meta.fmt != self.meta_fmt:
            return f"format {meta.fmt.name}; this engine uses {self.meta_fmt.name}"
        if list(meta.dtypes) != list(self.meta_dtypes):
            return f"dtypes {meta.dtypes}; this engine uses {self.meta_dtypes}"
        if len(meta.shapes) != len(self.meta_shapes):
            return f"{len(meta.shapes)} KV groups; this engine has {len(self.meta_shapes)}"
        size = 0
        for got, want, dtype in zip(meta.shapes, self.meta_shapes, meta.dtypes):
            if len(got) != len(want) or len(got) != 4:
                return f"shape {list(got)}; this engine's chunks are {list(want)}"
            if [got[0], got[1], got[3]] != [want[0], want[1], want[3]] or not 0 < got[2] <= want[2]:
                return f"shape {list(got)}; this engine's chunks are {list(want)} (tokens 1..{want[2]})"
            size += got.numel() * dtype.itemsize
        if not meta.length == size == stored:
            return f"a header that says {meta.length} bytes, shapes of {size} bytes, and {stored} bytes stored"
        return ""

    def _read(self, store: Store, plan: list, rep: RestoreReport, strict: bool) -> str:
        """Land every planned value in its MemoryObj: the ones inside LMCache's buffer in one
        go (one READ plan when it is registered on this connection), any other one by TCP."""
        buf = self._dest if self._dest is not None and self._mr is not None and store.rdma is not None \
            and self._mr[0] is store.rdma.pd else None  # fmt: skip
        if buf is None and self._buffer is not None:
            buf = batch.Dest(self._buffer.numpy(), self._buffer.data_ptr())
        inside, outside = [], []
        for m, found, obj in plan:
            at = obj.data_ptr - buf.addr if buf is not None else -1
            if buf is not None and 0 <= at and at + m.total_bytes <= len(buf.view):
                inside.append((m, found.loc, at))
            else:
                outside.append((m, obj))
        if inside and buf is not None and batch.read_many(store, inside, buf, rep, strict=strict) == "moved":
            return "moved"
        for m, obj in outside:
            view = np.frombuffer(obj.byte_array, dtype=np.uint8)
            batch.read_many(store, [(m, None, 0)], batch.Dest(view, obj.data_ptr), rep)
        return "ok"

    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        return (await self.batched_get([key]))[0]

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        fut = self.gets.submit(lambda st: self._fetch(st, keys))
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:  # LMCache gave up waiting: what lands later goes back
            fut.add_done_callback(_release_result)
            raise
        except Unavailable:
            self.counters["values_missed_unavailable"] += len(keys)
        except Exception as e:  # noqa: BLE001 - nothing may escape into LMCache
            self.counters["retrieve_errors"] += 1
            self._say(f"retrieve failed: {type(e).__name__}: {e}")
        return [None] * len(keys)

    async def batched_get_non_blocking(self, lookup_id: str, keys: list[CacheEngineKey]) -> list[MemoryObj]:
        objs = await self.batched_get(keys)
        prefix: list[MemoryObj] = []
        for o in objs:
            if o is None:
                break
            prefix.append(o)
        _release(objs[len(prefix) :])  # LMCache uses the hit prefix only
        return prefix

    # -- saves -----------------------------------------------------------------------------
    def _value(self, store: Store, key: CacheEngineKey, obj: MemoryObj) -> tuple[str, mf.Manifest, list[memoryview]]:
        data = memoryview(obj.byte_array).cast("B")
        shapes, dtypes = obj.get_shapes(), obj.get_dtypes()
        header = RemoteMetadata(len(data), shapes, dtypes, obj.get_memory_format()).serialize()
        groups = [values.Group(tuple(s), d.itemsize) for s, d in zip(shapes, dtypes)]
        lengths = values.piece_lengths(groups, self.settings.window)
        if sum(lengths) != len(data):  # shapes that do not cover the bytes: plain pieces then
            lengths = values.piece_lengths([values.Group((len(data),), 1)], 0)
        pieces, at = [], 0
        for n in lengths:
            pieces.append(data[at : at + n])
            at += n
        body = values.encode_body(values.Body(key.to_string(), header, self.settings.window))
        m = store.build_object(mf.KIND_ENGINE, body, pieces, range(len(pieces)))
        return values.value_name(key.to_string()), m, pieces

    def _save(self, store: Store, keys: Sequence[CacheEngineKey], objs: Sequence[MemoryObj]) -> None:
        items = [self._value(store, k, o) for k, o in zip(keys, objs)]
        s = self.settings
        if s.pin or s.ttl:  # PUT_MANIFESTS carries them per manifest; the batch here uses the native save
            for name, m, pieces in items:
                store.save_manifest(name, m, pieces, pin=s.pin, ttl=s.ttl)
            self.counters["values_saved"] += len(items)
            return
        summary = batch.save_many(store, items)
        for transport, n in summary.sent_by.items():
            self.counters[f"values_sent_by_{transport}"] += n
        self.counters["values_saved"] += summary.committed
        self.counters["values_saved_warm"] += summary.warm
        self.counters["chunks_sent"] += summary.chunks_sent
        self.counters["values_save_failed"] += len(summary.failed)
        for name, why in summary.failed[:4]:
            self._say(f"save of {name!r} failed: {why}")

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        await self.batched_put([key], [memory_obj])

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[CacheEngineKey], memory_objs: list[MemoryObj]) -> None:
        """Returns once the bytes are read (LMCache drops its reference after); never raises."""
        n = len(keys)
        try:
            await asyncio.wrap_future(self.puts.submit(lambda st: self._save(st, keys, memory_objs)))
        except Unavailable:
            self.counters["values_dropped"] += n
        except Exception as e:  # noqa: BLE001 - nothing may escape into LMCache
            self.counters["values_dropped"] += n
            self._say(f"save failed: {type(e).__name__}: {e}")

    # -- the rest of the interface ---------------------------------------------------------
    async def list(self) -> list[str]:
        rows: list[dict[str, Any]] = await self._guarded("list", [], self.gets, lambda st: st.list(values.NAME_PREFIX))
        return [row["name"] for row in rows]

    def remove_sync(self, key: CacheEngineKey) -> bool:
        def remove(st: Store) -> bool:
            st.delete_manifest(values.value_name(key.to_string()))
            return True

        return self._wait("remove", False, remove)

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        """0 when the store answers, 1 when it does not."""
        ok = await self._guarded("ping", False, self.gets, lambda st: st.has_manifests([]) is not None)
        return 0 if ok else 1

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._close)

    def _close(self) -> None:
        self.puts.close()
        self.gets.close()

    def wait_saves(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` values were saved, dropped or failed in all (LMCache saves in the
        background); False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = self.counters
            if c["values_saved"] + c["values_dropped"] + c["values_save_failed"] >= n:
                return True
            time.sleep(0.01)
        return False

    def stats(self) -> dict:
        """The connector's counters and each connection's state (for tests, benchmarks, operators)."""
        return dict(self.counters) | {
            "lookup_up": self.gets.up, "save_up": self.puts.up, "lookup_down_reason": self.gets.down_reason,
            "save_down_reason": self.puts.down_reason, **{f"lookup_{k}": v for k, v in self.gets.counters.items()},
            **{f"save_{k}": v for k, v in self.puts.counters.items()},
        }  # fmt: skip

    def __repr__(self) -> str:
        return f"<RdmakvConnector {self.settings.url}>"

    # -- helpers ---------------------------------------------------------------------------
    async def _guarded(self, what: str, default: T, lane: Lane, fn: Callable[[Store], T]) -> T:
        try:
            return await asyncio.wrap_future(lane.submit(fn))
        except Exception as e:  # noqa: BLE001 - nothing may escape into LMCache
            return self._failed(what, default, e)

    def _wait(self, what: str, default: T, fn: Callable[[Store], T]) -> T:
        try:
            return self.gets.call(fn, self.settings.timeout + 5)
        except Exception as e:  # noqa: BLE001 - nothing may escape into LMCache
            return self._failed(what, default, e)

    def _failed(self, what: str, default: T, e: Exception) -> T:
        """A call that failed: counted (the store unreachable, or an error, said once per call)."""
        if isinstance(e, Unavailable):
            self.counters[f"{what}_unavailable"] += 1
        else:
            self.counters[f"{what}_errors"] += 1
            self._say(f"{what} failed: {type(e).__name__}: {e}")
        return default

    def _mismatch(self, why: str, key_string: str) -> None:
        """Count a value that does not fit; say why once per reason (the first key as example)."""
        self.counters["values_mismatched"] += 1
        self._say(f"a miss: {why} (first seen for {key_string!r}; logged once)", why)
        return None

    def _say(self, text: str, reason: str | None = None) -> None:
        """Log ``text`` once per ``reason`` (default: the text itself)."""
        reason = reason or text
        if reason in self._said or len(self._said) >= MAX_REASONS:
            return
        self._said.add(reason)
        log.warning("rdmakv: %s", text)


class RdmakvConnectorAdapter(ConnectorAdapter):
    """What ``remote_storage_plugin.rdmakv.class_name`` names: builds the connector for the
    plugin ``rdmakv`` (or ``rdmakv.<instance>``) from its ``url`` setting."""

    def __init__(self) -> None:
        super().__init__(f"plugin://{PLUGIN_TYPE}")

    def can_parse(self, url: str) -> bool:
        return url.startswith("plugin://") and extract_plugin_type(url[len("plugin://") :]) == PLUGIN_TYPE

    def create_connector(self, context: ConnectorContext) -> RemoteConnector:
        try:
            return RdmakvConnector.start(context)
        except (SettingsError, RdmakvError) as e:
            # LMCache's word for "stop, this cannot work": start-up fails with what is wrong
            raise IrrecoverableException(f"rdmakv LMCache plugin: {e}") from None


def _allocator_buffer(backend: Any) -> torch.Tensor | None:
    """The one CPU buffer LMCache's allocator hands out MemoryObjs from, if it has one."""
    alloc = getattr(backend, "memory_allocator", None)
    for holder in (alloc, getattr(alloc, "pin_allocator", None), getattr(alloc, "allocator", None)):
        buf = getattr(holder, "buffer", None)
        if isinstance(buf, torch.Tensor) and buf.device.type == "cpu" and buf.dtype == torch.uint8 \
                and buf.is_contiguous() and buf.numel() > 0:  # fmt: skip
            return buf
    return None


def _release(objs: Sequence[MemoryObj | None]) -> None:
    for o in objs:
        if o is not None:
            o.ref_count_down()


def _release_result(fut: Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        _release(fut.result())
