"""Per-tenant keys on real rxe: a tenant-A key never gets a QP in tenant B's protection domain."""

from __future__ import annotations

import pytest

import rdmakv
from rdmakv import kvgen
from rdmakv.errors import AuthError

from ..conftest import ServerProcess

pytestmark = pytest.mark.rdma

A, B = "a1" * 32, "b2" * 32


def test_a_key_of_tenant_a_cannot_reach_tenant_b_over_rdma(tmp_path):
    (tmp_path / "keys.toml").write_text(
        f'[[key]]\nnamespace = "a"\nkey = "{A}"\n\n[[key]]\nnamespace = "b"\nkey = "{B}"\n'
    )
    srv = ServerProcess(str(tmp_path / "d"), "64MiB", "--keys", str(tmp_path / "keys.toml")).start()
    try:
        assert srv.rdma
        kv = kvgen.generate(kvgen.token_stream(1, 64), kvgen.QWEN25_05B)
        with rdmakv.connect(srv.url("b"), key=B, transport="rdma", window=64) as b:
            b.save("secret", kv)
            assert b.restore("secret", report=True)[1].transport == "rdma"
        with pytest.raises(AuthError, match="does not open namespace 'b'"):
            rdmakv.connect(srv.url("b"), key=A, transport="rdma")  # no handshake, so no RDMA_CONNECT
        with rdmakv.connect(srv.url("a"), key=A, transport="rdma", window=64) as a:
            assert a.active_transport == "rdma"
            assert a.list() == []
    finally:
        srv.stop()
