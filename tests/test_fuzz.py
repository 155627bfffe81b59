"""A bounded protocol fuzzer in CI: unauthenticated garbage and well-MAC'd mutated requests
against a real server. It must never crash, hang or answer with an internal error, and a
normal client must work afterwards. The long run: `rdmakv bench fuzz --frames 200000`."""

from __future__ import annotations

import rdmakv
from bench.fuzz import Fuzzer, rss_mib
from rdmakv import kvgen

from .conftest import KEY_HEX


def test_fuzzing_the_server_finds_nothing(fresh_server, capsys):
    srv = fresh_server("64MiB", "--fsync", "never", "--handshake-timeout", "2")
    rss0 = rss_mib(srv.pid())
    out = Fuzzer(srv.port, bytes.fromhex(KEY_HEX), seed=20261201).run(40_000, seconds=90)
    with capsys.disabled():
        print(f"\n[fuzz] {out['stats']} in {out['seconds']} s; RSS {rss0:.1f} -> {rss_mib(srv.pid()):.1f} MiB")
    assert out["findings"] == []
    assert srv.proc.poll() is None, "the server died"
    assert out["stats"]["authenticated_frames"] > 10_000 and out["stats"]["unauthenticated_frames"] > 1_000
    kv = kvgen.generate(kvgen.token_stream(4, 64), kvgen.ModelShape("after", 2, 32, 32))
    with rdmakv.connect(srv.url("after"), key=KEY_HEX, transport="tcp") as st:
        st.save("s", kv)
        assert st.restore("s").equals(kv)
        assert st.stats()["store"]["internal_errors"] == 0
