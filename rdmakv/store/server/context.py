"""What a connection, its handlers and its write path need of the server that owns them, as
Protocols: they are built by the event loop and call back into it, so naming the loop's class
here would make the server's modules import one another in a circle."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any, Protocol

from ...wire.frames import Frame
from ...wire.keyring import KeyRing
from ..engine.core import Engine
from ..engine.index import Holder
from .inflight import InflightBudget
from .limits import ServerLimits


class ServerContext(Protocol):
    engine: Engine
    limits: ServerLimits
    inflight: InflightBudget
    tls: ssl.SSLContext | None
    say: Callable[[str], None]
    keyring: KeyRing
    single_key: bool
    auth_failures: int
    internal_errors: int
    refused: int
    slow_closed: int

    @property
    def connections(self) -> int: ...

    rdma: Any  # the RdmaExporter when RDMA is enabled, else None
    cluster: Any  # the node's cluster membership when it is part of one, else None
    metrics: Any  # ServerMetrics with --metrics-listen, else None

    def submit(self, conn: Any, frame: Frame) -> None: ...

    def count_request(self, namespace: str, op: int) -> None: ...

    def count_qp(self, delta: int) -> None: ...

    def requests_of(self, namespace: str) -> dict[str, int]: ...


class RdmaSession(Protocol):
    """A client's RDMA connection as the exporter hands it over (its QP): closed with the connection."""

    def close(self) -> None: ...


class WriteContext(Protocol):
    """What one connection's write path needs of its handlers."""

    server: ServerContext
    engine: Engine
    ns: str
    holder: Holder
    rdma_session: RdmaSession | None
