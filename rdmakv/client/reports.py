"""The session KV state and the reports the client returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class KVState:
    """A session's KV cache: per-layer K and V arrays plus its token ids.

    ``k[l]`` is ``[n_tokens, n_embd_k]``; ``v[l]`` is ``[n_tokens, n_embd_v]``, or
    ``[n_embd_v, n_tokens]`` when ``v_trans``. The element type is opaque bytes of
    a known size; all layers share one dtype.
    """

    k: list[np.ndarray]
    v: list[np.ndarray]
    tokens: np.ndarray
    v_trans: bool = False

    def __post_init__(self) -> None:
        self.tokens = np.ascontiguousarray(self.tokens, dtype=np.uint32)
        if self.tokens.ndim != 1:
            raise ValueError("tokens must be a 1-D array")
        if len(self.k) != len(self.v):
            raise ValueError(f"{len(self.k)} K layers but {len(self.v)} V layers")
        if not self.k:
            raise ValueError("a KV state needs at least one layer")
        dtype = self.k[0].dtype
        n = self.n_tokens
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            if k.dtype != dtype or v.dtype != dtype:
                raise ValueError(f"layer {i}: all K/V arrays must share dtype {dtype}")
            if k.ndim != 2 or v.ndim != 2:
                raise ValueError(f"layer {i}: K and V must be 2-D")
            v_tokens = v.shape[1] if self.v_trans else v.shape[0]
            if k.shape[0] != n or v_tokens != n:
                raise ValueError(f"layer {i}: token axis must be {n} (tokens array length)")

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_layer(self) -> int:
        return len(self.k)

    @property
    def dtype(self) -> np.dtype:
        return self.k[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def equals(self, other: KVState) -> bool:
        """Bit-exact comparison (NaN payloads included)."""
        if self.v_trans != other.v_trans or self.n_layer != other.n_layer:
            return False
        if not np.array_equal(self.tokens, other.tokens):
            return False
        for a, b in zip(self.k + self.v, other.k + other.v):
            if a.dtype != b.dtype or a.shape != b.shape:
                return False
            if np.ascontiguousarray(a).tobytes() != np.ascontiguousarray(b).tobytes():
                return False
        return True


@dataclass
class SaveReport:
    chunks_total: int = 0
    chunks_sent: int = 0
    chunks_skipped: int = 0
    bytes_on_wire: int = 0
    round_trips: int = 0
    wall_s: float = 0.0
    transport: str = "tcp"
    manifest_bytes: int = 0
    manifest_xxh3: int = 0  # of the manifest as committed: names this version of the save
    fallback_reason: str = ""  # why a connection with RDMA sent this save's bytes over TCP


@dataclass
class RestoreReport:
    transport: str = "tcp"
    chunks: int = 0
    bytes: int = 0
    round_trips: int = 0
    wall_s: float = 0.0
    reads_posted: int = 0
    fallback_chunks: int = 0
    retried_chunks: int = 0
    fallback_reason: str = ""
    tier: str = "memory"  # "disk": the session was demoted and read back from the log first
    lookup: str = "tcp"  # "one-sided": manifest and locations came by READ from the index
    index_misses: int = 0  # the name was not in the index (lookup went over TCP)
    index_retries: int = 0  # an entry or blob changed under the READ and was read again
    index_fallbacks: int = 0  # still inconsistent after the retry, or a chunk moved: TCP lookup
    notes: list[str] = field(default_factory=list)
