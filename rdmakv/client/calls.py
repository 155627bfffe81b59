"""The kv_store-style low-level calls of ``Store``: one call per server operation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fallback_tcp.transport import TcpChannel

from ..hashing import Key, key_function, keys_array
from ..wire import manifest as mf
from ..wire.batches import Found, Outcome
from ..wire.messages import SaveOptions
from .transport import TcpTransport


def save_options(pin: bool, ttl: float | None) -> SaveOptions:
    if ttl is not None and ttl <= 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl}")
    return SaveOptions(bool(pin), float(ttl or 0.0))


class LowLevel:
    """Mixin of Store: one call per server operation, as the kv_store_v1 ABI has them. It needs
    only the connection's channel, its TCP transport (the prefetch cache) and hash algorithm."""

    channel: TcpChannel
    tcp: TcpTransport
    hash_alg: int

    def exists(self, keys: Sequence[Key] | np.ndarray) -> np.ndarray:
        return self.channel.exists(keys_array(keys, _alg(keys, self.hash_alg)))

    def put_chunks(self, chunks: Sequence[bytes | memoryview]) -> list[Key]:
        """Store chunks (content-addressed, keyed with this connection's hash_alg); returns their keys."""
        key = key_function(self.hash_alg)
        keys = [key(c) for c in chunks]
        self.channel.put_chunks(keys, chunks)
        return keys

    def get_chunks(self, keys: Sequence[Key]) -> list[bytes | None]:
        """Chunks by key (None where absent); every chunk is verified against its key."""
        return self.channel.get_chunks([k if isinstance(k, bytes) else int(k) for k in keys])

    def prefetch(self, keys: Sequence[Key]) -> int:
        """Fetch chunks into a local cache that the next restore uses; returns bytes cached."""
        return self.tcp.cache.add([k if isinstance(k, bytes) else int(k) for k in keys], self.get_chunks)

    def put_manifest(
        self, name: str, manifest: bytes | mf.Manifest, *, pin: bool = False, ttl: float | None = None
    ) -> list[Key]:
        """Commit if every chunk is present; returns the missing keys (empty = committed)."""
        data = manifest.encode() if isinstance(manifest, mf.Manifest) else bytes(manifest)
        missing: list[Key] = self.channel.put_manifest(name, data, save_options(pin, ttl)).tolist()
        return missing

    def pin(self, name: str) -> None:
        """Keep a session in memory and on disk whatever the pressure (until ``unpin``)."""
        self.channel.pin(name, True)

    def unpin(self, name: str) -> None:
        self.channel.pin(name, False)

    def compact(self) -> dict[str, Any]:
        """Compact the server's log now; returns what it did (segments, bytes before and after)."""
        return self.channel.compact()

    def get_manifest(self, name: str) -> mf.Manifest:
        return mf.decode(self.channel.get_manifest(name)[0])

    def has_manifests(self, names: Sequence[str]) -> np.ndarray:
        """Which of ``names`` are committed sessions (a bool per name), in one round trip; the
        sessions are not touched (no promotion, no LRU move, not counted as restores)."""
        return self.channel.has_manifests(list(names))

    def put_manifests(
        self, items: Sequence[tuple[str, bytes | mf.Manifest]], *, pin: bool = False, ttl: float | None = None
    ) -> list[Outcome]:
        """Commit many manifests in one round trip, each only if every chunk it names is stored:
        per manifest an Outcome (``status`` COMMITTED, MISSING with its ``missing`` keys, or
        FAILED with that manifest's own error ``code`` and ``message``)."""
        opts = save_options(pin, ttl)
        return self.channel.put_manifests(
            [(n, m.encode() if isinstance(m, mf.Manifest) else bytes(m), opts) for n, m in items]
        )

    def get_manifests(
        self, names: Sequence[str], want_locations: bool = False
    ) -> tuple[list[Found], np.ndarray | None]:
        """Look many sessions up in one round trip: per name a Found (``status`` FOUND with the
        ``manifest`` bytes, ``tier`` and, when asked and RDMA is up, ``slots``; or NOT_FOUND),
        and the region table the slots refer to. The versions found are held for this
        connection until its next lookup, so their chunks stay while it fetches them."""
        return self.channel.get_manifests(list(names), want_locations)

    def delete_manifest(self, name: str) -> None:
        self.channel.delete_manifest(name)

    def list(self, prefix: str = "") -> list[dict[str, Any]]:
        return self.channel.list(prefix)

    def stats(self) -> dict[str, Any]:
        return self.channel.stats()


def _alg(keys: Sequence[Key] | np.ndarray, default: int) -> int:
    from ..wire.messages import alg_of

    if isinstance(keys, np.ndarray) or len(keys):
        return alg_of(keys)
    return default
