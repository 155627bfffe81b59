"""Client side of the TCP path: requests, pipelined batches, verified chunk fetches.

This is the fallback transport and the baseline every RDMA number is compared
against, so the hot loops avoid per-chunk work where a batch will do: chunks
go out in scatter-gather frames of up to ``batch_bytes`` with up to ``window``
frames in flight, and come back in frames of up to ``fetch_bytes``.
"""

from __future__ import annotations

import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from rdmakv.errors import AuthError, ConnectionLost, ProtocolError, RdmakvError
from rdmakv.wire import batches
from rdmakv.wire import messages as msg
from rdmakv.wire import writes as wr
from rdmakv.wire.messages import Key, key_hex
from rdmakv.wire.protocol import (
    DEFAULT_MAC,
    DEFAULT_MAX_FRAME,
    FLAG_MORE,
    FLAG_RESPONSE,
    MAC_BLAKE3,
    MAC_POLY1305,
    OLD_SERVER_MAC_REFUSAL,
    Op,
)
from rdmakv.wire.runs import contiguous_runs

from .framed import FramedSocket, client_handshake, raise_error_frame

DEFAULT_WINDOW = 64
DEFAULT_BATCH_BYTES = 512 << 10
DEFAULT_FETCH_BYTES = 8 << 20  # per GET_CHUNKS (2-16 MiB restore alike since replies stream: protocol.STREAM_PIECE)


