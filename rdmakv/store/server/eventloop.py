"""The rdmakv server: one event loop for every connection, a bounded pool of workers.

The loop (``selectors``) accepts, reads and runs the handshakes; a connection costs a socket
and a few KiB until it sends a request, never a thread, so thousands of idle clients cost
little. Each whole request goes to one of ``workers`` threads, which calls the engine and sends
the reply; RDMA restores never get here at all (clients READ the slab). Every limit is named
in ``ServerLimits`` and checked before anything is allocated for it: connections overall and
per source address, the handshake's time and size, idle time, the frame and message sizes, and
how long a client may leave a reply unread. Out of file descriptors, a new connection is
refused (a spare descriptor is kept for saying so), and the server goes on.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...errors import ProtocolError
from ...wire.frames import Frame
from ...wire.keyring import KeyRing
from ...wire.protocol import Op
from .. import logs
from ..engine.core import Engine
from .connection import Connection, refuse
from .handlers import Parked
from .inflight import InflightBudget, default_inflight
from .limits import ServerLimits

MAX_COUNTED_NAMESPACES = 4096  # request counters kept per namespace, then pooled
LOOP_STALL_S = 5.0  # the event loop wakes at least every 0.5 s; this long without a turn is a hang


class Server:
    def __init__(
        self,
        engine: Engine,
        key: bytes | KeyRing,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_frame: int | None = None,
        limits: ServerLimits | None = None,
        rdma: object | None = None,
        log: Callable[[str], None] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.engine = engine
        self.tls = tls  # every connection speaks TLS (rdmakvs://) when set
        self.single_key = not isinstance(key, KeyRing)
        self.keyring = KeyRing.single(key) if isinstance(key, bytes) else key
        self.limits = limits or ServerLimits()
        if max_frame is not None:
            self.limits.max_frame = max_frame
        engine.max_missing = max(1, (self.limits.max_frame - 64) // 32)
        self.inflight = InflightBudget(self.limits.max_inflight or default_inflight(self.limits.max_frame))
        self.rdma = rdma  # rdmakv.store.server.rdma_exporter.RdmaExporter when RDMA is enabled
        # rdmakv.cluster.node.NodeAgent when the node is in a cluster: check_put(ns, name, manifest)
        # refuses a save placed by a stale member list; stats() goes into STATS
        self.cluster = None
        self.say = log or logs.say
        self.log = self.say
        self.listener = socket.create_server((host, port), reuse_port=False, backlog=1024)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()[:2]
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, Connection] = {}
        self._per_source: Counter[str] = Counter()
        self._ready: list[Connection] = []  # workers hand connections back here
        self._ready_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="rdmakv-worker")
        self._spare_fd: int | None = os.open(os.devnull, os.O_RDONLY)
        self._accept_paused_until = 0.0
        self._last_fd_warning = 0.0
        self._thread: threading.Thread | None = None
        self.metrics: Any = None  # ServerMetrics with --metrics-listen (Any: metrics imports this module)
        self.qps = 0  # RDMA QPs connected to clients now
        self.loop_turned = time.monotonic()
        self.auth_failures = 0
        self.refused = 0
        self.slow_closed = 0  # connections closed for sending a request under the byte-rate floor
        self.internal_errors = 0
        self._requests: dict[str, Counter[str]] = {}  # namespace -> op name -> requests served
        self._requests_lock = threading.Lock()
        # saves waiting for room (admission): retried when the engine says room came free, or on a timer
        self._parked: list[tuple[Connection, Parked]] = []
        self._room_freed = False
        self._parked_retry_at = 0.0
        engine.admission.on_room = self._on_room

    def count_request(self, namespace: str, op: int) -> None:
        """One request served for ``namespace`` (STATS shows a namespace its own counts). A
        namespace that holds nothing is not given counters: its requests are pooled."""
        name = Op(op).name if op in Op._value2member_map_ else "UNKNOWN"
        with self._requests_lock:
            per = self._requests.get(namespace)
            if per is None:
                if namespace not in self.engine.namespaces:
                    namespace = "(namespaces without data)"
                elif len(self._requests) >= MAX_COUNTED_NAMESPACES:
                    namespace = "(other namespaces)"
                per = self._requests.setdefault(namespace, Counter())
            per[name] += 1

    def count_qp(self, delta: int) -> None:
        with self._requests_lock:
            self.qps += delta

    def alive(self) -> bool:
        """The event loop turned recently (the watchdog's test: a wedged loop stops the pings)."""
        return not self._stopping.is_set() and time.monotonic() - self.loop_turned < LOOP_STALL_S

    def requests_of(self, namespace: str) -> dict[str, int]:
        with self._requests_lock:
            return dict(self._requests.get(namespace, {}))

    @property
    def url_base(self) -> str:
        host, port = self.address
        return f"rdmakv://{host}:{port}"

    @property
    def connections(self) -> int:
        return len(self._conns)

    # -- the loop -----------------------------------------------------------------------------
    def serve_forever(self) -> None:
        self._sel.register(self.listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_sweep = time.monotonic() + 0.5
        try:
            while not self._stopping.is_set():
                for key, _ in self._sel.select(0.5):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._readable(key.data)
                self._rearm()
                now = self.loop_turned = time.monotonic()
                self._retry_parked(now)
                if self._accept_paused_until and now >= self._accept_paused_until:
                    self._accept_paused_until = 0.0
                    self._sel.register(self.listener, selectors.EVENT_READ, "listen")
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + 0.5
        finally:
            self._stopped.set()

    def start(self) -> Server:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="rdmakv-io")
        self._thread.start()
        return self

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, peer = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._out_of_descriptors(e)
                    return
                if self._stopping.is_set():
                    return
                raise
            self._admit(sock, peer)

    def _out_of_descriptors(self, e: OSError) -> None:
        """Refuse the waiting connection with the spare descriptor, and pause accepting briefly."""
        now = time.monotonic()
        if now - self._last_fd_warning > 60:
            self._last_fd_warning = now
            self.say(f"rdmakv: out of file descriptors ({e.strerror}): refusing new connections "
                     f"({len(self._conns)} open; raise ulimit -n)")  # fmt: skip
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
            try:
                sock, _ = self.listener.accept()
                self.refused += 1
                refuse(sock, "server busy: out of file descriptors; try again later")
            except OSError:
                pass
            try:
                self._spare_fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                self._spare_fd = None
        self._sel.unregister(self.listener)
        self._accept_paused_until = now + 0.1

    def _admit(self, sock: socket.socket, peer: tuple) -> None:
        source = peer[0]
        lim = self.limits
        if self._stopping.is_set() or len(self._conns) >= lim.max_connections:
            self.refused += 1
            refuse(sock, f"server busy: {len(self._conns)} connections open (limit {lim.max_connections})")
            return
        if self._per_source[source] >= lim.per_source:
            self.refused += 1
            refuse(sock, f"server busy: {self._per_source[source]} connections from {source} (limit "
                         f"{lim.per_source} per source address)")  # fmt: skip
            return
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # a unix socket or a closed peer
        conn = Connection(self, sock, peer)
        self._conns[conn.fd] = conn
        self._per_source[source] += 1
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: Connection) -> None:
        if not conn.on_readable():
            self._close(conn)

    def submit(self, conn: Connection, frame: Frame) -> None:
        """(loop thread) A whole request: a worker has the connection until it hands it back,
        and the loop does not read it meanwhile."""
        self._sel.unregister(conn.sock)
        self._pool.submit(self._work, conn, frame)

    def _work(self, conn: Connection, frame: Frame | None, parked: Parked | None = None) -> None:
        try:
            keep = conn.resume(parked) if parked is not None else conn.serve(frame)  # type: ignore[arg-type]  # (a frame unless parked)
        except BaseException as e:  # noqa: BLE001 - never lose a connection in a worker silently
            conn.send_error(conn.internal_error(e, "in a worker (connection closed)"))  # (request id 0: all of it)
            keep = False
        if isinstance(keep, Parked):  # stays busy and unread until it runs again
            with self._ready_lock:
                self._parked.append((conn, keep))
            return
        conn.from_worker()
        conn.last_active = time.monotonic()
        if not keep:
            conn.close_requested = True
        with self._ready_lock:
            self._ready.append(conn)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the loop is awake already

    def _on_room(self) -> None:
        """(any thread, engine lock held) Memory may have come free: parked saves try again."""
        if self._parked and not self._room_freed:
            self._room_freed = True
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass

    def _retry_parked(self, now: float) -> None:
        """(loop thread) Hand parked saves back to the workers, oldest first."""
        if not self._parked or (not self._room_freed and now < self._parked_retry_at):
            return
        with self._ready_lock:
            parked, self._parked = self._parked, []
            self._room_freed = False
        self._parked_retry_at = now + self.limits.parked_retry_s
        for conn, p in parked:
            if self._stopping.is_set():
                conn.from_worker()
                conn.close_requested = True
                continue
            self._pool.submit(self._work, conn, None, p)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _rearm(self) -> None:
        with self._ready_lock:
            ready, self._ready = self._ready, []
        for conn in ready:
            if conn.close_requested or self._stopping.is_set():
                self._close(conn)
                continue
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
            if not conn.process():  # a whole request may already be buffered
                self._close(conn)

    def _sweep(self, now: float) -> None:
        lim = self.limits
        for conn in list(self._conns.values()):
            if conn.busy:
                continue
            if conn.state != Connection.OPEN and now > conn.deadline:
                self.say(f"rdmakv: {conn.peer}: no handshake within {lim.handshake_timeout:g} s; closed")
                self._close(conn)
            elif now - conn.last_active > lim.idle_timeout:
                self._close(conn)
            elif self._too_slow(conn, now):
                self._close(conn)
            elif conn.handlers is not None:
                conn.handlers.writes.expire(now)  # not busy: no request of its own is running

    def _too_slow(self, conn: Connection, now: float) -> bool:
        why = conn.too_slow(now)
        if why is None:
            return False
        self.say(f"rdmakv: {conn.peer}: {why}")
        self.slow_closed += 1
        conn.send_error(ProtocolError(why), timeout=0.0)
        return True

    def _close(self, conn: Connection) -> None:
        if self._conns.pop(conn.fd, None) is None:
            return
        if not conn.busy:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        self._per_source[conn.source] -= 1
        if self._per_source[conn.source] <= 0:
            del self._per_source[conn.source]
        conn.close()

    # -- stopping -----------------------------------------------------------------------------
    def request_stop(self) -> None:
        """(any thread, a signal handler included) Ask the loop to stop: it stops accepting, and
        ``serve_forever`` returns once it has noticed."""
        self._stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let requests in progress finish (for up to ``timeout`` seconds), then
        hang up on every connection."""
        self._stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        elif threading.current_thread() is not threading.main_thread():
            self._stopped.wait(max(0.1, deadline - time.monotonic()))
        with self._ready_lock:  # saves still waiting for room are not answered: their clients see the close
            parked, self._parked = self._parked, []
        for conn, _ in parked:
            conn.from_worker()
        while any(c.busy for c in list(self._conns.values())) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for conn in list(self._conns.values()):
            self._close(conn)
        try:
            self.listener.close()
        except OSError:
            pass
        for fd in (self._wake_r, self._wake_w, self._spare_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._spare_fd = None
