"""The rxe guest harness (rdmakv.guest.rxe_vm): boots the UML guest a few times (~1 s each).

The first run on a machine builds the UML kernel (~5 min) unless it is cached.
"""

import json
import os
import pathlib
import sys

import pytest

from rdmakv.guest import rxe_vm

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(
        bool(os.environ.get("RDMAKV_IN_GUEST")), reason="already inside the rxe guest: cannot boot a nested one"
    ),
]

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_a_large_guest_is_warned_of_a_low_max_map_count():
    assert rxe_vm.map_count_warning("3G", 65530) is None
    why = rxe_vm.map_count_warning("10G", 65530)
    assert why is not None and "vm.max_map_count" in why and "255 MiB" in why
    assert rxe_vm.map_count_warning("10G", 262144) is None


def test_exit_status_propagates():
    assert rxe_vm.run(["sh", "-c", "exit 7"], timeout=120) == 7


def test_output_and_environment_propagate(capfd):
    rc = rxe_vm.run(
        ["sh", "-c", 'echo "out $RDMAKV_IN_GUEST $RDMAKV_GUEST $FOO"; echo err-line >&2'],
        env={"FOO": "bar"},
        timeout=120,
    )
    out, err = capfd.readouterr()
    assert rc == 0
    assert "out 1 uml bar\n" in out
    assert "err-line\n" in err
    assert "err-line" not in out


def test_rxe0_active_and_pyverbs_opens_it(capfd):
    script = (
        "import pyverbs.device as d\n"
        "with d.Context(name='rxe0') as c:\n"
        "    print('pyverbs-ok', c.query_port(1).state)\n"
    )
    rc = rxe_vm.run(
        ["sh", "-c", f'ibv_devinfo -d rxe0 && /usr/bin/python3 -c "{script}"'],
        timeout=120,
    )
    out, _ = capfd.readouterr()
    assert rc == 0
    assert "PORT_ACTIVE" in out
    assert "pyverbs-ok 4" in out  # IBV_PORT_ACTIVE


def test_cwd_is_shared_read_write(tmp_path):
    rc = rxe_vm.run(
        ["sh", "-c", "pwd > where.txt && mkdir -p sub && echo hi > sub/f.txt"], cwd=str(tmp_path), timeout=120
    )
    assert rc == 0
    assert (tmp_path / "sub" / "f.txt").read_text() == "hi\n"
    assert (tmp_path / "where.txt").read_text().strip() == str(tmp_path.resolve())


def test_doctor_lists_rxe0(capfd):
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    rc = rxe_vm.run([sys.executable, "-m", "rdmakv.cli.doctor", "--json"], cwd=str(REPO), env=env, timeout=120)
    out, _ = capfd.readouterr()
    assert rc == 0
    report = json.loads(out)
    assert report["in_guest"] == "uml"
    names = {d["name"]: d for d in report["devices"]}
    assert "rxe0" in names
    assert names["rxe0"]["ports"][0]["state"] == "ACTIVE"
    assert report["transport"]["choice"] == "rdma"


def test_timeout_kills_guest():
    with pytest.raises(rxe_vm.GuestError, match="timed out"):
        rxe_vm.run(["sleep", "60"], timeout=3)


def test_qemu_guest_smoke(tmp_path, capfd):
    """The QEMU TCG fallback, booted once (~10-20 s): status, output, env, rxe0, shared cwd."""
    # One-time preparation (kernel package download + extract, ~15 s) is outside the timeout.
    rxe_vm.ensure_qemu_guest()
    script = (
        'echo "out $RDMAKV_IN_GUEST $RDMAKV_GUEST $FOO"; echo err-line >&2; '
        "ibv_devinfo -d rxe0 | grep -m1 state; pwd > where.txt; echo hi > f.txt; exit 7"
    )
    rc = rxe_vm.run(["sh", "-c", script], guest="qemu", cwd=str(tmp_path), env={"FOO": "bar"}, timeout=120)
    out, err = capfd.readouterr()
    assert rc == 7
    assert "out 1 qemu bar\n" in out
    assert "PORT_ACTIVE" in out
    assert "err-line\n" in err
    assert "err-line" not in out
    assert (tmp_path / "f.txt").read_text() == "hi\n"
    assert (tmp_path / "where.txt").read_text().strip() == str(tmp_path.resolve())
