"""Progress lines: drawn on a terminal, absent when stdout is not one or with --quiet; and the
kernel build's stages match what build-uml.sh really runs."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from rdmakv.guest.kernel import BUILD_STAGES, build_stage

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "from rdmakv import progress\nfor _ in progress.track(range(3), 'counting', quiet=QUIET):\n    pass\n"


def _run_on_a_tty(quiet: bool, env: dict | None = None) -> bytes:
    """Run the script with stdout and stderr on a pseudo-terminal; what the terminal got."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal of 100x24
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.replace("QUIET", str(quiet))], stdout=slave, stderr=slave,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})  # fmt: skip
    os.close(slave)
    out = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        out += data
    proc.wait(30)
    os.close(master)
    return out


def test_progress_is_drawn_on_a_terminal_only_and_quiet_silences_it():
    assert b"counting" in _run_on_a_tty(False)
    assert b"counting" not in _run_on_a_tty(True)
    assert b"counting" not in _run_on_a_tty(False, {"RDMAKV_QUIET": "1"})
    piped = subprocess.run([sys.executable, "-c", SCRIPT.replace("QUIET", "False")], capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert piped.stdout == b"" and piped.stderr == b""  # not a terminal: nothing


def test_every_build_stage_is_a_command_build_uml_sh_runs():
    script = (ROOT / "rdmakv" / "guest" / "build-uml.sh").read_text().splitlines()
    commands = [line.strip() for line in script if line.strip() and not line.strip().startswith("#")]
    for prefix, name in BUILD_STAGES:
        traced = next((c for c in commands if c.startswith(prefix.split(" -j")[0])), None)
        assert traced is not None, f"build-uml.sh runs nothing starting {prefix!r} (stage {name!r})"
    assert build_stage('+rdmakv-trace make -s ARCH=um -j2 linux\n') == "compile (~4 min)"
    assert build_stage("++rdmakv-trace tar -C /tmp/x -xf /usr/src/linux-source-6.1.tar.xz") == "extract the source"
    assert build_stage("+rdmakv-trace grep -q ^CONFIG_X=y .config") is None
    assert build_stage("make: warning: something") is None
