"""What both guests (UML and QEMU) share: the io files stage 2 reads, the environment passed in,
the pipes that carry the command's output, and the host side of one boot."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from .host import GUEST_DIR, GuestError, log_step

#: Environment variables passed from the caller into the guest command (plus every RDMAKV_*).
PASS_ENV = (
    "PATH",
    "VIRTUAL_ENV",
    "HOME",
    "PYTHONPATH",
    "CI",
    "GITHUB_ACTIONS",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "USER",
    "LOGNAME",
    "NO_COLOR",
    "FORCE_COLOR",
    "COLUMNS",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONHASHSEED",
    "PYTHONUNBUFFERED",
    "PYTEST_ADDOPTS",
)


def guest_env(env: dict | None, guest: str = "uml") -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k in PASS_ENV or k.startswith("RDMAKV_")}
    out.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin")
    out.setdefault("PYTHONUNBUFFERED", "1")  # live output from Python commands through the pipe
    if env:
        out.update({str(k): str(v) for k, v in env.items()})
    out["RDMAKV_IN_GUEST"] = "1"
    out["RDMAKV_GUEST"] = guest
    return out


def _nul_file(path: pathlib.Path, items) -> None:
    data = b""
    for item in items:
        b = os.fsencode(item)
        if b"\0" in b:
            raise ValueError(f"NUL byte in {item!r}")
        data += b + b"\0"
    path.write_bytes(data)


def write_run_files(
    io: pathlib.Path, command, genv: dict, workdir: str, net: tuple[str, list[str], str] | None = None
) -> None:
    """The io files both guests' stage 2 read: devlinks, net.ip, argv, env, cwd, trace.

    ``net`` = (netdev, ``ip -batch`` lines, what they do) replaces the default (rxe0 on a dummy
    d0 with 192.0.2.1/24): io/netdev then names the device rxe0 goes on, and the description
    for error messages."""
    links = io / "devlinks"
    links.mkdir()
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        (links / name).symlink_to(target)
    if net is None:
        lines = ["link set lo up", "link add d0 type dummy"]
        # MTU 9000 lets rxe use a 4096-byte path MTU: a quarter of the packets (and of their
        # ICRCs) per READ; docs/rdma-path.md §5: ~30 % more READ bandwidth. RDMAKV_GUEST_MTU overrides.
        lines.append(f"link set d0 mtu {guest_mtu()}")
        lines += ["addr add 192.0.2.1/24 dev d0", "link set d0 up"]
    else:
        netdev, lines, what = net
        (io / "netdev").write_text(f"{netdev}\n{what}\n")
    (io / "net.ip").write_text("\n".join(lines) + "\n")
    _nul_file(io / "argv", [str(a) for a in command])
    _nul_file(io / "env", [f"{k}={v}" for k, v in genv.items()])
    _nul_file(io / "cwd", [workdir])
    if os.environ.get("RDMAKV_VM_TRACE", "") not in ("", "0"):
        (io / "trace").write_text("1")  # stage2 runs with `set -x` into console.log


DEFAULT_GUEST_MTU = 9000


def guest_mtu() -> int:
    """The guest link MTU: $RDMAKV_GUEST_MTU, else :data:`DEFAULT_GUEST_MTU`."""
    return int(os.environ.get("RDMAKV_GUEST_MTU") or DEFAULT_GUEST_MTU)


def _write(stream, data: bytes) -> None:
    buf = getattr(stream, "buffer", None)
    try:
        if buf is not None:
            buf.write(data)
            buf.flush()
        else:
            stream.write(data.decode(errors="replace"))
            stream.flush()
    except (OSError, ValueError):
        pass  # the consumer went away; keep draining so the guest never blocks


@dataclass(frozen=True)
class LineSink:
    """Where a pump writes whole lines, each starting with ``prefix``, under ``lock``: two guests
    share sys.stdout / sys.stderr, and a line must not be cut in the middle by the other's."""

    prefix: bytes
    lock: threading.Lock


