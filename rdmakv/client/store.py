"""The client API: ``rdmakv.connect(url)`` -> Store with save/restore and kv_store-style calls."""

from __future__ import annotations

import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Literal, overload

import numpy as np
import xxhash

from fallback_tcp.transport import TcpChannel

from ..errors import MissingChunksError, RdmakvError, StoreFullError
from ..hashing import HASH_XXH3_64, key_function, keys_array
from ..hashing import hash_alg as parse_hash_alg
from ..wire import chunking
from ..wire import manifest as mf
from ..wire.auth import key_from_env
from ..wire.messages import Locations, SaveOptions
from ..wire.protocol import mac_alg
from . import restore
from .calls import LowLevel, save_options
from .reports import KVState, RestoreReport, SaveReport
from .transport import TcpTransport, Transport
from .url import parse_url

if TYPE_CHECKING:
    from ..hashing import Key
    from ..rdma.restore import RdmaRestorer
    from ..wire.writes import Reservation

TRANSPORTS = ("auto", "rdma", "tcp")
BLOB_PIECE = 16 << 20

def client_tls(ca: str | None) -> ssl.SSLContext:
    """TLS for rdmakvs://: the server's certificate must check out against ``ca``
    (or $RDMAKV_TLS_CA, or the system's CAs) and name the URL's host."""
    ca = ca or os.environ.get("RDMAKV_TLS_CA") or None
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# (manifest, KV layout or None, restore buffer, each chunk's offset in it)
Fetched = tuple[mf.Manifest, "chunking.KVLayout | None", np.ndarray, np.ndarray]
Hook = Callable[..., object]  # a test's hook into a restore (rdma.restore: after_locate)


