"""Prometheus metrics of one server (`rdmakv serve --metrics-listen HOST:PORT`), with the
official ``prometheus_client``.

Two kinds. What the store already counts and measures (namespace counters, usage, the log) is
read at scrape time by a collector, so the hot path pays nothing for it. What only the request
path sees (service times, errors by code, fsync times) is recorded as it happens. Labels are only ``namespace`` (at most
MAX_METRIC_NAMESPACES of them, then ``_other``), ``transport``, ``tier``, ``op`` and ``code``:
never a session name. A restore whose lookup was one-sided (an RDMA READ of the published
index) never reaches the server, so it is not counted here; the client's report has it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ...metrics_http import MetricsEndpoint
from ...wire.protocol import Op

if TYPE_CHECKING:

    from .eventloop import Server

MAX_METRIC_NAMESPACES = 256  # label values per metric: namespaces past this are counted as "_other"
OTHER = "_other"
SAVE_OPS: dict[int, str] = {Op.PUT_CHUNKS: "put_chunks", Op.PUT_MANIFEST: "put_manifest", Op.COMMIT: "commit"}
RESTORE_OPS: dict[int, str] = {Op.GET_MANIFEST: "get_manifest", Op.GET_CHUNKS: "get_chunks"}
LATENCY_BUCKETS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
FSYNC_BUCKETS = (0.0001, 0.0005, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)

# namespace counter -> (metric name, help)
NS_COUNTERS = {
    "bytes_received": ("rdmakv_bytes_received", "Bytes received from clients (frames as they came)"),
    "bytes_sent": ("rdmakv_bytes_sent", "Bytes sent to clients over TCP"),
    "chunks_stored": ("rdmakv_chunks_stored", "Chunks stored (new content)"),
    "chunks_deduped": ("rdmakv_chunks_deduplicated", "Chunks received that the store already held (not stored "
                       "again)"),
    "chunks_referenced": ("rdmakv_chunks_referenced", "Distinct chunks of each committed session; 1 - stored / "
                          "referenced is the dedup ratio (a warm save sends none of them)"),
    "evictions": ("rdmakv_evictions", "Sessions evicted from the disk tier"),
    "demotions": ("rdmakv_demotions", "Sessions demoted from memory to disk"),
    "promotions": ("rdmakv_promotions", "Sessions promoted from disk to memory"),
    "expirations": ("rdmakv_expirations", "Sessions whose TTL ran out"),
    "deletes": ("rdmakv_deletes", "Sessions deleted by clients"),
    "orphans_kept": ("rdmakv_orphans_kept", "Chunks kept as cache when the last session naming them was replaced"),
    "orphans_evicted": ("rdmakv_orphans_evicted", "Orphan chunks dropped for disk room (the first to go)"),
}
BY_TRANSPORT = ("saves_tcp", "saves_rdma", "lookups_tcp_memory", "lookups_tcp_disk", "lookups_rdma_memory",
                "lookups_rdma_disk")  # fmt: skip
# namespace figure -> (metric name, help)
NS_GAUGES = {
    "used_bytes": ("rdmakv_used_bytes", "Memory tier bytes charged to the namespace"),
    "resident_bytes": ("rdmakv_resident_bytes", "Chunk bytes resident in registered memory"),
    "pinned_bytes": ("rdmakv_pinned_bytes", "Bytes of pinned sessions"),
    "disk_bytes": ("rdmakv_disk_live_bytes", "Live log bytes of the namespace"),
    "manifests": ("rdmakv_sessions", "Sessions stored"),
    "resident_sessions": ("rdmakv_resident_sessions", "Sessions resident in memory"),
    "orphan_bytes": ("rdmakv_orphan_bytes", "Bytes of chunks no session names, kept as evictable cache"),
}


class ServerMetrics:
    """The registry of one server, and the recording calls its request path makes."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=True)
        self._namespaces: set[str] = set()
        self._lock = threading.Lock()
        r = self.registry
        self.errors = Counter("rdmakv_errors", "Requests that failed, by error code", ["namespace", "code"],
                              registry=r)  # fmt: skip
        self.save_seconds = Histogram("rdmakv_save_seconds", "Service time of save requests",
                                      ["namespace", "op"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.restore_seconds = Histogram("rdmakv_restore_seconds", "Service time of restore requests",
                                         ["namespace", "op"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.fsync_seconds = Histogram("rdmakv_fsync_seconds", "Time of each fsync of the log",
                                       buckets=FSYNC_BUCKETS, registry=r)  # fmt: skip
        r.register(_StoreCollector(self))
        server.engine.log.on_fsync = self.fsync_seconds.observe
        self.endpoint = MetricsEndpoint(self.registry)

    def label(self, ns: str) -> str:
        """The namespace as a label value: bounded, so a client inventing names cannot grow it."""
        if ns in self._namespaces:
            return ns
        with self._lock:
            if len(self._namespaces) < MAX_METRIC_NAMESPACES:
                self._namespaces.add(ns)
                return ns
        return OTHER

    # --- recording (the request path) -------------------------------------------------------
    def request(self, ns: str, op: int, seconds: float) -> None:
        if op in SAVE_OPS:
            self.save_seconds.labels(self.label(ns), SAVE_OPS[op]).observe(seconds)
        elif op in RESTORE_OPS:
            self.restore_seconds.labels(self.label(ns), RESTORE_OPS[op]).observe(seconds)

    def error(self, ns: str, code: int) -> None:
        self.errors.labels(self.label(ns), str(code)).inc()

    # --- serving ------------------------------------------------------------------------------
    def listen(self, addr: str) -> tuple[str, int]:
        """Serve /metrics on ``HOST:PORT`` (port 0: any); returns the bound address."""
        return self.endpoint.listen(addr)

    def close(self) -> None:
        self.endpoint.close()


class _StoreCollector:
    """What the engine and server already keep, read at scrape time."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def describe(self):
        return []  # collected fresh on every scrape

    def collect(self) -> Iterator[Metric]:
        srv = self.m.server
        engine = srv.engine
        t0 = time.perf_counter()
        counters = {k: CounterMetricFamily(n, h, labels=["namespace"]) for k, (n, h) in NS_COUNTERS.items()}
        gauges = {k: GaugeMetricFamily(n, h, labels=["namespace"]) for k, (n, h) in NS_GAUGES.items()}
        saves = CounterMetricFamily("rdmakv_saves", "Sessions committed, by how their missing chunks came",
                                    labels=["namespace", "transport"])  # fmt: skip
        restores = CounterMetricFamily("rdmakv_restores", "Session lookups served, by the transport the client "
                                       "then reads with and the tier the session was in (one-sided RDMA lookups "
                                       "never reach the server)",
                                       labels=["namespace", "transport", "tier"])  # fmt: skip
        per: dict[str, dict] = {}
        for ns in sorted(engine.namespaces):
            s = engine.stats(ns)
            row = per.setdefault(self.m.label(ns), dict.fromkeys([*NS_COUNTERS, *NS_GAUGES, *BY_TRANSPORT], 0))
            for k in row:
                row[k] += int(s.get(k) or 0)
        for label, row in per.items():
            for k, fam in counters.items():
                fam.add_metric([label], row[k])
            for k, gauge in gauges.items():
                gauge.add_metric([label], row[k])
            for t in ("tcp", "rdma"):
                saves.add_metric([label, t], row[f"saves_{t}"])
                for tier in ("memory", "disk"):
                    restores.add_metric([label, t, tier], row[f"lookups_{t}_{tier}"])
        yield from counters.values()
        yield from gauges.values()
        yield saves
        yield restores
        st = engine.store_stats()
        for name, value, help_ in (
            ("rdmakv_capacity_bytes", st["capacity_bytes"], "Memory tier capacity (--capacity)"),
            ("rdmakv_memory_used_bytes", st["memory_used_bytes"], "Memory tier bytes in use, all namespaces"),
            ("rdmakv_disk_capacity_bytes", st["disk_capacity_bytes"] or 0, "Disk tier capacity (--disk-capacity)"),
            ("rdmakv_disk_used_bytes", st["disk_bytes"], "Bytes of the log on disk"),
            ("rdmakv_connections", srv.connections, "Client connections open now"),
            ("rdmakv_rdma_qps", srv.qps, "RDMA queue pairs connected to clients now"),
            ("rdmakv_inflight_bytes", srv.inflight.used, "Bytes of requests in flight now (--max-inflight)"),
        ):
            yield GaugeMetricFamily(name, help_, value=value)
        for name, value, help_ in (
            ("rdmakv_auth_failures", srv.auth_failures, "Handshakes refused: unknown key, wrong namespace, expired"),
            ("rdmakv_connections_refused", srv.refused, "Connections refused at a limit or out of descriptors"),
            ("rdmakv_internal_errors", srv.internal_errors, "Requests that hit a bug (the catch-all)"),
            ("rdmakv_inflight_refused", srv.inflight.refused, "Requests refused BUSY by the in-flight budget"),
            ("rdmakv_slow_requests_closed", srv.slow_closed, "Connections closed for a request under "
             "--min-frame-rate"),
            ("rdmakv_fsyncs", st["fsyncs"], "fsyncs of the log"),
            ("rdmakv_damaged_records", st["damaged_records"], "Log records found damaged (skipped) at replay"),
        ):
            yield CounterMetricFamily(name, help_, value=value)
        yield GaugeMetricFamily("rdmakv_scrape_seconds", "Time this scrape spent reading the store",
                                value=time.perf_counter() - t0)  # fmt: skip
