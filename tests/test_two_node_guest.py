"""Two UML guests linked by vec0 (``rxe_vm.run(..., nodes=2)``): TCP and a real RDMA READ cross
the link, and the run's exit status follows the two-node rules. About 20 s on 2 cores."""

from __future__ import annotations

import os
import pathlib
import sys
import time

import pytest

from rdmakv.guest import rxe_vm

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(
        bool(os.environ.get("RDMAKV_IN_GUEST")), reason="already inside the rxe guest: cannot boot a nested one"
    ),
]

REPO = pathlib.Path(__file__).resolve().parents[1]
GUEST_DIR = REPO / "rdmakv" / "guest"


@pytest.fixture(scope="module", autouse=True)
def uml_kernel():
    """The cached UML kernel (built on first use, ~4.5 min); skip only if it cannot be built or
    lacks the vector network driver the link needs."""
    if "CONFIG_UML_NET_VECTOR=y" not in (GUEST_DIR / "uml.config").read_text().split():
        pytest.skip("rdmakv/guest/uml.config does not enable CONFIG_UML_NET_VECTOR")
    try:
        return rxe_vm.ensure_kernel()
    except rxe_vm.GuestError as e:
        pytest.skip(f"the UML kernel cannot be built here: {e}")


def _run(script: str, **kw) -> int:
    return rxe_vm.run(["sh", "-c", script], nodes=2, timeout=kw.pop("timeout", 60), mem="1G", **kw)


def test_tcp_and_rdma_read_cross_the_link(capfd):
    rc = rxe_vm.run([sys.executable, str(REPO / "tests" / "two_node_guest.py")], nodes=2, cwd=str(REPO),
                    timeout=90, mem="1G")  # fmt: skip
    out, err = capfd.readouterr()
    assert rc == 0, (out[-2000:], err[-2000:])
    assert "two-node: node 0 of 2 at 192.0.2.1\n" in out
    assert "[node1] two-node: node 1 of 2 at 192.0.2.2\n" in out
    # node 0's connection reached node 1's listener: the reply carries node 1's role
    assert "two-node: tcp node1 got hello from 192.0.2.1 role=1\n" in out
    assert "two-node: ib_read_lat 2 B typical" in out


def test_node1_failure_fails_the_run_and_is_reported(capfd):
    rc = _run('if [ "$RDMAKV_NODE" = 1 ]; then echo bye; exit 3; fi; sleep 2; echo done')
    out, err = capfd.readouterr()
    assert rc == 3
    assert "node 1's command exited with status 3 while node 0's was still running" in err
    assert "[node1] bye\n" in out and "done\n" in out


def test_node0_status_wins_and_a_lingering_node1_is_stopped(capfd):
    t0 = time.monotonic()
    rc = _run('if [ "$RDMAKV_NODE" = 1 ]; then exec sleep 60; fi; exit 5')
    elapsed = time.monotonic() - t0
    _, err = capfd.readouterr()
    assert rc == 5
    assert elapsed < 15, f"node 1 was not stopped after node 0 ended ({elapsed:.1f} s)"
    assert "node 1's command exited" not in err  # killed for node 0's sake: not a failure


def test_both_succeed():
    assert _run('[ "$RDMAKV_NODES" = 2 ] && [ "$RDMAKV_NODE_ADDRS" = 192.0.2.1,192.0.2.2 ]') == 0


def test_timeout_covers_both_guests():
    with pytest.raises(rxe_vm.GuestError, match="timed out.*node 0 and node 1 still running"):
        _run("sleep 60", timeout=4)


def test_cli_rejects_other_node_counts(capsys):
    with pytest.raises(SystemExit) as e:
        rxe_vm.cli(["--nodes", "3", "--", "true"])
    assert e.value.code == 2
    assert "--nodes must be 1 or 2" in capsys.readouterr().err