def connect(
    url: str,
    key: str | bytes | None = None,
    transport: str = "auto",
    window: int = chunking.DEFAULT_WINDOW,
    *,
    timeout: float | None = 60.0,
    pipeline_window: int = 64,
    hash_alg: str | int = "xxh3",
    mac: str = "poly1305",
    tls_ca: str | None = None,
) -> Store:
    """Open a store. ``key`` defaults to ``$RDMAKV_AUTH_KEY``; ``window`` is W in tokens;
    ``hash_alg`` ("xxh3" or "blake3") keys the chunks this connection saves; ``mac``
    ("poly1305", "blake3" or "hmac-sha256") authenticates its frames (a server from before
    Poly1305 refuses it: then BLAKE3). An ``rdmakvs://`` URL speaks TLS,
    verifying the server against ``tls_ca`` (default ``$RDMAKV_TLS_CA``, else the system's CAs)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    return Store(
        url, key_from_env(key), transport, window, timeout=timeout, pipeline_window=pipeline_window,
        hash_alg=hash_alg, mac=mac, tls_ca=tls_ca,
    )  # fmt: skip


class Store(LowLevel):
    def __init__(
        self,
        url: str,
        key: bytes,
        transport: str = "auto",
        window: int = chunking.DEFAULT_WINDOW,
        *,
        timeout: float | None = 60.0,
        pipeline_window: int = 64,
        hash_alg: str | int = HASH_XXH3_64,
        mac: str = "poly1305",
        tls_ca: str | None = None,
    ) -> None:
        self.url = parse_url(url)
        self.window = window
        self.hash_alg = parse_hash_alg(hash_alg)
        self.transport = transport
        self.channel = TcpChannel(
            self.url.host, self.url.port, self.url.namespace, key, timeout=timeout, window=pipeline_window,
            mac=mac_alg(mac), tls=client_tls(tls_ca) if self.url.tls else None,
        )  # fmt: skip
        self.server_info = self.channel.server_info
        self.tcp = TcpTransport(self.channel)
        self.rdma: RdmaRestorer | None = None  # the RDMA transport once connected
        self._rdma_reason = ""  # why RDMA is not up, when it was wanted
        self.rdma_writes = True  # saves WRITE their missing chunks when RDMA is up (False: TCP)
        self._decoded: OrderedDict[bytes, tuple[mf.Manifest, chunking.KVLayout]] = OrderedDict()
        if transport != "tcp":
            self._setup_rdma(required=transport == "rdma")

    def _setup_rdma(self, required: bool) -> None:
        from ..rdma.restore import open_restorer

        self.rdma, self._rdma_reason = open_restorer(self.tcp, self.server_info)
        if self.rdma is None and required:
            self.close()
            raise RdmakvError(f"transport='rdma' requested but RDMA is unavailable: {self._rdma_reason}")
        if self.rdma is not None:
            self.tcp.pool = self.rdma.pool  # TCP restores land in registered memory too: one pool

    @property
    def rdma_reason(self) -> str:
        """Why this connection does not use RDMA ("" when it does, or was never asked to)."""
        if self.rdma is not None:
            return self.rdma.latched_reason
        return self._rdma_reason

    @property
    def active_transport(self) -> str:
        return "rdma" if self.rdma is not None and self.rdma.usable else "tcp"

    def transports(self) -> list[Transport]:
        """The transports a restore tries, in order: RDMA while it is up, then TCP."""
        if self.rdma is not None and self.rdma.usable:
            return [self.rdma, self.tcp]
        return [self.tcp]

    def close(self) -> None:
        if self.rdma is not None:
            self.rdma.close()
            self.rdma = None
        self.channel.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- high level ---------------------------------------------------------------------
    def save(
        self, name: str, kv: KVState, window: int | None = None, *, pin: bool = False, ttl: float | None = None
    ) -> SaveReport:
        """Save a session: one round trip when every chunk is already stored.

        ``pin``: never demoted to disk or evicted (until ``unpin``); ``ttl``: seconds until the
        session expires."""
        t0 = time.perf_counter()
        manifest, chunks = chunking.split(kv, window or self.window, self.hash_alg)
        return self._save_manifest(name, manifest, chunks, t0, save_options(pin, ttl))

    def save_object(
        self,
        name: str,
        kind: int,
        body: bytes,
        chunks: Sequence[bytes | bytearray | memoryview],
        tags: Sequence[int],
        *,
        pin: bool = False,
        ttl: float | None = None,
    ) -> SaveReport:
        """Save any manifest kind (slot files, blobs): body + ordered chunks with tags."""
        t0 = time.perf_counter()
        manifest = self.build_object(kind, body, chunks, tags)
        return self._save_manifest(name, manifest, chunks, t0, save_options(pin, ttl))

    def build_object(
        self, kind: int, body: bytes, chunks: Sequence[bytes | bytearray | memoryview], tags: Sequence[int]
    ) -> mf.Manifest:
        """The manifest ``save_object`` commits: the chunks hashed with this connection's keys."""
        key = key_function(self.hash_alg)
        keys = keys_array([key(c) for c in chunks], self.hash_alg)
        lengths = np.fromiter((memoryview(c).nbytes for c in chunks), dtype=np.uint32, count=len(chunks))
        return mf.Manifest(kind, body, keys, lengths, np.asarray(tags, dtype=np.uint64), self.hash_alg)

    def put_blob(
        self, name: str, data: bytes | memoryview, *, pin: bool = False, ttl: float | None = None
    ) -> SaveReport:
        """A v1-style single blob (stored as opaque pieces of at most 16 MiB)."""
        view = memoryview(data).cast("B")
        pieces = [view[i : i + BLOB_PIECE] for i in range(0, max(len(view), 1), BLOB_PIECE)]
        return self.save_object(name, mf.KIND_OPAQUE, b"", pieces, range(len(pieces)), pin=pin, ttl=ttl)

    def get_blob(self, name: str) -> bytes:
        manifest, pieces = self.load_object(name)
        if manifest.kind != mf.KIND_OPAQUE:
            raise RdmakvError(f"{name!r} is a {mf.KIND_NAMES[manifest.kind]} manifest, not a blob")
        return b"".join(pieces)

    def save_manifest(
        self,
        name: str,
        manifest: mf.Manifest,
        chunks: Sequence[bytes | bytearray | memoryview | None],
        *,
        pin: bool = False,
        ttl: float | None = None,
    ) -> SaveReport:
        """Commit a built manifest; ``chunks[i]`` holds the bytes of ``manifest.keys[i]`` (None for
        one sent already). One round trip when the store has every chunk."""
        return self._save_manifest(name, manifest, chunks, time.perf_counter(), save_options(pin, ttl))

    def _save_manifest(
        self,
        name: str,
        manifest: mf.Manifest,
        chunks: Sequence[bytes | bytearray | memoryview | None],
        t0: float,
        opts: SaveOptions,
    ) -> SaveReport:
        ch = self.channel
        mark = ch.mark()
        data = manifest.encode()
        by_key = dict(zip(manifest.keys.tolist(), chunks))
        sent: set[Key] = set()
        transport, reason = "tcp", ""
        if self.rdma is not None and self.rdma.usable and self.rdma_writes:
            missing, res = ch.put_manifest_reserving(name, data, replace(opts, reserve=True))
            if res is not None:
                missing, transport, reason = self._write_reserved(name, data, opts, res, missing, by_key, sent)
        else:
            missing = ch.put_manifest(name, data, opts)
            reason = self.rdma_reason  # empty unless RDMA was wanted and is not up
        while len(missing):
            want = missing.tolist()
            if set(want) <= sent:
                raise StoreFullError(
                    f"save of {name!r}: the server dropped {len(want)} chunks of this save before the commit "
                    "(they are held for a minute: the save was too slow, or the server restarted)"
                )
            stray = [k for k in want if by_key.get(k) is None]
            if stray:
                raise MissingChunksError("server asked for chunks this save does not hold (not named, or sent "
                                         "ahead and dropped since)", stray)  # fmt: skip
            ch.put_chunks(want, [by_key[k] for k in want])
            sent.update(want)
            missing = ch.put_manifest(name, data, opts)
        sent_chunks = len(sent)
        unique = len(np.unique(manifest.keys))
        nbytes, rts = ch.usage_since(mark)
        return SaveReport(
            chunks_total=manifest.n_chunks,
            chunks_sent=sent_chunks,
            chunks_skipped=unique - sent_chunks if sent_chunks <= unique else 0,
            bytes_on_wire=nbytes,
            round_trips=rts,
            wall_s=time.perf_counter() - t0,
            transport=transport,
            manifest_bytes=len(data),
            fallback_reason=reason,
            manifest_xxh3=xxhash.xxh3_64_intdigest(data),
        )

    def _write_reserved(
        self, name: str, data: bytes, opts: SaveOptions, res: Reservation, missing: np.ndarray,
        by_key: dict[Key, bytes | bytearray | memoryview | None], sent: set[Key],
    ) -> tuple[np.ndarray, str, str]:
        """The reserved chunks by RDMA WRITE, then COMMIT: (still missing, transport, reason).
        A failed WRITE latches this connection to TCP and the save goes on over TCP."""
        keys = missing.tolist()
        if any(by_key.get(k) is None for k in keys):  # sent ahead (held, not in hand): TCP's loop says so
            return self.channel.put_manifest(name, data, opts), "tcp", "chunks sent ahead are not in hand"
        from ..rdma.errors import RdmaError
        from ..rdma.save import write_reserved

        rdma = self.rdma
        assert rdma is not None  # (only called when RDMA is usable)
        try:
            write_reserved(rdma, res, keys, by_key)
        except RdmaError as e:
            rdma.latch(f"RDMA WRITE failed ({e}); this connection now uses TCP")
            return self.channel.put_manifest(name, data, opts), "tcp", rdma.latched_reason
        sent.update(keys)
        return self.channel.commit_written(res.id, name, data, opts), "rdma", ""

    @overload
    def restore(self, name: str, report: Literal[False] = False, **hooks: Hook) -> KVState: ...
    @overload
    def restore(self, name: str, report: Literal[True], **hooks: Hook) -> tuple[KVState, RestoreReport]: ...
    @overload
    def restore(self, name: str, report: bool, **hooks: Hook) -> KVState | tuple[KVState, RestoreReport]: ...

    def restore(self, name: str, report: bool = False, **hooks: Hook) -> KVState | tuple[KVState, RestoreReport]:
        """Restore a session bit-exact; with ``report=True`` also a RestoreReport."""
        t0 = time.perf_counter()
        rep = RestoreReport()
        _, layout, buf, _ = self._fetch(name, rep, True, **hooks)
        assert layout is not None  # (asked for: kv=True)
        kv = chunking.assemble(layout, buf)
        rep.wall_s = time.perf_counter() - t0
        return (kv, rep) if report else kv

    def _fetch(self, name: str, rep: RestoreReport, kv: bool, **hooks: Hook) -> Fetched:
        """A manifest's chunks in one restore buffer: by RDMA READs when this connection can,
        else (or when RDMA fails) over TCP."""
        if self.rdma_reason and self.active_transport == "tcp":
            rep.fallback_reason = self.rdma_reason
        return restore.fetch(self.transports(), name, rep, lambda data: self.restore_target(data, kv),
                             hooks.get("after_locate"))  # fmt: skip

    def fetch_located(
        self, keys: np.ndarray, lengths: np.ndarray, loc: Locations | None, idx: np.ndarray, rep: RestoreReport
    ) -> tuple[np.ndarray, np.ndarray]:
        """(buffer, offsets): chunks ``idx`` of the manifest last read on this connection, back to
        back; by READs when ``loc`` (that manifest's locations) is given and RDMA is usable."""
        offsets, total = restore.packed(lengths)
        transports = self.transports() if loc is not None else [self.tcp]
        sub = loc.subset(idx) if loc is not None else None
        return restore.fill_located(transports, keys, lengths, offsets, sub, rep, total=total), offsets

    def restore_target(self, data: bytes, kv: bool) -> tuple[mf.Manifest, chunking.KVLayout | None, np.ndarray, int]:
        """(manifest, its KV layout when ``kv``, each chunk's offset in the restore buffer, buffer
        size). A KV manifest must match its session shape; any other kind lays its chunks back
        to back in manifest order."""
        if kv:
            m, layout = self.decode_kv(data)
            return m, layout, layout.chunk_table()[2], layout.total_bytes
        m = mf.decode(data)
        return m, None, m.packed_offsets(), m.total_bytes

    def decode_kv(self, data: bytes) -> tuple[mf.Manifest, chunking.KVLayout]:
        """Decode and validate a KV manifest; identical bytes decode once (repeat restores)."""
        hit = self._decoded.get(data)
        if hit is not None:
            self._decoded.move_to_end(data)
            return hit
        m = mf.decode(data)
        out = (m, chunking.decode_layout(m))
        self._decoded[data] = out
        if len(self._decoded) > 64:
            self._decoded.popitem(last=False)
        return out

    def load_object(self, name: str, report: RestoreReport | None = None) -> tuple[mf.Manifest, list[memoryview]]:
        """Any manifest plus its chunks (each verified against its key), in manifest order.

        Over RDMA when this connection can; the chunks are views of one buffer."""
        rep = report if report is not None else RestoreReport()
        t0 = time.perf_counter()
        m, _, buf, offsets = self._fetch(name, rep, False)
        view = buf.data
        rep.wall_s = time.perf_counter() - t0
        return m, [view[o : o + n] for o, n in zip(offsets.tolist(), m.lengths.tolist())]
