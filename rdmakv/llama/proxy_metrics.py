"""Prometheus counters of `rdmakv llama-proxy --auto-cache` (``--metrics-listen HOST:PORT``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from ..metrics_http import MetricsEndpoint


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.hits = Counter("rdmakv_llama_proxy_prefix_hits", "completions that resumed from a stored prefix "
                            "(source=store: restored into the slot first; source=slot: the slot held it)",
                            ["source"], registry=r)  # fmt: skip
        self.misses = Counter("rdmakv_llama_proxy_prefix_misses", "completions with no prefix stored or held",
                              registry=r)  # fmt: skip
        self.tokens_restored = Counter("rdmakv_llama_proxy_tokens_restored", "prompt tokens restored from the "
                                       "store instead of prefilled", registry=r)  # fmt: skip
        self.restore_failures = Counter("rdmakv_llama_proxy_restore_failures", "stored prefixes that could not "
                                        "be restored (the completion prefilled instead)", ["reason"], registry=r)
        self.saves = Counter("rdmakv_llama_proxy_background_saves", "slot states saved after a response "
                             "(result=ok|skipped|failed)", ["result"], registry=r)  # fmt: skip
        self.entries = Counter("rdmakv_llama_proxy_prefix_entries_committed", "prefix entries added to the store",
                               registry=r)  # fmt: skip
        self.store_errors = Counter("rdmakv_llama_proxy_store_errors", "store calls that failed (unreachable, "
                                    "timed out)", registry=r)  # fmt: skip
        self.restore_seconds = Histogram("rdmakv_llama_proxy_restore_seconds", "fetching a prefix and loading it "
                                         "into a slot", registry=r,
                                         buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))  # fmt: skip
        self.endpoint = MetricsEndpoint(self.registry)

    def listen(self, addr: str) -> tuple[str, int]:
        """Serve /metrics on ``HOST:PORT`` (port 0: any); returns the bound address."""
        return self.endpoint.listen(addr)

    def close(self) -> None:
        self.endpoint.close()
