"""The server's named limits (one dataclass, set from the command line or a config file)."""

from __future__ import annotations

from dataclasses import dataclass

from ...wire.protocol import DEFAULT_MAX_FRAME

PER_SOURCE_SHARE = 4  # by default one source address may hold a quarter of the connection cap


@dataclass
class ServerLimits:
    max_connections: int = 10_000
    max_per_source: int | None = None  # None: max_connections // PER_SOURCE_SHARE (the cap in force)
    handshake_timeout: float = 5.0
    idle_timeout: float = 300.0
    send_timeout: float = 30.0
    max_frame: int = DEFAULT_MAX_FRAME
    max_message: int = (1 << 31) + (1 << 20)  # a chunk as large as a manifest can name, framed
    max_inflight: int | None = None  # bytes of requests in flight, all connections (None: inflight.default_inflight)
    min_frame_rate: int = 1 << 20  # bytes/s a request must arrive at, after frame_grace (0: no floor)
    frame_grace: float = 2.0  # seconds a request may take before the floor applies
    workers: int = 8
    reservation_timeout: float = 10.0  # a save by RDMA WRITE must COMMIT within this
    admission_wait: float = 30.0  # a save waits this long for room other saves in flight hold, then BUSY
    parked_retry_s: float = 0.2  # parked saves are retried at least this often (and whenever room frees)
    max_reserved_bytes: int = 1 << 30  # larger saves send their chunks over TCP
    index_entries: int = 4096  # names per namespace a client can look up by READ (more: over TCP)

    @property
    def per_source(self) -> int:
        """The per-source cap in force: as set, else a share of the connection cap (so one
        address never holds every slot, however far RLIMIT_NOFILE lowered the cap)."""
        if self.max_per_source is not None:
            return self.max_per_source
        return max(1, self.max_connections // PER_SOURCE_SHARE)
