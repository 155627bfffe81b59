"""rdmakv: a KV-cache store for LLM inference servers with an RDMA-direct restore path.

The public API lives here: ``connect``/``Store``, ``KVState``, the reports and the errors.
The client is imported on first use, so that ``rdmakv.wire`` (which ``fallback_tcp`` builds
on) can be imported without pulling in the client, which itself builds on ``fallback_tcp``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .client.reports import KVState, RestoreReport, SaveReport
from .errors import (
    AuthError,
    IntegrityError,
    MissingChunksError,
    NotFoundError,
    RdmakvError,
    StoreFullError,
)

if TYPE_CHECKING:
    from .client.store import Store
    from .cluster.client import ClusterStore

_LAZY = {"Store"}
CLUSTER_SCHEME = "rdmakv+etcd://"


def connect(url: str, *args: Any, **kwargs: Any) -> Store | ClusterStore:
    """Open a store: ``rdmakv://HOST:PORT/NAMESPACE`` (one server, ``rdmakvs://`` with TLS) or
    ``rdmakv+etcd://HOST:2379/CLUSTER/NAMESPACE`` (a cluster: its members read from etcd and
    watched). See :func:`rdmakv.client.store.connect` and :func:`rdmakv.cluster.client.connect_cluster`."""
    if url.startswith(CLUSTER_SCHEME):
        from .cluster.client import connect_cluster

        return connect_cluster(url, *args, **kwargs)
    from .client.store import connect as connect_one

    return connect_one(url, *args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from .client import store

        return getattr(store, name)
    raise AttributeError(f"module 'rdmakv' has no attribute {name!r}")


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
