"""A protocol fuzzer against a real `rdmakv serve` (`rdmakv bench fuzz --frames 100000`).

Two kinds of input: (a) unauthenticated garbage (random bytes, broken and oversized headers,
half frames) and (b) authenticated, well-MAC'd frames whose payloads are mutated copies of
valid requests for every operation (bit flips, overwritten bytes, cut, extended, length fields
bent, unknown opcodes). Every reply must come within a timeout; an internal server error (the
server's catch-all) counts as a finding, and so does a crash or a hang. The CI test
(tests/test_fuzz.py) runs a bounded number of frames; the long run goes in the closing note.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import tempfile
import time
from collections import Counter

import numpy as np

from fallback_tcp.framed import FramedSocket, client_handshake
from rdmakv import kvgen
from rdmakv.errors import ConnectionLost, RdmakvError, ServerError
from rdmakv.hashing import chunk_key
from rdmakv.store.server.spawn import ServerProcess
from rdmakv.wire import chunking
from rdmakv.wire import messages as msg
from rdmakv.wire.protocol import HEADER, Op, encode_header, plain_frame

REPLY_TIMEOUT = 10.0


def corpus() -> list[tuple[int, bytes]]:
    """Valid requests, one or more per operation, to mutate."""
    kv = kvgen.generate(kvgen.token_stream(3, 40), kvgen.ModelShape("fz", 2, 16, 16))
    m, chunks = chunking.split(kv, 8)
    keys = m.keys[:4]
    join = b"".join
    return [
        (Op.EXISTS, msg.enc_keys(keys)),
        (Op.PUT_CHUNKS, join(bytes(p) for p in msg.enc_put_chunks(keys.tolist(), [bytes(c) for c in chunks[:4]]))),
        (Op.GET_CHUNKS, msg.enc_keys(keys)),
        (Op.GET_CHUNKS, msg.enc_keys(np.array([chunk_key(b"x")] * 64, np.uint64))),
        (Op.PUT_MANIFEST, join(bytes(p) for p in msg.enc_put_manifest("fz", m.encode(), msg.SaveOptions(True, 5)))),
        (Op.GET_MANIFEST, msg.enc_get_manifest("fz", msg.GET_WANT_LOCATIONS)),
        (Op.DELETE_MANIFEST, msg.enc_name_only("fz")),
        (Op.LIST, msg.enc_list("f", "")),
        (Op.STATS, b""),
        (Op.LOCATE, msg.enc_keys(keys)),
        (Op.PIN, msg.enc_pin("fz", True)),
        (Op.RDMA_CONNECT, bytes(32)),
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(7)
        if kind == 0 and b:  # flip bits
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and b:  # overwrite a run with a random or boundary value
            i = rng.randrange(len(b))
            val = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x00\x00\x80", rng.randbytes(4)])
            b[i : i + len(val)] = val
        elif kind == 2:  # cut
            del b[rng.randrange(len(b) + 1) :]
        elif kind == 3:  # extend
            b += rng.randbytes(rng.randint(1, 64))
        elif kind == 4 and len(b) >= 5:  # bend a u32 length field
            i = rng.randrange(len(b) - 3)
            struct.pack_into("<I", b, i, rng.choice([0, 1, 0xFFFF, 1 << 20, 0xFFFFFFFF, len(b) * 2]))
        elif kind == 5 and b:  # duplicate a slice
            i = rng.randrange(len(b))
            b[i:i] = b[i : i + rng.randint(1, 32)]
        else:  # a random byte somewhere
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


class Fuzzer:
    def __init__(self, port: int, key: bytes, seed: int = 0) -> None:
        self.port = port
        self.key = key
        self.rng = random.Random(seed)
        self.corpus = corpus()
        self.stats: Counter = Counter()
        self.findings: list[str] = []
        self.fs: FramedSocket | None = None
        self.req = 0

    def _connect(self) -> FramedSocket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=REPLY_TIMEOUT)
        fs = FramedSocket(s)
        client_handshake(fs, self.key, f"fuzz{self.rng.randrange(4)}")
        return fs

    def authenticated(self) -> None:
        if self.fs is None:
            self.fs = self._connect()
            self.stats["connections"] += 1
        op, payload = self.rng.choice(self.corpus)
        if self.rng.random() < 0.05:
            op = self.rng.choice([0, 13, 14, 50, 126, 200, 255])  # unknown opcodes too
        data = mutate(self.rng, payload) if self.rng.random() < 0.9 else payload
        self.req += 1
        try:
            if self.rng.random() < 0.03:  # a sealed frame broken on the way: the MAC stream ends here
                assert self.fs.auth is not None
                raw = bytearray(b"".join(bytes(p) for p in self.fs.auth.seal(op, 0, self.req, [data])))
                raw[self.rng.randrange(len(raw))] ^= 0xFF
                self.fs.sock.sendall(raw)
                self.stats["broken_frames"] += 1
                # the server answers an error and hangs up, or (length field grown) waits for
                # bytes that never come, until its idle timeout: either way this stream is done
                self.fs.close()
                self.fs = None
                return
            else:
                self.fs.send(op, 0, self.req, [data])
            self.stats["authenticated_frames"] += 1
            header, reply = self.fs.recv()
        except (ConnectionLost, OSError, TimeoutError) as e:
            if isinstance(e, TimeoutError) or "timed out" in str(e):
                self.findings.append(f"hang: no reply to op {op} within {REPLY_TIMEOUT} s")
            self.stats["closed_by_server"] += 1
            self.fs = None
            return
        except RdmakvError:
            self.stats["closed_by_server"] += 1
            self.fs = None
            return
        if header.op == Op.ERROR:
            code, text, _ = msg.dec_error(reply)
            self.stats[f"error_{code}"] += 1
            if code == ServerError.code:
                self.findings.append(f"internal error on op {op}: {text[:200]}")
        else:
            self.stats["ok_replies"] += 1

    def unauthenticated(self) -> None:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=REPLY_TIMEOUT)
        kind = self.rng.randrange(5)
        if kind == 0:
            data = self.rng.randbytes(self.rng.randint(1, 2000))
        elif kind == 1:  # a header announcing a huge HELLO, then a little
            data = encode_header(Op.HELLO, 2, 0, self.rng.choice([600, 1 << 20, 64 << 20])) + self.rng.randbytes(100)
        elif kind == 2:  # a mutated HELLO
            hello = msg.enc_hello(os.urandom(32), "fuzz", bytes(16), 2)
            data = plain_frame(Op.HELLO, 0, 0, mutate(self.rng, hello))
        elif kind == 3:  # half a frame
            data = plain_frame(Op.HELLO, 0, 0, os.urandom(60))[: self.rng.randint(1, HEADER.size + 20)]
        else:  # an authenticated-looking frame before the handshake
            data = encode_header(Op.GET_CHUNKS, 0, 1, 8) + bytes(8 + 32)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            t0 = time.monotonic()
            while s.recv(65536):
                if time.monotonic() - t0 > REPLY_TIMEOUT:
                    self.findings.append("hang: an unauthenticated connection was never closed")
                    break
        except TimeoutError:
            if kind not in (3,):  # a half frame waits for the handshake timeout, which is fine
                self.findings.append(f"hang: unauthenticated input kind {kind} got no answer")
        except OSError:
            pass
        finally:
            s.close()
        self.stats["unauthenticated_frames"] += 1

    def run(self, frames: int, unauth_share: float = 0.12, seconds: float = 1e9) -> dict:
        t0 = time.monotonic()
        for _ in range(frames):
            if time.monotonic() - t0 > seconds:
                break
            if self.rng.random() < unauth_share:
                self.unauthenticated()
            else:
                self.authenticated()
        if self.fs is not None:
            self.fs.close()
            self.fs = None
        return {"stats": dict(self.stats), "findings": self.findings, "seconds": round(time.monotonic() - t0, 1)}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rdmakv bench fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args(argv)
    key = os.urandom(32).hex()
    d = tempfile.mkdtemp(prefix="rdmakv-fuzz-")
    srv = ServerProcess(d, "64MiB", "--fsync", "never", "--handshake-timeout", "2", "--transport", "tcp",
                        key_hex=key).start()  # fmt: skip
    try:
        rss0 = rss_mib(srv.pid())
        out = Fuzzer(srv.port, bytes.fromhex(key), args.seed).run(args.frames)
        time.sleep(3)  # handshake timeouts close the stragglers
        assert srv.proc is not None  # (started)
        out |= {"rss_start_mib": rss0, "rss_after_mib": rss_mib(srv.pid()), "server_alive": srv.proc.poll() is None}
        from rdmakv.client.store import connect as connect_node

        with connect_node(srv.url("probe"), key=key, transport="tcp") as st:  # a normal client still works
            kv = kvgen.generate(kvgen.token_stream(9, 64), kvgen.ModelShape("p", 2, 32, 32))
            st.save("p", kv)
            out["probe_ok"] = st.restore("p").equals(kv)
            out["server_internal_errors"] = st.stats()["store"]["internal_errors"]
    finally:
        srv.stop()
    print(json.dumps(out, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if not out["findings"] and out["probe_ok"] and not out["server_internal_errors"] else 1
