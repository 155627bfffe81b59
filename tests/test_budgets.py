"""Server-wide budgets against a real server process: bytes of requests in flight over every
connection (unfinished continued messages included), the share of connections one source
address may hold under a lowered RLIMIT_NOFILE, and what a namespace costs before its first
write."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import rdmakv
from fallback_tcp.framed import FramedSocket, client_handshake, send_all
from rdmakv import kvgen
from rdmakv.errors import BusyError, ConnectionLost, RdmakvError, StoreFullError, TooLargeError
from rdmakv.kvgen import ModelShape
from rdmakv.wire import messages as msg
from rdmakv.wire.auth import parse_key
from rdmakv.wire.protocol import FLAG_MORE, FLAG_RESPONSE, Op

from .conftest import KEY_HEX, ServerProcess
from .test_limits import _raise_nofile, _rss_mib, _status

SHAPE = ModelShape("bud", 2, 64, 64)


def _authed(port: int, ns: str, source: str | None = None) -> FramedSocket:
    s = socket.socket()
    if source:
        s.bind((source, 0))
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    fs = FramedSocket(s)
    client_handshake(fs, parse_key(KEY_HEX), ns)
    return fs


def _save_restore(url: str) -> None:
    kv = kvgen.generate(kvgen.token_stream(5, 256), SHAPE)
    with rdmakv.connect(url, key=KEY_HEX, transport="tcp", timeout=20) as st:
        st.save("normal", kv)
        assert st.restore("normal").equals(kv)


def test_unfinished_continued_messages_are_bounded_by_the_in_flight_budget(fresh_server, capsys):
    """Two connections each send 256 MiB of continuation frames (FLAG_MORE, never a last one):
    the server charges them to one budget (96 MiB by default), refuses what does not fit (read
    and dropped, answered BUSY or too large), and serves a normal client meanwhile."""
    srv = fresh_server("64MiB")
    rss0 = _rss_mib(srv)
    part = bytes(64 << 20)
    answers: list[RdmakvError | str] = []

    def attacker(i: int) -> None:
        fs = _authed(srv.port, f"atk{i}")
        try:
            for _ in range(4):
                send_all(fs.sock, fs.auth.seal(Op.PUT_CHUNKS, FLAG_MORE, 1, [part]))
            header, payload = fs.recv()  # what the server said about request 1
            assert header.op == Op.ERROR and header.req_id == 1 and header.flags & FLAG_RESPONSE
            code, text, _ = msg.dec_error(payload)
            answers.append(BusyError(text) if code == BusyError.code else TooLargeError(text) if
                           code == TooLargeError.code else f"code {code}: {text}")  # fmt: skip
        except (OSError, ConnectionLost) as e:
            answers.append(f"closed: {e}")
        finally:
            peak[0] = max(peak[0], _rss_mib(srv))
            time.sleep(1.0)  # still connected, holding whatever the server kept of it
            peak[0] = max(peak[0], _rss_mib(srv))
            fs.close()

    peak = [rss0]
    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    _save_restore(srv.url("normal"))  # served while they push
    for t in threads:
        t.join(120)
    hwm = _status(srv.pid(), "VmHWM") / 1024
    with capsys.disabled():
        print(f"\n[budgets] 2 x 256 MiB of unfinished continuations: server RSS {rss0:.0f} MiB -> at most "
              f"{peak[0]:.0f} MiB while they held on (peak RSS {hwm:.0f} MiB); answers: "
              f"{[type(a).__name__ if isinstance(a, RdmakvError) else a for a in answers]}")  # fmt: skip
    assert len(answers) == 2 and all(isinstance(a, BusyError | TooLargeError) for a in answers), answers
    assert peak[0] - rss0 <= 128 and hwm - rss0 <= 128  # while they held on, and at the peak
    _save_restore(srv.url("normal"))
    with rdmakv.connect(srv.url("normal"), key=KEY_HEX, transport="tcp") as st:
        store = st.stats()["store"]  # (the shared key is an admin key: the store's figures)
    assert store["inflight_refused"] >= 2 and store["inflight_bytes"] == 0  # all given back


def test_one_address_cannot_take_every_connection_slot(tmp_path):
    """At RLIMIT_NOFILE 1024 the server caps itself at 960 connections; one source address may
    hold a quarter of them, so another address is still served."""
    srv = ServerProcess(str(tmp_path / "d"), "16MiB", "--handshake-timeout", "30")
    srv.start_prefix = ["prlimit", "--nofile=1024:1024"]
    srv.start()
    held = []
    try:
        _raise_nofile(4096)
        for _ in range(1000):  # one address opens connections, past its share and past the cap
            held.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
        time.sleep(1.0)
        refusals = []
        for s in held:
            s.setblocking(False)
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            refusals.append(msg.dec_error(data[16:])[1] if data else "closed")
        fs = _authed(srv.port, "other", source="127.0.0.2")  # another address: served
        fs.send(Op.STATS, 0, 1, [])
        header, payload = fs.recv()
        assert header.op == Op.STATS and isinstance(msg.dec_json(payload), dict)
        fs.close()
        assert len(refusals) == 1000 - 240, refusals[:3]
        assert all("connections from 127.0.0.1 (limit 240 per source address)" in r for r in refusals), refusals[:3]
        assert any("at most 960 connections, 240 per source address" in line for line in srv.log), srv.log
    finally:
        for s in held:
            s.close()
        srv.stop()


def test_a_namespace_that_only_reads_costs_nothing(fresh_server, capsys):
    """3,000 namespaces that only ran STATS, LIST and EXISTS: none is created (the store counts
    none), and the server's memory barely moves."""
    srv = fresh_server("64MiB")
    _save_restore(srv.url("real"))  # one real tenant
    rss0 = _rss_mib(srv)
    n = 3000
    for i in range(n):
        fs = _authed(srv.port, f"reader-{i}")
        fs.send(Op.STATS, 0, 1, [])
        fs.recv()
        fs.send(Op.LIST, 0, 2, [msg.enc_list("", "")])
        fs.recv()
        fs.send(Op.EXISTS, 0, 3, [msg.enc_keys([1, 2, 3])])
        fs.recv()
        fs.close()
    time.sleep(0.5)
    rss1 = _rss_mib(srv)
    with rdmakv.connect(srv.url("real"), key=KEY_HEX, transport="tcp") as st:
        store = st.stats()["store"]
    with capsys.disabled():
        print(f"\n[budgets] {n} namespaces that only read (STATS, LIST, EXISTS): server RSS {rss0:.1f} -> "
              f"{rss1:.1f} MiB "
              f"({(rss1 - rss0) * 1024 * 1024 / n:.0f} B each), namespaces in the store: {store['namespaces']}")
    assert store["namespaces"] == 1
    assert (rss1 - rss0) * 1024 * 1024 / n < 512  # well under a kilobyte each (3.1 KiB before)