class TcpChannel:
    """One authenticated connection to a server namespace."""

    def __init__(
        self,
        host: str,
        port: int,
        namespace: str,
        key: bytes,
        *,
        timeout: float | None = 60.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        window: int = DEFAULT_WINDOW,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        fetch_bytes: int = DEFAULT_FETCH_BYTES,
        mac: int = DEFAULT_MAC,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.namespace = namespace
        self.window = window
        self.batch_bytes = batch_bytes
        self.fetch_bytes = min(fetch_bytes, max_frame // 2)
        self._req = 0
        self._following: int | None = None  # a request whose chunks follow its reply, not yet taken
        self._closed_by: RdmakvError | None = None  # why the connection was closed, once it was
        self.round_trips = 0
        try:
            self.fs, self.server_info = self._open(host, port, namespace, key, timeout, max_frame, mac, tls)
        except ProtocolError as e:
            if mac != MAC_POLY1305 or not str(e).startswith(OLD_SERVER_MAC_REFUSAL):
                raise
            # a server from before Poly1305 (older rdmakv 0.1.0) refuses it: BLAKE3 is as safe
            self.fs, self.server_info = self._open(host, port, namespace, key, timeout, max_frame, MAC_BLAKE3, tls)
        self.mac = self.fs.auth.alg if self.fs.auth is not None else mac

    @staticmethod
    def _open(host: str, port: int, namespace: str, key: bytes, timeout: float | None, max_frame: int, mac: int,
              tls: ssl.SSLContext | None) -> tuple[FramedSocket, dict]:  # fmt: skip
        """A connected, authenticated socket and what the server said about itself."""
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ConnectionLost(f"cannot reach rdmakv server at {host}:{port}: {e.strerror or e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=host)
            except (ssl.SSLError, OSError) as e:
                sock.close()
                raise AuthError(f"TLS with {host}:{port} failed: {getattr(e, 'reason', None) or e}") from e
        fs = FramedSocket(sock, max_frame)
        try:
            return fs, client_handshake(fs, key, namespace, mac)
        except BaseException:
            fs.close()
            raise

    # -- counters ------------------------------------------------------------------------
    @property
    def bytes_sent(self) -> int:
        return self.fs.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.fs.bytes_received

    def mark(self) -> tuple[int, int]:
        """A point to measure traffic from (see usage_since)."""
        return self.fs.bytes_sent + self.fs.bytes_received, self.round_trips

    def usage_since(self, mark: tuple[int, int]) -> tuple[int, int]:
        """(bytes on the wire both ways, round trips) since ``mark``."""
        return self.fs.bytes_sent + self.fs.bytes_received - mark[0], self.round_trips - mark[1]

    def close(self) -> None:
        self.fs.close()

    # -- request machinery -----------------------------------------------------------------
    def _send(self, op: int, parts: Sequence[bytes | memoryview]) -> int:
        if self._closed_by is not None:
            raise self._closed_by
        if self._following is not None:  # chunks sent after a manifest that nobody took: read past them
            req, self._following = self._following, None
            self._recv(req)
        self._req += 1
        try:
            self.fs.send(op, 0, self._req, parts)
        except OSError as e:
            raise ConnectionLost(f"connection to the server lost while sending: {e}") from e
        return self._req

    def _recv(self, req_id: int) -> memoryview:
        if self._closed_by is not None:
            raise self._closed_by
        try:
            header, payload = self.fs.recv()
        except OSError as e:
            raise ConnectionLost(f"connection to the server lost: {e}") from e
        return self._answer(header, payload, req_id)

    def _answer(self, header, payload: memoryview, req_id: int) -> memoryview:
        """The reply to request ``req_id``, its id checked before anything in it is believed (an
        error included). An authenticated error with id 0 is the server's word on the whole
        connection (a limit, a bad frame): it closes it, and so does this side. Any other id
        means the stream is out of step: the connection is closed, never read further."""
        if header.flags & FLAG_RESPONSE and header.req_id == req_id:
            if header.op == Op.ERROR:
                raise_error_frame(payload)
            return payload
        if header.flags & FLAG_RESPONSE and header.req_id == 0 and header.op == Op.ERROR:
            try:
                raise_error_frame(payload)
            except RdmakvError as e:
                self._close_with(e)
                raise
        raise self._close_with(ProtocolError(f"response {header.req_id} (opcode {header.op}) does not answer "
                                             f"request {req_id}; the connection is out of step and was "
                                             "closed"))  # fmt: skip

    def _close_with(self, error: RdmakvError) -> RdmakvError:
        self._closed_by = error
        self.fs.close()
        return error

    def request(self, op: int, parts: Sequence[bytes | memoryview]) -> memoryview:
        """One round trip; the reply view is valid until the next receive."""
        req = self._send(op, parts)
        self.round_trips += 1
        return self._recv(req)

    def pipeline(
        self,
        op: int,
        requests: Sequence[Sequence[bytes | memoryview]],
        on_reply: Callable[[int, memoryview], None],
    ) -> None:
        """Send ``requests`` keeping up to ``window`` in flight; replies arrive in order.

        If a reply is an error, the remaining replies are still read (the stream
        stays in sync) and the first error is raised at the end.
        """
        inflight: deque[tuple[int, int]] = deque()
        first_error: RdmakvError | None = None
        if requests:
            self.round_trips += 1
        for i, parts in enumerate(requests):
            if len(inflight) >= self.window:
                first_error = self._drain_one(inflight, on_reply, first_error)
            inflight.append((i, self._send(op, parts)))
        while inflight:
            first_error = self._drain_one(inflight, on_reply, first_error)
        if first_error is not None:
            raise first_error

    def _drain_one(self, inflight: deque, on_reply: Callable, first_error: RdmakvError | None):
        i, req = inflight.popleft()
        try:
            payload = self._recv(req)
            if first_error is None:
                on_reply(i, payload)
        except ConnectionLost:
            raise
        except RdmakvError as e:
            return first_error or e
        return first_error

    # -- operations ------------------------------------------------------------------------
    def exists(self, keys: np.ndarray) -> np.ndarray:
        return msg.dec_bitmap(self.request(Op.EXISTS, [msg.enc_keys(keys)]))

    def put_chunks(self, keys: Sequence[Key], chunks: Sequence[bytes | memoryview]) -> tuple[int, int]:
        """Pipelined batch put; returns (stored, already present)."""
        frames: list[list[bytes | memoryview]] = []
        start, size = 0, 0
        for i, c in enumerate(chunks):
            size += memoryview(c).nbytes
            if size >= self.batch_bytes or i == len(chunks) - 1:
                frames.append(msg.enc_put_chunks(keys[start : i + 1], chunks[start : i + 1]))
                start, size = i + 1, 0
        totals = [0, 0]

        def add(_: int, payload: memoryview) -> None:
            stored, existed = msg.dec_put_result(payload)
            totals[0] += stored
            totals[1] += existed

        self.pipeline(Op.PUT_CHUNKS, frames, add)
        return totals[0], totals[1]

    def fetch_chunks(
        self, keys: Sequence[Key], lengths: Sequence[int], dest: memoryview, offsets: Sequence[int]
    ) -> None:
        """Pipelined batched GET of distinct keys, chunk i received straight into
        ``dest[offsets[i]:]`` and checked against its key. A reply covers what fits in a frame;
        the keys it leaves out are asked for again."""
        dests = _Places(dest, offsets, lengths)
        index = {k: i for i, k in enumerate(keys)}
        if len(index) != len(keys):
            raise ValueError("fetch_chunks wants distinct keys")
        todo = list(range(len(keys)))
        while todo:
            batches: list[list[int]] = [[]]
            size = 0
            for i in todo:
                if batches[-1] and size + lengths[i] > self.fetch_bytes:
                    batches.append([])
                    size = 0
                batches[-1].append(i)
                size += lengths[i]
            left: list[int] = []
            inflight: deque[tuple[list[int], int]] = deque()
            first_error: RdmakvError | None = None
            self.round_trips += 1
            for b in batches:
                if len(inflight) >= self.window:
                    first_error = self._reap_chunks(inflight, index, lengths, dests, left, first_error)
                inflight.append((b, self._send(Op.GET_CHUNKS, [msg.enc_keys([keys[i] for i in b])])))
            while inflight:
                first_error = self._reap_chunks(inflight, index, lengths, dests, left, first_error)
            if first_error is not None:
                raise first_error
            todo = left

    def _reap_chunks(self, inflight, index, lengths, dests, left: list[int], first_error):
        batch, req = inflight.popleft()
        try:
            got = self._recv_chunks_into(req, index, lengths, dests)
        except ConnectionLost:
            raise
        except RdmakvError as e:
            return first_error or e
        if not got:
            return first_error or ProtocolError("GET_CHUNKS reply served nothing")
        asked = set(batch)
        if not got <= asked:
            raise ProtocolError("GET_CHUNKS reply holds chunks of another request")
        left.extend(i for i in batch if i not in got)
        return first_error

    def _recv_chunks_into(self, req_id: int, index: dict, lengths: Sequence[int], dests: _Places,
                          skip_foreign: bool = False) -> set[int]:  # fmt: skip
        """Receive one GET_CHUNKS reply with its chunk bytes landing in ``dests`` (the MAC is
        checked over them as they lie); a continued or unusual reply takes the general path.
        A chunk not asked for breaks the protocol, unless ``skip_foreign``: then the reply is read
        past (its MAC checked) and nothing is taken from it."""
        fs = self.fs
        if self._closed_by is not None:
            raise self._closed_by
        try:
            h = fs.recv_header()
            if h.plain or h.flags & FLAG_MORE or h.op != Op.GET_CHUNKS:
                return self._chunks_slow(req_id, h, index, lengths, dests)
            if not h.flags & FLAG_RESPONSE or h.req_id != req_id:
                raise ProtocolError(f"response {h.req_id} does not answer request {req_id}")
            if h.length < 9:
                raise ProtocolError("GET_CHUNKS reply too short")
            head = memoryview(bytearray(9))
            fs.recv_exact(head)
            alg, n, m = head[0], *msg.struct_u32x2(head[1:9])
            if alg not in msg.KEY_BYTES or n > msg.MAX_KEYS or m > msg.MAX_KEYS:
                raise ProtocolError("GET_CHUNKS reply's table is out of range")
            table_len = msg.chunk_table_size(alg, n, m)
            if 9 + table_len > h.length:
                raise ProtocolError("GET_CHUNKS reply's table does not fit it")
            table = memoryview(bytearray(table_len))
            fs.recv_exact(table)
            served, absent = msg.dec_chunk_table(alg, n, m, table)
            idx = []
            for k, ln, _ in served:
                i = index.get(k)
                if i is None or lengths[i] != ln:
                    if skip_foreign:
                        fs.recv_verified(h, [head, table], [memoryview(bytearray(h.length - 9 - table_len))])
                        return set()
                    raise ProtocolError(f"GET_CHUNKS reply holds chunk {key_hex(k)}, which was not asked for")
                idx.append(i)
            if 9 + table_len + sum(lengths[i] for i in idx) != h.length:
                raise ProtocolError("GET_CHUNKS reply lengths do not add up to its size")
            runs = dests.runs(idx)  # chunks that lie back to back become one receive
            fs.recv_verified(h, [head, table], runs)
        except OSError as e:
            raise ConnectionLost(f"connection to the server lost: {e}") from e
        except (ProtocolError, msg.CodecError) as e:  # the byte stream is out of step now: nothing more can be read
            raise self._close_with(ConnectionLost(f"GET_CHUNKS reply broke the protocol: {e}")) from e
        if absent:
            raise msg_missing(absent[0])
        got = set()
        for (k, _, check), i in zip(served, idx):
            msg.verify_chunk(k, dests[i], check=check)
            got.add(i)
        return got

    def _chunks_slow(self, req_id: int, h, index, lengths, dests) -> set:
        fs = self.fs
        payload = fs.finish_frame(h)
        whole = fs.assemble(h, payload)
        while whole is None:
            h2 = fs.recv_header()
            whole = fs.assemble(h2, fs.finish_frame(h2))
        header, payload = whole
        served, absent = msg.dec_chunks(self._answer(header, payload, req_id))
        if absent:
            raise msg_missing(absent[0])
        got = set()
        for k, data, check in served:
            i = index.get(k)
            if i is None:
                raise ProtocolError(f"GET_CHUNKS reply holds chunk {key_hex(k)}, which was not asked for")
            msg.verify_chunk(k, data, lengths[i], check)
            dests[i][:] = data
            got.add(i)
        return got

    def get_chunks(self, keys: Sequence[Key]) -> list[bytes | None]:
        """Chunks of unknown length: requests of up to 256 keys, each reply verified by key."""
        found: dict[Key, bytes | None] = {}
        todo = list(dict.fromkeys(keys))
        while todo:
            part, todo = todo[:256], todo[256:]
            served, absent = msg.dec_chunks(self.request(Op.GET_CHUNKS, [msg.enc_keys(part)]))
            for k, data, check in served:
                msg.verify_chunk(k, data, check=check)
                found[k] = bytes(data)
            for k in absent:
                found[k] = None
            rest = [k for k in part if k not in found]
            if len(rest) == len(part):
                raise ProtocolError("GET_CHUNKS reply served nothing")
            todo = rest + todo
        return [found[k] for k in keys]

    def put_manifest(self, name: str, manifest: bytes, options: msg.SaveOptions | None = None) -> np.ndarray:
        reply = self.request(Op.PUT_MANIFEST, msg.enc_put_manifest(name, manifest, options or msg.SaveOptions()))
        return msg.dec_manifest_result(reply).copy()

    def put_manifest_reserving(
        self, name: str, manifest: bytes, options: msg.SaveOptions
    ) -> tuple[np.ndarray, wr.Reservation | None]:
        """PUT_MANIFEST that may answer missing chunks with a write reservation (RDMA saves)."""
        missing, res = wr.dec_put_result(self.request(Op.PUT_MANIFEST, msg.enc_put_manifest(name, manifest, options)))
        if res is not None:
            res = wr.Reservation(res.id, res.expires_ms, res.windows.copy(), res.addrs.copy())
        return missing.copy(), res

    def commit_written(self, reservation_id: int, name: str, manifest: bytes, options: msg.SaveOptions) -> np.ndarray:
        """COMMIT after the reserved chunks were written: what is still missing (normally nothing)."""
        parts = wr.enc_commit(reservation_id, msg.enc_put_manifest(name, manifest, options))
        return wr.dec_put_result(self.request(Op.COMMIT, parts))[0].copy()

    def get_manifest(self, name: str, want_locations: bool = False) -> tuple[bytes, msg.Locations | None, str]:
        """(manifest, chunk locations when asked and the server exports RDMA, tier)."""
        flags = msg.GET_WANT_LOCATIONS if want_locations else 0
        data, loc, tier, _ = msg.dec_manifest_reply(self.request(Op.GET_MANIFEST, [msg.enc_get_manifest(name, flags)]))
        return bytes(data), None if loc is None else loc.copy(), tier

    def get_manifest_with_chunks(self, name: str) -> tuple[bytes, str]:
        """(manifest, tier), asking the server to send the session's first chunks right after it
        (messages.GET_WITH_CHUNKS): ``take_following`` receives them into place, and any other
        request first reads past them. A small session is restored in one round trip."""
        req = self._send(Op.GET_MANIFEST, [msg.enc_get_manifest(name, msg.GET_WITH_CHUNKS)])
        self.round_trips += 1
        data, _, tier, follows = msg.dec_manifest_reply(self._recv(req))
        self._following = req if follows else None
        return bytes(data), tier

    @property
    def following(self) -> bool:
        return self._following is not None

    def take_following(
        self, keys: Sequence[Key], lengths: Sequence[int], dest: memoryview, offsets: Sequence[int]
    ) -> set[int]:
        """The chunks that followed the last manifest, received straight into ``dest`` at
        ``offsets`` (``keys``: that manifest's distinct keys); which of them came. If they are not
        among ``keys`` (a fill for something else), they are read past and none came."""
        req, self._following = self._following, None
        if req is None:
            return set()
        index = {k: i for i, k in enumerate(keys)}
        return self._recv_chunks_into(req, index, lengths, _Places(dest, offsets, lengths), skip_foreign=True)

    def has_manifests(self, names: Sequence[str]) -> np.ndarray:
        """Which of ``names`` are committed sessions: one round trip per 65,536 names."""
        out = [np.zeros(0, dtype=bool)]
        for i in range(0, len(names), msg.MAX_NAMES):
            part = names[i : i + msg.MAX_NAMES]
            out.append(msg.dec_bitmap(self.request(Op.HAS_MANIFESTS, [msg.enc_names(part)])))
            if len(out[-1]) != len(part):
                raise ProtocolError(f"HAS_MANIFESTS answered {len(out[-1])} names of {len(part)}")
        return np.concatenate(out)

    def put_manifests(self, items: Sequence[tuple[str, bytes, msg.SaveOptions]]) -> list[batches.Outcome]:
        """PUT_MANIFESTS: one outcome per manifest (committed, missing keys, or its own error);
        one round trip per ``batches.MAX_BATCH`` manifests."""
        out: list[batches.Outcome] = []
        for i in range(0, len(items), batches.MAX_BATCH):
            part = items[i : i + batches.MAX_BATCH]
            out += batches.dec_outcomes(self.request(Op.PUT_MANIFESTS, batches.enc_put_manifests(part)), len(part))
        return out

    def get_manifests(
        self, names: Sequence[str], want_locations: bool = False
    ) -> tuple[list[batches.Found], np.ndarray | None]:
        """GET_MANIFESTS of at most ``batches.MAX_BATCH`` names: (an entry per name, the region
        table when locations were asked and this connection has RDMA). The versions found stay
        held for this connection until its next lookup. A reply that would pass the frame
        budget leaves names NOT_SERVED: ask for them after fetching what was found."""
        req = [batches.enc_get_manifests(names, want_locations)]
        found, regions = batches.dec_found(self.request(Op.GET_MANIFESTS, req), len(names))
        if names and found[0].status == batches.NOT_SERVED:
            raise ProtocolError("GET_MANIFESTS reply served nothing")
        return found, regions

    def pin(self, name: str, pinned: bool) -> None:
        self.request(Op.PIN, [msg.enc_pin(name, pinned)])

    def compact(self) -> dict:
        out = msg.dec_json(self.request(Op.COMPACT, []))
        return out if isinstance(out, dict) else {}

    def locate(self, keys: np.ndarray) -> msg.Locations:
        return msg.dec_locations(self.request(Op.LOCATE, [msg.enc_keys(keys)])).copy()

    def delete_manifest(self, name: str) -> None:
        self.request(Op.DELETE_MANIFEST, [msg.enc_name_only(name)])

    def list(self, prefix: str = "") -> list[dict]:
        """Every session whose name starts with ``prefix``, following the server's pages."""
        rows: list[dict] = []
        after = ""
        while True:
            page = msg.dec_json(self.request(Op.LIST, [msg.enc_list(prefix, after)]))
            if not isinstance(page, dict) or not isinstance(page.get("sessions"), list):
                raise ProtocolError("LIST reply is not a page of sessions")
            rows += page["sessions"]
            if not page.get("more") or not page["sessions"]:
                return rows
            after = page["sessions"][-1]["name"]

    def stats(self) -> dict:
        out = msg.dec_json(self.request(Op.STATS, []))
        return out if isinstance(out, dict) else {}

    def rdma_connect(self, payload: bytes) -> bytes:
        return bytes(self.request(Op.RDMA_CONNECT, [payload]))


class _Places:
    """Where each fetched chunk goes in the restore buffer."""

    def __init__(self, dest: memoryview, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        self.dest, self.offsets, self.lengths = dest, offsets, lengths

    def __getitem__(self, i: int) -> memoryview:
        o = self.offsets[i]
        return self.dest[o : o + self.lengths[i]]

    def runs(self, idx: list[int]) -> list[memoryview]:
        """The places of chunks ``idx`` (in reply order) as one view per back-to-back stretch."""
        runs = contiguous_runs([0] * len(idx), [self.offsets[i] for i in idx], [self.lengths[i] for i in idx])
        return [self.dest[start : start + n] for _, start, n in runs]


def msg_missing(key: Key) -> RdmakvError:
    from rdmakv.errors import NotFoundError

    return NotFoundError(f"chunk {key_hex(key)} is no longer stored on the server")
