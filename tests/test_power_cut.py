"""Durability against a real power cut, not just kill -9.

kill -9 of the server leaves the kernel's page cache intact, so it cannot tell a store that
fsyncs from one that does not. Here the server runs inside the UML guest with its data dir on
a guest block device (an ext4 image file), a client saves in a loop, and the host kills the
*whole guest* at a random moment: the guest's page cache is lost, the image keeps what was
flushed to it. The next guest boots on the same image and checks. With ``--fsync never`` the
same test must show losses, which proves it can fail.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rdmakv.guest import rxe_vm

pytestmark = [pytest.mark.guest, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 20
BUDGET_S = 600  # or as many rounds as fit


def _image(path: Path) -> Path:
    subprocess.run(["truncate", "-s", "96M", str(path)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)
    return path


@pytest.fixture
def shared():
    d = REPO / ".scratch" / f"powercut-{time.time_ns()}"  # in the cwd the guest shares with us
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _round(shared: Path, image: Path, rnd: int, fsync: str, cut_after: float | None) -> dict:
    cmd = [sys.executable, str(REPO / "tests" / "power_cut_guest.py"), "--dir", str(shared), "--round", str(rnd),
           "--fsync", fsync]  # fmt: skip
    if cut_after is None:
        cmd.append("--check-only")
        cut = None
    else:
        cut = rxe_vm.PowerCut(cut_after, str(shared / f"saving-{rnd}"))
    rc = rxe_vm.run(cmd, cwd=str(REPO), disks=[str(image)], power_cut=cut, timeout=180, mem="1G")
    verdict = json.loads((shared / f"check-{rnd}.json").read_text())
    assert rc == (0 if cut is None else rxe_vm.POWER_CUT), (rc, verdict)
    return verdict


def test_power_cuts_lose_nothing_acknowledged(tmp_path, shared):
    image = _image(tmp_path / "disk.img")
    rng = random.Random(20261201)
    t0 = time.monotonic()
    rounds = 0
    for rnd in range(ROUNDS):
        if time.monotonic() - t0 > BUDGET_S:
            break
        v = _round(shared, image, rnd, "manifest", rng.uniform(0.2, 1.5))
        assert not v["lost"], f"round {rnd}: acknowledged sessions lost: {v['lost'][:5]}"
        assert not v["wrong"], f"round {rnd}: sessions that do not restore bit-exact: {v['wrong'][:5]}"
        assert not v["unknown"], f"round {rnd}: visible sessions nobody saved: {v['unknown'][:5]}"
        rounds += 1
    final = _round(shared, image, rounds, "manifest", None)
    assert not final["lost"] and not final["wrong"] and not final["unknown"], final
    assert final["acked"] > rounds  # the loop really saved (and the check really ran)
    assert final["checked"] == final["visible"] >= final["acked"]
    print(f"[power cut] {rounds} rounds, {final['acked']} acknowledged sessions, 0 lost, 0 wrong, "
          f"{time.monotonic() - t0:.0f} s")  # fmt: skip


def test_without_fsync_a_power_cut_loses_acknowledged_sessions(tmp_path, shared):
    """The same test with --fsync never must fail: acknowledged saves vanish with the page cache."""
    image = _image(tmp_path / "disk.img")
    rng = random.Random(7)
    losses = 0
    for rnd in range(6):
        v = _round(shared, image, rnd, "never", rng.uniform(0.8, 1.5))
        losses += len(v["lost"])
        if losses:
            break
    else:
        v = _round(shared, image, 6, "never", None)
        losses += len(v["lost"])
    assert losses > 0, "a power cut with --fsync never lost nothing: the test could not tell"
    print(f"[power cut, --fsync never] {losses} acknowledged sessions lost, as expected")
