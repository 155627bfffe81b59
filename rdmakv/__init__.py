"""rdmakv: a KV-cache store for LLM inference servers with an RDMA-direct restore path."""

from __future__ import annotations

__version__ = "0.1.0"

from .client import Store, connect  # noqa: E402
from .errors import (  # noqa: E402
    AuthError,
    IntegrityError,
    MissingChunksError,
    NotFoundError,
    RdmakvError,
    StoreFullError,
)
from .kvstate import KVState, RestoreReport, SaveReport  # noqa: E402

__all__ = [
    "AuthError",
    "IntegrityError",
    "KVState",
    "MissingChunksError",
    "NotFoundError",
    "RdmakvError",
    "RestoreReport",
    "SaveReport",
    "Store",
    "StoreFullError",
    "__version__",
    "connect",
]
