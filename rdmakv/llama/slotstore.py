"""llama.cpp slot files in the store: chunked and deduplicated when they parse, whole when not."""

from __future__ import annotations

import threading
from collections import OrderedDict

import xxhash

from ..client.reports import RestoreReport, SaveReport
from ..client.store import Store
from ..errors import MissingChunksError
from ..wire import manifest as mf
from . import prefix_entry, slotfile

RECENT_MANIFEST_BYTES = 16 << 20  # manifests kept for re-saves of byte-identical files


class RecentManifests:
    """Manifests of recently saved files by content: a file saved again byte for byte (a slot
    saved twice with no new tokens, one system prompt saved from every slot) is committed from
    its manifest without parsing, cutting or hashing its chunks again. An LRU bounded in bytes."""

    def __init__(self, limit: int = RECENT_MANIFEST_BYTES) -> None:
        self.limit, self.used = limit, 0
        self._items: OrderedDict[tuple, tuple[mf.Manifest, str, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ident: tuple) -> tuple[mf.Manifest, str] | None:
        with self._lock:
            hit = self._items.get(ident)
            if hit is None:
                return None
            self._items.move_to_end(ident)
            return hit[0], hit[1]

    def put(self, ident: tuple, manifest: mf.Manifest, error: str) -> None:
        size = len(manifest.body) + manifest.n_chunks * 24
        if size > self.limit:
            return
        with self._lock:
            old = self._items.pop(ident, None)
            if old is not None:
                self.used -= old[2]
            self._items[ident] = (manifest, error, size)
            self.used += size
            while self.used > self.limit:
                self.used -= self._items.popitem(last=False)[1][2]


RECENT = RecentManifests()


def put_slotfile(
    store: Store, name: str, data: bytes | bytearray | memoryview, window: int | None = None,
    recent: RecentManifests | None = RECENT,
) -> tuple[SaveReport, str]:  # fmt: skip
    """Store a slot file; returns (report, parse error or ""). Unparseable files are kept whole."""
    window = window or store.window
    ident = (xxhash.xxh3_128_digest(data), window, store.hash_alg) if recent is not None else None
    hit = recent.get(ident) if recent is not None and ident is not None else None
    if hit is not None:
        try:  # every chunk is still stored: one round trip, nothing cut or hashed
            return store.save_manifest(name, hit[0], [None] * hit[0].n_chunks), hit[1]
        except MissingChunksError:
            pass  # some were evicted since: cut and send them
    body, cut, error = slotfile.split_any(data, window)
    chunks = [c for _, c in cut]
    manifest = store.build_object(mf.KIND_SLOTFILE, body, chunks, [t for t, _ in cut])
    report = store.save_manifest(name, manifest, chunks)
    if recent is not None and ident is not None:
        recent.put(ident, manifest, error or "")
    return report, error or ""


def get_slotfile(store: Store, name: str, report: RestoreReport | None = None) -> bytes:
    """The exact bytes that were stored under ``name``."""
    return b"".join(get_slotfile_parts(store, name, report)[0])


def get_slotfile_parts(store: Store, name: str, report: RestoreReport | None = None) -> tuple[list, int]:
    """(the file as consecutive parts, checked whole; the xxh3 of the manifest they came from)."""
    manifest, pieces = store.load_object(name, report)
    if manifest.kind != mf.KIND_SLOTFILE:
        raise slotfile.SlotFileError(f"{name!r} is a {mf.KIND_NAMES[manifest.kind]} manifest, not a slot file")
    if prefix_entry.is_entry_body(manifest.body):  # an auto-cache prefix: the file it restores
        parts = prefix_entry.synthesize(prefix_entry.decode_body(manifest.body), pieces)
    else:
        parts = slotfile.rebuild_parts(manifest.body, pieces)
    return parts, xxhash.xxh3_64_intdigest(manifest.encode())


def manifest_xxh3(store: Store, name: str) -> int:
    """Which version of ``name`` the store holds now (one small round trip; NotFoundError if none)."""
    data, _, _ = store.channel.get_manifest(name)
    return xxhash.xxh3_64_intdigest(data)
