"""Serving a Prometheus registry on ``--metrics-listen HOST:PORT`` (the server and the llama
proxy both do): parsed and bound in one place."""

from __future__ import annotations

from typing import Any


class MetricsEndpoint:
    """/metrics of one registry, from prometheus_client's own HTTP thread, until ``close``."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self._http: Any = None

    def listen(self, addr: str) -> tuple[str, int]:
        """Serve on ``HOST:PORT`` (port 0: any; ``[::1]:PORT`` for IPv6); returns the bound address."""
        from prometheus_client import start_http_server

        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--metrics-listen wants HOST:PORT, got {addr!r}")
        self._http, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        return self._http.server_address[:2]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
