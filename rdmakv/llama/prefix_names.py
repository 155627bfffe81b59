"""Names of the auto-cache's prefix entries: a chained hash of token windows (pure).

A prompt's first ``k`` windows of W tokens are named by ``h_k``, where ``h_0`` is a seed made of
the model's identity and W, and ``h_k = xxh3_128(h_{k-1} || tokens of window k)``. So equal
prefixes under one model get equal names whichever conversation they came from, and one hash
per window names every window-aligned prefix of a prompt. A prefix of any length ``L`` (an
exact conversation state, ending inside a window) is ``xxh3_128(h_{L // W} || the rest)``; since
a window step always hashes exactly W tokens, the two never coincide for different lengths.

The hash only finds candidates: a restore checks the entry's own token ids against the prompt
(they are stored with it), so a collision is a miss, never a wrong restore.
"""

from __future__ import annotations

import numpy as np
import xxhash

NAME_PREFIX = "auto/"  # never a llama-server slot filename (those cannot contain "/")
SEED_DOMAIN = b"rdmakv auto-cache prefix v1\0"
MAX_PREFIX_WINDOWS = 4096  # windows named per prompt (1M tokens at W=256): bounds a lookup's names


def seed(model_key: str, window: int) -> bytes:
    """``h_0``: prompts under different models (or windows) never share a name."""
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    return xxhash.xxh3_128_digest(SEED_DOMAIN + window.to_bytes(4, "little") + model_key.encode())


def as_tokens(tokens) -> np.ndarray:
    """Token ids as little-endian int32 (what slot files and the hashes use)."""
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError("tokens must be a flat sequence of integers")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 1 << 31):
        raise ValueError("token ids must be in [0, 2**31)")
    return np.ascontiguousarray(arr, dtype="<i4")


def window_chain(h0: bytes, tokens: np.ndarray, window: int, limit: int = MAX_PREFIX_WINDOWS) -> list[bytes]:
    """``[h_1, ..., h_K]`` for the K = min(len // W, limit) whole windows of ``tokens``."""
    raw = as_tokens(tokens).data.cast("B")
    step = 4 * window
    out: list[bytes] = []
    h = h0
    for k in range(min(len(raw) // step, limit)):
        h = xxhash.xxh3_128_digest(h + raw[k * step : (k + 1) * step])
        out.append(h)
    return out


def prefix_digest(h0: bytes, chain: list[bytes], tokens: np.ndarray, length: int, window: int) -> bytes:
    """The name hash of ``tokens[:length]`` given its window chain (``chain[k-1]`` is ``h_k``)."""
    k, rest = divmod(length, window)
    if length < 1 or k > len(chain) or length > len(tokens):
        raise ValueError(f"prefix length {length} is outside the {len(tokens)} tokens / {len(chain)} windows")
    base = chain[k - 1] if k else h0
    if not rest:
        return base
    tail = as_tokens(tokens[k * window : length]).data.cast("B")
    return xxhash.xxh3_128_digest(base + tail)


def entry_name(digest: bytes) -> str:
    return NAME_PREFIX + digest.hex()


def window_names(chain: list[bytes]) -> list[str]:
    """Entry names of the window-aligned prefixes, shortest first."""
    return [entry_name(h) for h in chain]


def tail_lengths(k: int, n_tokens: int, window: int) -> range:
    """Lengths that end inside window ``k`` (after k whole windows): the exact-state candidates
    a prompt of ``n_tokens`` tokens can extend beyond its longest stored window prefix."""
    return range(k * window + 1, min(n_tokens, (k + 1) * window - 1) + 1)
