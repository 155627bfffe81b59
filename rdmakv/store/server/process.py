"""`rdmakv serve` as a process: TLS, the descriptor limit, glibc's heap, the engine, the RDMA
exporter, metrics, systemd notification and signals around one ``Server``."""

from __future__ import annotations

import faulthandler
import resource
import signal
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from ...wire.keyring import KeyRing
from .. import logs
from ..engine.core import MAX_NAMESPACES, Engine
from .eventloop import Server, ServerLimits
from .sd_notify import Notifier


def server_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A TLS context for --tls-cert/--tls-key (both or neither)."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load the TLS certificate {cert} / key {key}: {e}") from e
    return ctx


def raise_fd_limit(want: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``want`` (up to the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


MMAP_THRESHOLD = 1 << 20


def return_large_allocations() -> None:
    """Make glibc map every allocation of 1 MiB or more on its own, so that freeing it gives the
    memory back. By default glibc raises that threshold (up to 32 MiB) each time such a block is
    freed, and then serves the next ones from its heap, which only grows: a few commits of large
    manifests (a decoded copy or two of each, gone a moment later) would leave the process
    holding hundreds of MiB that the store's accounting rightly says it does not use."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD: fixed, no more dynamic raising
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def run_server(
    listen: str,
    data_dir: str | Path,
    capacity: int,
    key: bytes | KeyRing,
    *,
    fsync: str = "manifest",
    transport: str = "auto",
    region_bytes: int = 64 << 20,
    limits: ServerLimits | None = None,
    disk_capacity: int | None = None,
    high_watermark: float = 0.9,
    quotas: dict[str, int] | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    ready: Callable[[Server], None] | None = None,
    metrics_listen: str | None = None,
    max_namespaces: int | None = None,
) -> None:
    """`rdmakv serve`: open the data dir, listen, serve until SIGTERM or SIGINT, stop cleanly."""
    return_large_allocations()
    tls = server_tls(tls_cert, tls_key)
    host, _, port = listen.rpartition(":")
    limits = limits or ServerLimits()
    fds = raise_fd_limit(limits.max_connections + 256)
    if fds < limits.max_connections + 64:
        limits.max_connections = max(16, fds - 64)
        logs.say(f"rdmakv serve: RLIMIT_NOFILE is {fds}: at most {limits.max_connections} connections, "
                 f"{limits.per_source} per source address (raise ulimit -n for more)")  # fmt: skip
    engine = Engine(
        data_dir, capacity, fsync=fsync, region_bytes=region_bytes, disk_capacity=disk_capacity,
        high_watermark=high_watermark, quotas=quotas, max_namespaces=max_namespaces or MAX_NAMESPACES,
    )  # fmt: skip
    engine.open()
    try:
        exporter = None
        if transport in ("auto", "rdma"):
            from .rdma_exporter import make_exporter

            exporter, why = make_exporter(engine)
            if exporter is None and transport == "rdma":
                raise SystemExit(f"rdmakv serve: --transport rdma but RDMA is unavailable: {why}")
            if exporter is None:
                logs.say(f"rdmakv serve: RDMA off ({why}); serving TCP only")
        server = Server(
            engine, key, host.strip("[]") or "127.0.0.1", int(port), limits=limits, rdma=exporter, tls=tls
        )
    except BaseException:
        engine.close()
        raise
    notifier = Notifier()
    if metrics_listen:
        from .metrics import ServerMetrics

        server.metrics = ServerMetrics(server)
        maddr = server.metrics.listen(metrics_listen)
        logs.say(f"rdmakv serve: metrics on http://{maddr[0]}:{maddr[1]}/metrics")
    stats = engine.replay_stats
    keys = "one shared key" if server.single_key else f"{len(server.keyring.entries)} keys from {server.keyring.source}"
    logs.say(
        f"rdmakv serve: listening on {server.url_base} data-dir={data_dir} capacity={capacity} "
        f"disk-capacity={engine.disk_capacity} fsync={fsync} rdma={'on' if exporter else 'off'} auth={keys} "
        f"tls={'on' if tls else 'off'} "
        f"(replayed {int(stats.get('manifests', 0))} manifests, {int(stats.get('chunks', 0))} chunks, "
        f"{int(stats.get('resident', 0))} resident, in {stats.get('replay_s', 0):.3f}s)", "info"
    )

    def on_signal(signum: int, _frame: object) -> None:
        server.say(f"rdmakv serve: {signal.Signals(signum).name}: finishing requests in progress, then stopping")
        notifier.stopping()
        server.request_stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit is an EFBIG, not a crash
        faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints every thread's stack to the log
    if ready is not None:
        ready(server)
    notifier.ready(f"serving {server.url_base}, {int(stats.get('manifests', 0))} sessions replayed")
    notifier.start_watchdog(server.alive)
    try:
        server.serve_forever()
    finally:
        notifier.stopping()
        notifier.close()
        if server.metrics is not None:
            server.metrics.close()
        server.stop()
        engine.close()
        logs.say("rdmakv serve: stopped (log synced and closed)")


__all__ = ["raise_fd_limit", "run_server", "server_tls"]
