"""The rdmakv server: TCP control plane and TCP data path over the Engine.

One thread per connection (blocking sockets keep the frame handling simple and
let pyverbs calls block without an event loop); the Engine's lock serialises
store updates. RDMA restores never reach this code: clients READ the slab
directly, so the server spends CPU only on the control round trip.
"""

from __future__ import annotations

import faulthandler
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fallback_tcp.framed import FramedSocket, server_handshake

from .. import __version__
from ..errors import (
    AuthError,
    CodecError,
    ConnectionLost,
    NotFoundError,
    ProtocolError,
    RdmakvError,
    ServerError,
)
from ..wire import messages as msg
from ..wire.protocol import DEFAULT_MAX_FRAME, FLAG_RESPONSE, Op
from .engine import Engine


class Server:
    def __init__(
        self,
        engine: Engine,
        key: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        rdma: object | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.key = key
        self.max_frame = max_frame
        self.rdma = rdma  # rdmakv.rdma.exporter.RdmaExporter when RDMA is enabled
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.listener = socket.create_server((host, port), reuse_port=False, backlog=128)
        self.address = self.listener.getsockname()[:2]
        self._stopping = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._conns: set[_Connection] = set()
        self._lock = threading.Lock()

    @property
    def url_base(self) -> str:
        host, port = self.address
        return f"rdmakv://{host}:{port}"

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self.listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve_conn, args=(sock, peer), daemon=True)
            with self._lock:
                self._threads.add(t)
            t.start()

    def start(self) -> Server:
        threading.Thread(target=self.serve_forever, daemon=True, name="rdmakv-accept").start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let requests in progress finish (for up to ``timeout`` seconds), then
        hang up on every connection."""
        self._stopping.set()
        try:
            self.listener.close()
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                conns = list(self._conns)
            busy = [c for c in conns if c.busy]
            for c in conns:
                if not c.busy or time.monotonic() > deadline:
                    c.hang_up()
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))

    # -- one connection ---------------------------------------------------------------
    def _serve_conn(self, sock: socket.socket, peer: tuple) -> None:
        conn = _Connection(self, FramedSocket(sock, self.max_frame), peer)
        with self._lock:
            self._conns.add(conn)
        try:
            conn.run()
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())


class _Connection:
    def __init__(self, server: Server, fs: FramedSocket, peer: tuple) -> None:
        self.server = server
        self.engine = server.engine
        self.fs = fs
        self.peer = f"{peer[0]}:{peer[1]}"
        self.ns = ""
        self.busy = False  # between receiving a request and sending its reply
        self.holder = self.engine.new_holder()
        self.rdma_session: object | None = None
        self.scratch = bytearray()  # GET_CHUNKS replies are staged here, reused across requests
        self.handlers: dict[int, Callable[[memoryview], list]] = {
            Op.EXISTS: self.on_exists,
            Op.PUT_CHUNKS: self.on_put_chunks,
            Op.GET_CHUNKS: self.on_get_chunks,
            Op.PUT_MANIFEST: self.on_put_manifest,
            Op.GET_MANIFEST: self.on_get_manifest,
            Op.DELETE_MANIFEST: self.on_delete_manifest,
            Op.LIST: self.on_list,
            Op.STATS: self.on_stats,
            Op.LOCATE: self.on_locate,
            Op.RDMA_CONNECT: self.on_rdma_connect,
            Op.PIN: self.on_pin,
            Op.COMPACT: self.on_compact,
        }

    def run(self) -> None:
        fs = self.fs
        try:
            info = {
                "server": "rdmakv",
                "version": __version__,
                "max_frame": self.server.max_frame,
                "rdma": self.server.rdma is not None,
            }
            self.ns = server_handshake(fs, self.server.key, info)
        except (ProtocolError, CodecError) as e:
            self.server.log(f"rdmakv: {self.peer}: handshake failed: {e}")
            self._send_error_plain(e)
            self._linger()
            return
        except (AuthError, ConnectionLost, OSError) as e:
            self.server.log(f"rdmakv: {self.peer}: handshake failed: {e}")
            self._linger()
            return
        while True:
            before = fs.bytes_received
            try:
                header, payload = fs.recv()
            except ConnectionLost:
                return
            except (AuthError, ProtocolError, CodecError) as e:
                # The byte stream can no longer be trusted: say why, then hang up.
                self.server.log(f"rdmakv: {self.peer} ns={self.ns}: closing: {e}")
                self._send_error_plain(e)
                self._linger()
                return
            except OSError:
                return
            self.busy = True
            try:
                parts = self.dispatch(header.op, payload)
                op, resp = header.op, parts
            except RdmakvError as e:
                op, resp = Op.ERROR, [msg.enc_error(e.code, str(e), getattr(e, "missing", None))]
            except Exception as e:  # noqa: BLE001 - a bug must not kill the server
                self.server.log(f"rdmakv: {self.peer}: internal error on op {header.op}: {e!r}")
                op, resp = Op.ERROR, [msg.enc_error(ServerError.code, f"internal server error: {e!r}")]
            with self.engine.lock:
                counters = self.engine.namespace(self.ns).counters
                counters["bytes_received"] += fs.bytes_received - before
            try:
                sent = fs.send(op, FLAG_RESPONSE, header.req_id, resp)
            except OSError:
                return
            finally:
                self.busy = False
            with self.engine.lock:
                counters["bytes_sent"] += sent
            if self.server._stopping.is_set():
                return

    def hang_up(self) -> None:
        try:
            self.fs.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_error_plain(self, e: RdmakvError) -> None:
        try:
            self.fs.send_plain(Op.ERROR, FLAG_RESPONSE, 0, msg.enc_error(e.code, str(e)))
        except OSError:
            pass

    def _linger(self) -> None:
        """Half-close and drain briefly so the peer reads our error instead of a reset."""
        sock = self.fs.sock
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(1.0)
            for _ in range(16):
                if not sock.recv(65536):
                    break
        except OSError:
            pass

    def dispatch(self, op: int, payload: memoryview) -> list:
        handler = self.handlers.get(op)
        if handler is None:
            raise ProtocolError(f"unknown opcode {op}")
        return handler(payload)

    def close(self) -> None:
        self.engine.release_holder(self.holder)
        if self.rdma_session is not None:
            try:
                self.rdma_session.close()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001
                pass
        self.fs.close()

    # -- handlers ------------------------------------------------------------------------
    def on_exists(self, payload: memoryview) -> list:
        keys = msg.dec_keys(payload)
        return [msg.enc_bitmap(self.engine.exists(self.ns, keys))]

    def on_put_chunks(self, payload: memoryview) -> list:
        items = msg.dec_put_chunks(payload)
        stored, existed = self.engine.put_chunks(self.ns, items, self.holder)
        return [msg.enc_put_result(stored, existed)]

    def on_get_chunks(self, payload: memoryview) -> list:
        keys = msg.dec_keys(payload)
        self.scratch, chunks = self.engine.read_chunks_into(self.ns, keys.tolist(), self.scratch)
        return msg.enc_chunks(chunks)

    def on_put_manifest(self, payload: memoryview) -> list:
        name, data, opts = msg.dec_put_manifest(payload)
        missing = self.engine.commit_manifest(self.ns, name, bytes(data), self.holder, pin=opts.pin, ttl=opts.ttl)
        return [msg.enc_manifest_result(missing)]

    def on_get_manifest(self, payload: memoryview) -> list:
        name, flags = msg.dec_get_manifest(payload)
        want = bool(flags & msg.GET_WANT_LOCATIONS) and self.rdma_session is not None
        data, loc, tier = self.engine.get_manifest(self.ns, name, want, self.holder)
        return msg.enc_manifest_reply(data, loc, tier)

    def on_pin(self, payload: memoryview) -> list:
        name, pinned = msg.dec_pin(payload)
        self.engine.set_pin(self.ns, name, pinned)
        return []

    def on_compact(self, payload: memoryview) -> list:
        if len(payload):
            raise ProtocolError("COMPACT takes no payload")
        return [msg.enc_json(self.engine.compact())]

    def on_locate(self, payload: memoryview) -> list:
        keys = msg.dec_keys(payload)
        return [self.engine.locate(self.ns, keys).encode()]

    def on_delete_manifest(self, payload: memoryview) -> list:
        self.engine.delete_manifest(self.ns, msg.dec_name_only(payload))
        return []

    def on_list(self, payload: memoryview) -> list:
        prefix = bytes(payload).decode("utf-8", "strict") if len(payload) else ""
        return [msg.enc_json(self.engine.list(self.ns, prefix))]

    def on_stats(self, payload: memoryview) -> list:
        stats = self.engine.stats(self.ns)
        stats["rdma"] = self.server.rdma is not None
        if self.server.rdma is not None:
            stats["rdma_device"] = getattr(self.server.rdma, "device_name", "")
        return [msg.enc_json(stats)]

    def on_rdma_connect(self, payload: memoryview) -> list:
        exporter = self.server.rdma
        if exporter is None:
            raise NotFoundError("this server has no RDMA device; use TCP")
        if self.rdma_session is not None:
            self.rdma_session.close()  # type: ignore[attr-defined]
            self.rdma_session = None
        self.rdma_session, reply = exporter.connect(self.ns, bytes(payload))  # type: ignore[attr-defined]
        # QP info, then the namespace's region table (later regions arrive with every location reply)
        regions = self.engine.locate(self.ns, np.zeros(0, dtype=np.uint64)).encode()
        return [reply, regions]


def run_server(
    listen: str,
    data_dir: str | Path,
    capacity: int,
    key: bytes,
    *,
    fsync: str = "manifest",
    transport: str = "auto",
    region_bytes: int = 64 << 20,
    max_frame: int = DEFAULT_MAX_FRAME,
    disk_capacity: int | None = None,
    high_watermark: float = 0.9,
    quotas: dict[str, int] | None = None,
    ready: Callable[[Server], None] | None = None,
) -> None:
    """`rdmakv serve`: open the data dir, listen, serve until SIGTERM or SIGINT, stop cleanly."""
    host, _, port = listen.rpartition(":")
    engine = Engine(
        data_dir, capacity, fsync=fsync, region_bytes=region_bytes, disk_capacity=disk_capacity,
        high_watermark=high_watermark, quotas=quotas,
    )  # fmt: skip
    engine.open()
    try:
        exporter = None
        if transport in ("auto", "rdma"):
            from ..rdma.exporter import make_exporter

            exporter, why = make_exporter(engine)
            if exporter is None and transport == "rdma":
                raise SystemExit(f"rdmakv serve: --transport rdma but RDMA is unavailable: {why}")
            if exporter is None:
                print(f"rdmakv serve: RDMA off ({why}); serving TCP only", file=sys.stderr)
        server = Server(engine, key, host.strip("[]") or "127.0.0.1", int(port), max_frame=max_frame, rdma=exporter)
    except BaseException:
        engine.close()
        raise
    stats = engine.replay_stats
    print(
        f"rdmakv serve: listening on {server.url_base} data-dir={data_dir} capacity={capacity} "
        f"disk-capacity={engine.disk_capacity} fsync={fsync} rdma={'on' if exporter else 'off'} "
        f"(replayed {int(stats.get('manifests', 0))} manifests, {int(stats.get('chunks', 0))} chunks, "
        f"{int(stats.get('resident', 0))} resident, in {stats.get('replay_s', 0):.3f}s)",
        file=sys.stderr,
        flush=True,
    )

    def on_signal(signum: int, _frame: object) -> None:
        server.log(f"rdmakv serve: {signal.Signals(signum).name}: finishing requests in progress, then stopping")
        server._stopping.set()
        try:
            server.listener.close()  # the accept below returns
        except OSError:
            pass

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit is an EFBIG, not a crash
        faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints every thread's stack to the log
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.stop()
        engine.close()
        print("rdmakv serve: stopped (log synced and closed)", file=sys.stderr, flush=True)


__all__ = ["Server", "run_server"]