def test_the_namespace_count_is_bounded_and_empty_ones_are_forgotten(fresh_server):
    srv = fresh_server("64MiB", "--max-namespaces", "3")
    kv = kvgen.generate(kvgen.token_stream(6, 64), SHAPE)
    for i in range(3):
        with rdmakv.connect(srv.url(f"t{i}"), key=KEY_HEX, transport="tcp") as st:
            st.save("s", kv)
    with rdmakv.connect(srv.url("t3"), key=KEY_HEX, transport="tcp") as st:
        assert st.list() == [] and st.stats()["manifests"] == 0  # reading makes nothing: no refusal
        with pytest.raises(StoreFullError, match=r"holds 3 namespaces \(limit 3, --max-namespaces\)"):
            st.save("s", kv)
    with rdmakv.connect(srv.url("t0"), key=KEY_HEX, transport="tcp") as st:
        st.delete_manifest("s")
        st.compact()  # its records leave the disk
        deadline = time.monotonic() + 10
        while (s := st.stats())["slab_regions"] or s["chunks"] or s["disk_bytes"]:  # its region goes after a grace
            assert time.monotonic() < deadline, s
            time.sleep(0.2)
    with rdmakv.connect(srv.url("t3"), key=KEY_HEX, transport="tcp") as st:
        st.save("s", kv)  # t0 held nothing any more: forgotten to make room
        assert st.restore("s").equals(kv)
        assert st.stats()["store"]["namespaces"] == 3