def _pump(fd: int, stream, lines: LineSink | None = None) -> None:
    """Copy a pipe to a Python stream, live: chunk by chunk, or with ``lines`` line by line (a
    partial line waits for its newline; at EOF it is written, given a newline if prefixed)."""
    pending = b""
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except InterruptedError:
                continue
            if not data:
                break
            if lines is None:
                _write(stream, data)
                continue
            pending += data
            cut = pending.rfind(b"\n") + 1
            if cut:
                out = b"".join(lines.prefix + line + b"\n" for line in pending[: cut - 1].split(b"\n"))
                pending = pending[cut:]
                with lines.lock:
                    _write(stream, out)
        if lines is not None and pending:
            with lines.lock:
                _write(stream, lines.prefix + pending + (b"\n" if lines.prefix else b""))
    finally:
        os.close(fd)


def read_float(path: pathlib.Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def tail_of(path: pathlib.Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no console log)"
    return "\n".join(lines[-n:]) or "(console log empty)"


def mem_bytes(mem: str) -> int:
    n, unit = (mem[:-1], mem[-1]) if mem[-1] in "KMG" else (mem, "")
    return int(n) << {"": 0, "K": 10, "M": 20, "G": 30}[unit]


def killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


def _uml_preexec() -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a UML panic must not leave a core dump
    with contextlib.suppress(Exception):
        # If the harness dies (even by SIGKILL) the guest dies with it instead of lingering.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


STAGE2_COMMON = "stage2-common.sh"  # sourced by stage2.sh and qemu-stage2.sh from the io dir


def copy_stage_scripts(io: pathlib.Path, *names: str) -> None:
    """Copy the guest's stage scripts and the fragment both stage 2s source into the io dir."""
    for name in (*names, STAGE2_COMMON):
        dst = io / name
        shutil.copyfile(GUEST_DIR / name, dst)
        dst.chmod(0o755)


POWER_CUT = -9  # run()'s result when the guest was killed by a power cut


@dataclass(frozen=True)
class PowerCut:
    """Kill the whole guest ``after`` seconds past a moment: when the file ``when`` appears (a
    path the command writes in the shared cwd), else when the command starts. Like a power cut,
    the guest's page cache is gone; a disk image keeps what the guest had flushed to it."""

    after: float
    when: str | None = None

    def wait_and_cut(self, proc: subprocess.Popen, deadline: float, t_cmd: pathlib.Path) -> bool:
        marker = pathlib.Path(self.when) if self.when else t_cmd
        start = None
        while proc.poll() is None:
            now = time.monotonic()
            if now > deadline:
                raise subprocess.TimeoutExpired(proc.args, 0)
            if start is None and marker.exists():
                start = now
            if start is not None and now - start >= self.after:
                killpg(proc.pid)
                proc.wait()
                log_step(f"power cut {self.after:.2f} s after {marker.name} appeared")
                return True
            time.sleep(0.005)
        return False


class _GuestRun:
    """Host side of one guest boot (UML or QEMU): the temp dir with ``io/`` (shared with the
    guest) and ``console.log``, the open console log, the pipes that carry the command's stdout
    and stderr, and the guest process. Made and cleaned up by :func:`guest_run`."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.tmp = tmp
        self.io = tmp / "io"
        self.console = tmp / "console.log"
        self.log = None  # console.log, opened by the caller (mode differs per guest)
        self.proc: subprocess.Popen | None = None
        self.fds: list[int] = []  # still ours to close
        self.t_launch = self.t_exit = 0.0
        self._pipes: list[tuple[int, int]] = []
        self._pumps: list[threading.Thread] = []

    def open_pipes(self) -> tuple[int, int]:
        """Pipes for the command's stdout and stderr; returns their write ends (the guest's)."""
        r_out, w_out = os.pipe()
        r_err, w_err = os.pipe()
        self.fds += [r_out, w_out, r_err, w_err]
        self._pipes = [(r_out, w_out), (r_err, w_err)]
        return w_out, w_err

    def start(self, argv: list[str], *, lines: tuple[LineSink, LineSink] | None = None, **popen_kwargs) -> None:
        """Start the guest (own session, output to console.log, no core dump, dies with us) and
        the threads that stream the command's output to sys.stdout / sys.stderr (``lines``:
        line by line through those sinks instead of chunk by chunk)."""
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        self.t_launch = time.time()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
            preexec_fn=_uml_preexec,
            **popen_kwargs,
        )
        for _, w in self._pipes:
            os.close(w)
            self.fds.remove(w)
        for i, ((r, _), stream) in enumerate(zip(self._pipes, (sys.stdout, sys.stderr))):
            self.fds.remove(r)
            t = threading.Thread(target=_pump, args=(r, stream, lines[i] if lines else None), daemon=True)
            t.start()
            self._pumps.append(t)

    def ended(self) -> None:
        """After the guest process exited (or was killed): note the time, kill its stray helper
        processes, let the output threads drain."""
        self.t_exit = time.time()
        assert self.proc is not None  # (started)
        killpg(self.proc.pid)  # stray helper processes, if any
        for t in self._pumps:
            t.join(timeout=5)

    def result(self, what: str) -> int:
        """The command's status from io/rc after :meth:`ended`. Raises :class:`GuestError` on a
        setup failure the guest wrote to io/error, or when it left no io/rc (``what``: "UML"
        or "QEMU", for that message)."""
        err = self.io / "error"
        if err.exists():
            raise GuestError(f"guest setup failed: {err.read_text().strip()}")
        rc_file = self.io / "rc"
        if not rc_file.exists():
            assert self.proc is not None  # (started)
            raise GuestError(
                f"guest died without reporting a status ({what} exit status {self.proc.returncode}); "
                f"console log tail:\n{tail_of(self.console)}"
            )
        return int(rc_file.read_text().strip())

    def boot(
        self, argv: list[str], *, timeout: float, what: str, power_cut: PowerCut | None = None, **popen_kwargs
    ) -> int:
        """:meth:`start` the guest, wait for it to end and return the command's status
        (:meth:`result`). Raises :class:`GuestError` on timeout and as :meth:`result` does.
        With ``power_cut``, the whole guest is killed at that moment and POWER_CUT is returned
        (unless the command finished first)."""
        deadline = time.monotonic() + timeout
        self.start(argv, **popen_kwargs)
        proc = self.proc
        assert proc is not None  # (just started)
        try:
            if power_cut is not None and power_cut.wait_and_cut(proc, deadline, self.io / "t_cmd"):
                self.t_exit = time.time()
                for t in self._pumps:
                    t.join(timeout=5)
                return POWER_CUT
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killpg(proc.pid)
            proc.wait()
            tail = tail_of(self.console)
            raise GuestError(f"guest timed out after {timeout:g} s; console log tail:\n{tail}") from None
        self.ended()
        return self.result(what)

    def log_timings(self, label: str, stamp) -> None:
        """Log boot / command / shutdown timings after :meth:`boot`; ``stamp(path)`` is the time
        a t_* file in io/ records (its content or its mtime), or None."""
        t_s2, t_cmd, t_end = (stamp(self.io / n) for n in ("t_stage2", "t_cmd", "t_end"))
        if t_s2 and t_cmd and t_end:
            t_launch, t_exit = self.t_launch, self.t_exit
            log_step(
                f"timings ({label}): boot to stage2 {t_s2 - t_launch:.3f} s, "
                f"boot to command {t_cmd - t_launch:.3f} s, "
                f"command {t_end - t_cmd:.3f} s, shutdown {t_exit - t_end:.3f} s, "
                f"total {t_exit - t_launch:.3f} s "
                f"(overhead {(t_exit - t_launch) - (t_end - t_cmd):.3f} s)"
            )


@contextlib.contextmanager
def guest_run(prefix: str, *closing):
    """A :class:`_GuestRun` in a new temp dir. On the way out, however that is: kill the guest's
    process group, close our fds, the console log and ``closing`` (None entries skipped), then
    remove the temp dir (kept, and said so, with $RDMAKV_VM_KEEP)."""
    g = _GuestRun(pathlib.Path(tempfile.mkdtemp(prefix=prefix)))
    try:
        yield g
    finally:
        if g.proc is not None and g.proc.returncode is None:
            killpg(g.proc.pid)
            with contextlib.suppress(Exception):
                g.proc.wait(timeout=10)
        for fd in g.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if g.log is not None:
            g.log.close()
        for f in closing:
            if f is not None:
                f.close()
        if os.environ.get("RDMAKV_VM_KEEP", "") not in ("", "0"):
            log_step(f"kept guest temp dir {g.tmp} (console.log, io/)")
        else:
            shutil.rmtree(g.tmp, ignore_errors=True)
