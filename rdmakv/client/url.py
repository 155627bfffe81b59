"""``rdmakv://host:port/namespace`` URLs."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

DEFAULT_PORT = 9900
DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True)
class StoreURL:
    host: str
    port: int
    namespace: str
    tls: bool = False  # rdmakvs://

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"rdmakv{'s' if self.tls else ''}://{host}:{self.port}/{quote(self.namespace, safe='')}"


def parse_url(url: str) -> StoreURL:
    parts = urlsplit(url)
    if parts.scheme not in ("rdmakv", "rdmakvs"):
        raise ValueError(f"not an rdmakv URL (want rdmakv://host:port/namespace, or rdmakvs:// for TLS): {url!r}")
    if not parts.hostname:
        raise ValueError(f"rdmakv URL has no host: {url!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as e:
        raise ValueError(f"bad port in {url!r}") from e
    ns = unquote(parts.path.strip("/")) or DEFAULT_NAMESPACE
    if "/" in ns or len(ns.encode()) > 255:
        raise ValueError(f"namespace must be one path segment of at most 255 bytes: {ns!r}")
    if not ns.isprintable():
        raise ValueError(f"namespace must be printable (no control characters): {ns!r}")
    return StoreURL(parts.hostname, port, ns, parts.scheme == "rdmakvs")
