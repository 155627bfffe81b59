"""Run a command inside a throw-away guest that has real soft-RoCE (rdma_rxe) device ``rxe0``.

The host kernel of our CI machines has no RDMA. A User-Mode Linux (UML) kernel built from
Debian's ``linux-source-6.1`` with rxe compiled in boots in well under a second and runs the
host's own userland (host root shared read-only over hostfs, a tmpfs overlay on top), so the
project's venv, pyverbs, perftest and tests are all available unchanged inside.

Inside the guest: ``lo`` up, a ``dummy`` netdev ``d0`` with 192.0.2.1/24 (a documentation
address; the guest has no network device to the host), ``rxe0`` on ``d0`` (checked
PORT_ACTIVE), ``ulimit -l unlimited``, fresh /proc /sys /dev, /tmp and /run on tmpfs, the
caller's cwd mounted read-write at the same path, and ``RDMAKV_IN_GUEST=1 RDMAKV_GUEST=uml``.

``run(..., guest="qemu")`` is the fallback for machines where that kernel cannot be built:
QEMU TCG (never KVM) boots Debian's stock kernel package, extracted into the same cache, with
the host root shared read-only over 9p; same guest setup, ``RDMAKV_GUEST=qemu``, ~10 s to
boot and everything 20-50x slower (see the QEMU section below and /work/shared/RXE.md).

Public API: :func:`run`, :func:`ensure_kernel`, :func:`host_has_rdma`, :func:`cli`,
:class:`GuestError`; helpers :func:`cache_root`, :func:`kernel_key`, :func:`cached_kernel`;
for the QEMU guest :func:`ensure_qemu_guest`, :func:`cached_qemu_kernel`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import lzma
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib

GUEST_DIR = pathlib.Path(__file__).resolve().parent
KERNEL_INPUTS = ("uml.config", "build-uml.sh")  # order matters for the cache key

#: Host packages the guest needs at run time (it runs the host's userland through hostfs).
RUNTIME_PACKAGES = (
    "rdma-core",
    "ibverbs-providers",
    "ibverbs-utils",
    "rdmacm-utils",
    "perftest",
    "python3-pyverbs",
    "iproute2",
)
#: Host packages needed to build the UML kernel.
BUILD_PACKAGES = (
    "build-essential",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "xz-utils",
    "linux-source-6.1",
)

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

#: cli() exit status when the harness itself fails (not the command).
HARNESS_FAILURE = 125

_PREFIX = "rdmakv rxe-vm"


class GuestError(RuntimeError):
    """The guest could not be prepared, booted, or did not report the command's status."""


def _log(msg: str) -> None:
    print(f"{_PREFIX}: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Host facts


def host_has_rdma() -> bool:
    """True when this kernel already exposes an RDMA device (then no guest is needed)."""
    d = pathlib.Path("/sys/class/infiniband")
    try:
        return any(d.iterdir())
    except OSError:
        return False


def _host_cpu_mhz() -> str:
    """The host CPU clock in MHz as text (perftest inside UML needs it in /proc/cpuinfo)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    for p in (
        "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq",
        "/sys/devices/system/cpu/cpu0/cpufreq/base_frequency",
    ):
        with contextlib.suppress(OSError, ValueError):
            return f"{int(pathlib.Path(p).read_text()) / 1000:.3f}"
    return "2000.000"


def _guest_cpuinfo() -> str:
    """/proc/cpuinfo for the one-CPU guest: the host's first processor block (guest user code
    runs natively on that CPU, so its flags are right), with a "cpu MHz" line (UML's own
    cpuinfo has none and perftest then prints "inf" latencies)."""
    try:
        block = pathlib.Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        block = ["processor\t: 0"]
    out = []
    for line in block:
        key = line.split(":", 1)[0].strip()
        if key in ("siblings", "cpu cores"):
            line = f"{line.split(':', 1)[0]}: 1"
        elif key in ("core id", "physical id", "apicid", "initial apicid"):
            line = f"{line.split(':', 1)[0]}: 0"
        out.append(line)
    if not any(line.startswith("cpu MHz") for line in out):
        out.insert(1, f"cpu MHz\t\t: {_host_cpu_mhz()}")
    return "\n".join(out) + "\n\n"


def _fstab_escape(path: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def _pick_cpu():
    """Choose the host core to pin UML to; returns (cpu, open lock file or None).

    $RDMAKV_UML_CPU wins. Otherwise prefer the last core we may run on, but skip cores another
    concurrent rdmakv guest holds (flock on a per-core lock file), so parallel runs spread out.
    """
    if os.environ.get("RDMAKV_UML_CPU"):
        cpus = os.environ["RDMAKV_UML_CPU"].strip()
        if not re.fullmatch(r"[0-9]+([,-][0-9]+)*", cpus):
            raise GuestError(f"RDMAKV_UML_CPU={cpus!r} is not a taskset cpu list such as 1 or 0-1")
        return cpus, None
    try:
        cpus = sorted(os.sched_getaffinity(0), reverse=True)
    except (AttributeError, OSError):
        cpus = [0]
    lock_dir = pathlib.Path(tempfile.gettempdir())
    for cpu in cpus:
        try:
            f = open(lock_dir / f"rdmakv-cpu{cpu}.lock", "a")
        except OSError:
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        return cpu, f
    return cpus[0], None  # all busy: share the last core


# --------------------------------------------------------------------------------------------
# Packages


def _missing_packages(packages) -> list[str]:
    if shutil.which("dpkg-query") is None:
        raise GuestError("dpkg-query not found: the rxe guest needs a Debian/Ubuntu host with: " + " ".join(packages))
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Status}\\n", *packages],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    installed = {line.split()[0].split(":")[0] for line in r.stdout.splitlines() if line.strip().endswith(" installed")}
    return [p for p in packages if p not in installed]


def ensure_packages(packages) -> None:
    """Install missing Debian packages (as root), or raise GuestError saying what is missing."""
    missing = _missing_packages(packages)
    if not missing:
        return
    cmd = "apt-get install -y " + " ".join(missing)
    if os.geteuid() != 0:
        raise GuestError(f"missing packages {' '.join(missing)} and not root; run: sudo {cmd}")
    _log(f"installing missing packages: {' '.join(missing)}")
    apt_env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *missing]):
        # apt's chatter goes to stderr so that our stdout stays the command's stdout.
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=2, env=apt_env)
        if r.returncode != 0:
            raise GuestError(f"`{' '.join(argv)}` failed with status {r.returncode}")
    still = _missing_packages(missing)
    if still:
        raise GuestError(f"packages still missing after apt-get install: {' '.join(still)}")


# --------------------------------------------------------------------------------------------
# Kernel cache


def kernel_key() -> str:
    """16 hex chars identifying the kernel build inputs.

    Identical to ``cd rdmakv/guest && sha256sum uml.config build-uml.sh | sha256sum | cut -c1-16``.
    """
    lines = "".join(
        f"{hashlib.sha256((GUEST_DIR / name).read_bytes()).hexdigest()}  {name}\n" for name in KERNEL_INPUTS
    )
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def _writable_dir(path: pathlib.Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


@contextlib.contextmanager
def _builder_lock(path: pathlib.Path, waiting: str):
    """Hold the exclusive flock of a cache builder's lock file ``path``. When another process
    holds it, log "waiting for another process ``waiting``" and wait; then yields True (that
    process has just built or fetched what it guards), else False."""
    with open(path, "w") as lock:
        waited = False
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process {waiting}")
            fcntl.flock(lock, fcntl.LOCK_EX)
            waited = True
        yield waited


def cache_root() -> pathlib.Path:
    """$RDMAKV_CACHE, else /var/cache/rdmakv when writable, else ~/.cache/rdmakv."""
    env = os.environ.get("RDMAKV_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    system = pathlib.Path("/var/cache/rdmakv")
    if _writable_dir(system):
        return system
    return pathlib.Path.home() / ".cache" / "rdmakv"


def cached_kernel() -> pathlib.Path | None:
    """The cached UML kernel for the current config, or None (never builds)."""
    key = kernel_key()
    candidates = [cache_root()]
    if not os.environ.get("RDMAKV_CACHE"):
        # A kernel a root run built is usable read-only by everyone.
        candidates.append(pathlib.Path("/var/cache/rdmakv"))
    for root in candidates:
        k = root / f"uml-{key}" / "linux"
        if k.is_file() and os.access(k, os.X_OK):
            return k
    return None


def ensure_kernel(rebuild: bool = False) -> pathlib.Path:
    """Return the cached UML kernel, building it (~5 min on 2 cores) when missing or stale.

    The cache directory name carries :func:`kernel_key`, so editing uml.config or build-uml.sh
    triggers a rebuild. A lock file serialises concurrent builders; waiters reuse the result.
    """
    if not rebuild:
        k = cached_kernel()
        if k is not None:
            return k
    root = cache_root()
    key = kernel_key()
    if not _writable_dir(root):
        raise GuestError(f"UML kernel not cached and cache dir {root} is not writable (set RDMAKV_CACHE)")
    out = root / f"uml-{key}"
    kernel = out / "linux"
    with _builder_lock(root / f"uml-{key}.lock", f"building the UML kernel into {out}") as waited:
        if waited:
            rebuild = False  # whoever held the lock just built it
        if kernel.is_file() and not rebuild:
            return kernel
        ensure_packages(BUILD_PACKAGES)
        _log(f"building the UML guest kernel (rxe) into {out}; takes ~5 min on 2 cores")
        t0 = time.monotonic()
        # build-uml.sh replaces the kernel atomically (install + mv): a failed rebuild keeps the old one.
        r = subprocess.run(
            ["bash", str(GUEST_DIR / "build-uml.sh"), str(out)],
            stdin=subprocess.DEVNULL,
            stdout=2,  # build chatter to stderr; our stdout stays the command's
        )
        if r.returncode != 0 or not kernel.is_file():
            raise GuestError(f"UML kernel build failed (build-uml.sh status {r.returncode})")
        _log(f"UML kernel built in {time.monotonic() - t0:.0f} s: {kernel}")
        return kernel


# --------------------------------------------------------------------------------------------
# Running a command in the guest


def _guest_env(env: dict | None, guest: str = "uml") -> dict[str, str]:
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


def _write_guest_files(io: pathlib.Path, command, genv: dict, workdir: str) -> None:
    """Everything stage1.sh / stage2.sh read from the io dir (see their headers)."""
    e = _fstab_escape
    root = f"{io}/root"
    (io / "fstab1").write_text(
        f"hostfs {e(str(io))} hostfs {e(str(io))} 0 0\nrdmakv-rw {e(str(io))}/rw tmpfs mode=0755 0 0\n"
    )
    lines = [
        f"rdmakv-root {e(root)} overlay lowerdir=/,upperdir={e(str(io))}/rw/upper,workdir={e(str(io))}/rw/work 0 0",
        f"proc {e(root)}/proc proc defaults 0 0",
        f"sysfs {e(root)}/sys sysfs defaults 0 0",
        f"devtmpfs {e(root)}/dev devtmpfs defaults 0 0",
        f"devpts {e(root)}/dev/pts devpts newinstance,ptmxmode=0666,mode=0620,X-mount.mkdir 0 0",
        f"tmpfs {e(root)}/dev/shm tmpfs mode=1777,X-mount.mkdir 0 0",
        f"tmpfs {e(root)}/run tmpfs mode=0755 0 0",
        f"tmpfs {e(root)}/tmp tmpfs mode=1777 0 0",
        f"{e(str(io))} {e(root)}/run/rdmakv-io none bind,X-mount.mkdir 0 0",
    ]
    if workdir != "/":
        # after /tmp, /run, /dev/shm so that a cwd below them is not hidden
        lines.append(f"hostfs {e(root + workdir)} hostfs {e(workdir)},X-mount.mkdir 0 0")
    lines.append(f"{e(str(io))}/cpuinfo {e(root)}/proc/cpuinfo none bind,ro 0 0")
    (io / "fstab2").write_text("\n".join(lines) + "\n")
    (io / "cpuinfo").write_text(_guest_cpuinfo())
    _write_run_files(io, command, genv, workdir)


def _write_run_files(io: pathlib.Path, command, genv: dict, workdir: str) -> None:
    """The io files both guests' stage 2 read: devlinks, net.ip, argv, env, cwd, trace."""
    links = io / "devlinks"
    links.mkdir()
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        (links / name).symlink_to(target)
    net = ["link set lo up", "link add d0 type dummy"]
    # MTU 9000 lets rxe use a 4096-byte path MTU: a quarter of the packets (and of their
    # ICRCs) per READ; RXE.md measured ~30 % more READ bandwidth. RDMAKV_GUEST_MTU overrides.
    mtu = int(os.environ.get("RDMAKV_GUEST_MTU") or DEFAULT_GUEST_MTU)
    net.append(f"link set d0 mtu {mtu}")
    net += ["addr add 192.0.2.1/24 dev d0", "link set d0 up"]
    (io / "net.ip").write_text("\n".join(net) + "\n")
    _nul_file(io / "argv", [str(a) for a in command])
    _nul_file(io / "env", [f"{k}={v}" for k, v in genv.items()])
    _nul_file(io / "cwd", [workdir])
    if os.environ.get("RDMAKV_VM_TRACE", "") not in ("", "0"):
        (io / "trace").write_text("1")  # stage2 runs with `set -x` into console.log


DEFAULT_GUEST_MTU = 9000


def _pump(fd: int, stream) -> None:
    """Copy a pipe to a Python stream, live (chunk by chunk)."""
    buf = getattr(stream, "buffer", None)
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except InterruptedError:
                continue
            if not data:
                break
            try:
                if buf is not None:
                    buf.write(data)
                    buf.flush()
                else:
                    stream.write(data.decode(errors="replace"))
                    stream.flush()
            except (OSError, ValueError):
                pass  # the consumer went away; keep draining so the guest never blocks
    finally:
        os.close(fd)


def _read_float(path: pathlib.Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _tail(path: pathlib.Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no console log)"
    return "\n".join(lines[-n:]) or "(console log empty)"


def _mem_bytes(mem: str) -> int:
    n, unit = (mem[:-1], mem[-1]) if mem[-1] in "KMG" else (mem, "")
    return int(n) << {"": 0, "K": 10, "M": 20, "G": 30}[unit]


def _uml_host_env(mem: str, tmp: pathlib.Path) -> dict[str, str]:
    """Environment of the UML process itself. UML backs guest RAM with a file in $TMPDIR, else
    /dev/shm; a small /dev/shm (containers often have 64 MB) would SIGBUS the guest, so then
    point TMPDIR at our temp dir instead."""
    env = dict(os.environ)
    if env.get("TMPDIR"):
        return env
    try:
        st = os.statvfs("/dev/shm")
        shm_free = st.f_bavail * st.f_frsize
    except OSError:
        shm_free = 0
    if shm_free < _mem_bytes(mem):
        env["TMPDIR"] = str(tmp)
    return env


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


def _uml_preexec() -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a UML panic must not leave a core dump
    with contextlib.suppress(Exception):
        # If the harness dies (even by SIGKILL) the guest dies with it instead of lingering.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


STAGE2_COMMON = "stage2-common.sh"  # sourced by stage2.sh and qemu-stage2.sh from the io dir


def _copy_stage_scripts(io: pathlib.Path, *names: str) -> None:
    """Copy the guest's stage scripts and the fragment both stage 2s source into the io dir."""
    for name in (*names, STAGE2_COMMON):
        dst = io / name
        shutil.copyfile(GUEST_DIR / name, dst)
        dst.chmod(0o755)


class _GuestRun:
    """Host side of one guest boot (UML or QEMU): the temp dir with ``io/`` (shared with the
    guest) and ``console.log``, the open console log, the pipes that carry the command's stdout
    and stderr, and the guest process. Made and cleaned up by :func:`_guest_run`."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.tmp = tmp
        self.io = tmp / "io"
        self.console = tmp / "console.log"
        self.log = None  # console.log, opened by the caller (mode differs per guest)
        self.proc: subprocess.Popen | None = None
        self.fds: list[int] = []  # still ours to close
        self.t_launch = self.t_exit = 0.0
        self._pipes: list[tuple[int, int]] = []

    def open_pipes(self) -> tuple[int, int]:
        """Pipes for the command's stdout and stderr; returns their write ends (the guest's)."""
        r_out, w_out = os.pipe()
        r_err, w_err = os.pipe()
        self.fds += [r_out, w_out, r_err, w_err]
        self._pipes = [(r_out, w_out), (r_err, w_err)]
        return w_out, w_err

    def boot(self, argv: list[str], *, timeout: float, what: str, **popen_kwargs) -> int:
        """Start the guest (own session, output to console.log, no core dump, dies with us),
        stream the command's output to sys.stdout / sys.stderr, wait for the guest to end and
        return the command's status from io/rc. Raises :class:`GuestError` on timeout, on a
        setup failure the guest wrote to io/error, or when it left no io/rc (``what``: "UML"
        or "QEMU", for that message)."""
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        self.t_launch = time.time()
        deadline = time.monotonic() + timeout
        self.proc = proc = subprocess.Popen(
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
        pumps = []
        for (r, _), stream in zip(self._pipes, (sys.stdout, sys.stderr)):
            self.fds.remove(r)
            t = threading.Thread(target=_pump, args=(r, stream), daemon=True)
            t.start()
            pumps.append(t)
        try:
            status = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            proc.wait()
            raise GuestError(f"guest timed out after {timeout:g} s; console log tail:\n{_tail(self.console)}") from None
        self.t_exit = time.time()
        _killpg(proc.pid)  # stray helper processes, if any
        for t in pumps:
            t.join(timeout=5)
        err = self.io / "error"
        if err.exists():
            raise GuestError(f"guest setup failed: {err.read_text().strip()}")
        rc_file = self.io / "rc"
        if not rc_file.exists():
            raise GuestError(
                f"guest died without reporting a status ({what} exit status {status}); "
                f"console log tail:\n{_tail(self.console)}"
            )
        return int(rc_file.read_text().strip())

    def log_timings(self, label: str, stamp) -> None:
        """Log boot / command / shutdown timings after :meth:`boot`; ``stamp(path)`` is the time
        a t_* file in io/ records (its content or its mtime), or None."""
        t_s2, t_cmd, t_end = (stamp(self.io / n) for n in ("t_stage2", "t_cmd", "t_end"))
        if t_s2 and t_cmd and t_end:
            t_launch, t_exit = self.t_launch, self.t_exit
            _log(
                f"timings ({label}): boot to stage2 {t_s2 - t_launch:.3f} s, "
                f"boot to command {t_cmd - t_launch:.3f} s, "
                f"command {t_end - t_cmd:.3f} s, shutdown {t_exit - t_end:.3f} s, "
                f"total {t_exit - t_launch:.3f} s "
                f"(overhead {(t_exit - t_launch) - (t_end - t_cmd):.3f} s)"
            )


@contextlib.contextmanager
def _guest_run(prefix: str, *closing):
    """A :class:`_GuestRun` in a new temp dir. On the way out, however that is: kill the guest's
    process group, close our fds, the console log and ``closing`` (None entries skipped), then
    remove the temp dir (kept, and said so, with $RDMAKV_VM_KEEP)."""
    g = _GuestRun(pathlib.Path(tempfile.mkdtemp(prefix=prefix)))
    try:
        yield g
    finally:
        if g.proc is not None and g.proc.returncode is None:
            _killpg(g.proc.pid)
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
            _log(f"kept guest temp dir {g.tmp} (console.log, io/)")
        else:
            shutil.rmtree(g.tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# QEMU TCG guest (fallback for machines where the UML kernel cannot be built)
#
# Debian's stock kernel package is extracted (never installed) into the cache; a small
# initramfs (busybox-static + the 9p/virtio/overlay modules; qemu-init.sh) mounts the host root
# read-only over 9p with a tmpfs overlay and switch_roots into qemu-stage2.sh, which loads
# rdma_rxe and runs the command like stage2.sh does. Always TCG: /dev/kvm on these machines is
# a stub that hangs a guest kernel in its decompressor (RXE.md).

#: Host packages the QEMU guest needs on top of RUNTIME_PACKAGES.
QEMU_PACKAGES = ("qemu-system-x86", "busybox-static", "kmod")
#: Debian meta package whose dependency names the stock kernel package we extract.
QEMU_KERNEL_META = "linux-image-amd64"
#: Modules the initramfs loads (plus their dependencies, in `modprobe --show-depends` order)
#: to reach the 9p root; everything else is modprobe'd by stage 2 from the shared module tree.
QEMU_INITRD_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
QEMU_INIT = "qemu-init.sh"  # the initramfs /init: part of the initramfs cache key
QEMU_STAGE2 = "qemu-stage2.sh"  # copied into the io dir per run, like stage2.sh
QEMU_BUSYBOX = pathlib.Path("/bin/busybox")  # busybox-static's binary
QEMU_KERNEL_ARGS = (
    "console=ttyS0",
    "quiet",
    "loglevel=4",
    "panic=-1",  # with -no-reboot: a panic (e.g. PID 1 exiting) ends QEMU at once
    # PCI interrupt routing from the firmware's table, not ACPI: interpreting the interrupt
    # link AML under TCG costs ~0.3 s per PCI device. (acpi=off would be faster still but
    # loses HPET/PM timer, so the TSC often fails calibration and time runs on jiffies.)
    "pci=noacpi",
    "rdinit=/init",
    # Under TCG every CR3 switch flushes the soft TLB; page-table isolation and the other
    # speculation mitigations only cost time in a throw-away guest.
    "mitigations=off",
    # The emulated TSC is fine as a clocksource; without this the watchdog may demote it.
    "tsc=reliable",
    # No keyboard/mouse controller probing (there is nothing to talk to).
    "i8042.noaux",
    "i8042.nokbd",
)


class QemuKernel:
    """A stock Debian kernel package extracted into the cache: ``boot/vmlinuz-KVER`` and the
    depmod'ed module tree ``lib/modules/KVER`` under :attr:`root`."""

    def __init__(self, root: pathlib.Path, kver: str) -> None:
        self.root = root
        self.kver = kver

    @property
    def vmlinuz(self) -> pathlib.Path:
        return self.root / "boot" / f"vmlinuz-{self.kver}"

    @property
    def boot_image(self) -> pathlib.Path:
        """What QEMU boots: the uncompressed ``vmlinux`` (PVH entry) when we could extract it,
        else the bzImage. Under TCG the bzImage's own xz decompressor takes ~5 s."""
        vmlinux = self.root / "boot" / f"vmlinux-{self.kver}"
        return vmlinux if vmlinux.is_file() else self.vmlinuz

    @property
    def modules_dir(self) -> pathlib.Path:
        """The directory holding ``KVER/`` (shared read-only as the guest's /lib/modules)."""
        for d in (self.root / "lib" / "modules", self.root / "usr" / "lib" / "modules"):
            if (d / self.kver).is_dir():
                return d
        return self.root / "lib" / "modules"

    def __repr__(self) -> str:
        return f"QemuKernel({str(self.root)!r}, {self.kver!r})"


_QEMU_MARKER = ".rdmakv-kver"  # written last into an extracted kernel dir: it is complete


def _cache_roots() -> list[pathlib.Path]:
    roots = [cache_root()]
    if not os.environ.get("RDMAKV_CACHE") and pathlib.Path("/var/cache/rdmakv") not in roots:
        roots.append(pathlib.Path("/var/cache/rdmakv"))  # what a root run prepared, read-only
    return roots


def cached_qemu_kernel() -> QemuKernel | None:
    """The newest complete extracted kernel in the cache, or None (never downloads).

    A cached kernel is used as long as it exists, so runs stay offline and reproducible;
    ``rdmakv rxe-vm --guest qemu --rebuild`` fetches the one linux-image-amd64 currently names.
    """
    best: tuple[float, QemuKernel] | None = None
    for root in _cache_roots():
        for d in sorted(root.glob("qemu-linux-*")):
            marker = d / _QEMU_MARKER
            try:
                kver = marker.read_text().strip()
                mtime = marker.stat().st_mtime
            except OSError:
                continue
            k = QemuKernel(d, kver)
            if kver and k.vmlinuz.is_file() and (best is None or mtime > best[0]):
                best = (mtime, k)
    return best[1] if best else None


def _extract_vmlinux(kernel: QemuKernel) -> bool:
    """Write ``boot/vmlinux-KVER``, the ELF kernel inside the bzImage, when the kernel can
    boot it directly (CONFIG_PVH) and it is xz- or gzip-compressed (Debian: xz). Under TCG this
    saves the ~5 s the kernel's own decompressor needs. False when not possible."""
    config = kernel.root / "boot" / f"config-{kernel.kver}"
    try:
        if "\nCONFIG_PVH=y\n" not in config.read_text(errors="replace"):
            return False
        image = kernel.vmlinuz.read_bytes()
    except OSError:
        return False
    for magic, make in ((b"\xfd7zXZ\x00", lzma.LZMADecompressor), (b"\x1f\x8b\x08", lambda: zlib.decompressobj(31))):
        start = image.find(magic)
        while start >= 0:
            try:
                elf = make().decompress(image[start:])
            except (lzma.LZMAError, zlib.error):
                elf = b""
            if elf.startswith(b"\x7fELF"):
                out = kernel.root / "boot" / f"vmlinux-{kernel.kver}"
                tmp = out.with_name(f".{out.name}.{os.getpid()}")
                tmp.write_bytes(elf)
                os.replace(tmp, out)
                return True
            start = image.find(magic, start + 1)
    return False


def _sbin_tool(name: str) -> str:
    """A tool from /sbin or /usr/sbin (often not on a normal user's PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise GuestError(f"{name} not found on the host (package kmod)")
    return found


def _stock_kernel_package() -> str:
    """The versioned kernel package linux-image-amd64 depends on (e.g. linux-image-6.1.0-56-amd64)."""

    def lookup() -> str | None:
        r = subprocess.run(
            ["apt-cache", "depends", QEMU_KERNEL_META],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for line in r.stdout.splitlines():
            m = re.match(r"\s*\|?Depends:\s*(linux-image-[0-9]\S*)", line)
            if m:
                return m.group(1)
        return None

    if shutil.which("apt-cache") is None:
        raise GuestError("apt-cache not found: the QEMU guest needs a Debian/Ubuntu host")
    pkg = lookup()
    if pkg is None and os.geteuid() == 0:
        _log("apt-get update (to find the kernel package linux-image-amd64 depends on)")
        subprocess.run(["apt-get", "update"], stdin=subprocess.DEVNULL, stdout=2)
        pkg = lookup()
    if pkg is None:
        raise GuestError(f"cannot tell which kernel package {QEMU_KERNEL_META} depends on (apt-cache depends)")
    return pkg


def ensure_qemu_kernel(rebuild: bool = False) -> QemuKernel:
    """Return the cached stock kernel for the QEMU guest, downloading and extracting it
    (~70 MB download, ~400 MB extracted, ~15 s) when none is cached or ``rebuild`` is true.

    The package is ``apt-get download``-ed and ``dpkg-deb -x``-ed, never installed (the host's
    /boot and /lib/modules stay untouched); ``depmod -b`` adds the modules.dep it lacks.
    """
    if not rebuild:
        k = cached_qemu_kernel()
        if k is not None:
            return k
    root = cache_root()
    if not _writable_dir(root):
        raise GuestError(f"QEMU guest kernel not cached and cache dir {root} is not writable (set RDMAKV_CACHE)")
    with _builder_lock(root / "qemu-linux.lock", f"extracting the QEMU guest kernel into {root}") as waited:
        if waited:
            rebuild = False  # whoever held the lock just fetched it
        if not rebuild:
            k = cached_qemu_kernel()
            if k is not None:
                return k
        ensure_packages(QEMU_PACKAGES)
        pkg = _stock_kernel_package()
        kver = pkg.removeprefix("linux-image-")
        t0 = time.monotonic()
        _log(f"fetching {pkg} for the QEMU guest into {root} (download ~70 MB, extract ~400 MB)")
        work = pathlib.Path(tempfile.mkdtemp(prefix=".qemu-linux-", dir=root))
        try:
            # As root, apt drops to the _apt user for downloads, which cannot write our 0700 dir.
            sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
            r = subprocess.run(["apt-get", *sandbox, "download", pkg], cwd=work, stdin=subprocess.DEVNULL, stdout=2)
            debs = sorted(work.glob("*.deb"))
            if r.returncode != 0 or len(debs) != 1:
                raise GuestError(f"`apt-get download {pkg}` failed (status {r.returncode})")
            version = subprocess.run(
                ["dpkg-deb", "-f", str(debs[0]), "Version"], stdout=subprocess.PIPE, text=True, check=False
            ).stdout.strip()
            tree = work / "tree"
            r = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tree)], stdin=subprocess.DEVNULL, stdout=2)
            debs[0].unlink()
            k = QemuKernel(tree, kver)
            if r.returncode != 0 or not k.vmlinuz.is_file() or not (k.modules_dir / kver).is_dir():
                raise GuestError(f"`dpkg-deb -x` of {pkg} failed or has no vmlinuz/modules for {kver}")
            modules_base = k.modules_dir.parent.parent  # depmod -b wants the dir above lib/modules
            depmod = [_sbin_tool("depmod"), "-b", str(modules_base), kver]
            r = subprocess.run(depmod, stdin=subprocess.DEVNULL, stdout=2)
            if r.returncode != 0:
                raise GuestError(f"depmod -b {modules_base} {kver} failed (status {r.returncode})")
            if not _extract_vmlinux(k):
                _log("could not extract an uncompressed PVH vmlinux; booting the bzImage (~5 s slower)")
            (tree / _QEMU_MARKER).write_text(kver + "\n")
            dest = root / f"qemu-linux-{kver}_{re.sub(r'[^A-Za-z0-9.+~-]', '_', version)}"
            if dest.exists():
                old = pathlib.Path(tempfile.mkdtemp(prefix=".qemu-linux-old-", dir=root))
                dest.rename(old / "tree")
                shutil.rmtree(old, ignore_errors=True)
            tree.rename(dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        others = [d.name for d in root.glob("qemu-linux-*") if d != dest and d.is_dir()]
        if others:
            _log(f"older QEMU guest kernels in {root} (unused now, removable): {' '.join(others)}")
        _log(f"QEMU guest kernel {kver} ({version}) ready in {time.monotonic() - t0:.0f} s: {dest}")
        return QemuKernel(dest, kver)


def _initrd_modules(kernel: QemuKernel) -> list[tuple[pathlib.Path, str]]:
    """(module file, parameters) for QEMU_INITRD_MODULES and their dependencies, load order."""
    modprobe = _sbin_tool("modprobe")
    out: list[tuple[pathlib.Path, str]] = []
    seen: set[pathlib.Path] = set()
    for mod in QEMU_INITRD_MODULES:
        r = subprocess.run(
            [modprobe, "-d", str(kernel.modules_dir.parent.parent), "-S", kernel.kver, "--show-depends", mod],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise GuestError(f"modprobe --show-depends {mod} for {kernel.kver} failed: {r.stderr.strip()}")
        for line in r.stdout.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "insmod":
                path = pathlib.Path(words[1])
                if path not in seen:
                    seen.add(path)
                    out.append((path, " ".join(words[2:])))
            # "builtin NAME" lines: nothing to load
    return out


def qemu_initrd_key(kernel: QemuKernel) -> str:
    """16 hex chars identifying the initramfs: kernel build, qemu-init.sh, module list."""
    h = hashlib.sha256()
    h.update(f"{kernel.root.name}\0{kernel.kver}\0{' '.join(QEMU_INITRD_MODULES)}\0".encode())
    h.update((GUEST_DIR / QEMU_INIT).read_bytes())
    return h.hexdigest()[:16]


def _cpio_newc(entries: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """An uncompressed "newc" cpio archive (the kernel's initramfs format) of
    (name, mode, data, rdev major, rdev minor) entries; owner root, mtime 0 (reproducible)."""
    out = bytearray()
    for ino, (name, mode, data, major, minor) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0, 0)], 1):
        bname = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(bname), 0)
        out += b"070701" + "".join(f"{v:08x}" for v in fields).encode() + bname
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def ensure_qemu_initrd(kernel: QemuKernel) -> pathlib.Path:
    """Return the cached initramfs for ``kernel`` (``qemu-KVER-KEY/initrd.cpio``), building it
    (~4 MB, well under a second) when missing. Uncompressed: nothing to inflate under TCG."""
    name = f"qemu-{kernel.kver}-{qemu_initrd_key(kernel)}"
    for root in _cache_roots():
        if (root / name / "initrd.cpio").is_file():
            return root / name / "initrd.cpio"
    if not QEMU_BUSYBOX.is_file():
        raise GuestError(f"{QEMU_BUSYBOX} missing (package busybox-static)")
    d = cache_root() / name
    if not _writable_dir(d):
        raise GuestError(f"cannot create {d} for the QEMU guest initramfs (set RDMAKV_CACHE)")
    dirm, filem, exem = 0o040755, 0o100644, 0o100755
    entries: list[tuple[str, int, bytes, int, int]] = [
        (p, dirm, b"", 0, 0) for p in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "newroot")
    ]
    # The kernel opens /dev/console for init's stdio before any /dev is mounted.
    entries.append(("dev/console", 0o020600, b"", 5, 1))
    entries.append(("bin/busybox", exem, QEMU_BUSYBOX.read_bytes(), 0, 0))
    entries.append(("bin/sh", 0o120777, b"busybox", 0, 0))  # for /init's #!/bin/sh
    entries.append(("init", exem, (GUEST_DIR / QEMU_INIT).read_bytes(), 0, 0))
    order = []
    for path, params in _initrd_modules(kernel):
        entries.append((f"lib/modules/{path.name}", filem, path.read_bytes(), 0, 0))
        order.append(f"{path.name} {params}".rstrip())
    entries.append(("modules.list", filem, ("\n".join(order) + "\n").encode(), 0, 0))
    out = d / "initrd.cpio"
    tmp = d / f".initrd.cpio.{os.getpid()}"
    tmp.write_bytes(_cpio_newc(entries))
    os.replace(tmp, out)  # atomic: concurrent builders write identical files
    return out


def ensure_qemu_guest(rebuild: bool = False) -> tuple[QemuKernel, pathlib.Path]:
    """Kernel and initramfs for the QEMU guest (see :func:`ensure_qemu_kernel`)."""
    kernel = ensure_qemu_kernel(rebuild=rebuild)
    return kernel, ensure_qemu_initrd(kernel)


def _qemu_opt(value: str) -> str:
    """Escape a value for a QEMU -option list: a comma is written twice."""
    return value.replace(",", ",,")


def _qemu_smp() -> int:
    """vCPUs: $RDMAKV_QEMU_SMP, else up to 2 (multi-threaded TCG runs one host thread per vCPU;
    two let a server and a client in the guest make progress at the same time)."""
    if os.environ.get("RDMAKV_QEMU_SMP"):
        try:
            return max(1, int(os.environ["RDMAKV_QEMU_SMP"]))
        except ValueError:
            raise GuestError(f"RDMAKV_QEMU_SMP={os.environ['RDMAKV_QEMU_SMP']!r} is not a number") from None
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(2, n))


def _mtime(path: pathlib.Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _run_qemu(command, *, timeout: float, mem: str, workdir: str, env: dict | None, verbose: bool) -> int:
    """run(guest="qemu"): boot the QEMU TCG guest, run ``command``, return its exit status."""
    ensure_packages(RUNTIME_PACKAGES + QEMU_PACKAGES)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise GuestError("qemu-system-x86_64 not found on the host (package qemu-system-x86)")
    kernel, initrd = ensure_qemu_guest()
    genv = _guest_env(env, "qemu")

    with _guest_run("rdmakv-qemu-") as g:
        io = g.io
        io.mkdir()
        _copy_stage_scripts(io, QEMU_STAGE2)
        _write_run_files(io, command, genv, workdir)
        # O_APPEND: QEMU's own messages (stderr) and the guest serial console (chardev with
        # append=on) share this file without overwriting each other.
        g.log = open(g.console, "ab")
        w_out, w_err = g.open_pipes()
        for fd in (w_out, w_err):
            # QEMU drops whatever it still holds for a port when the guest powers off; a big
            # pipe keeps the command's last output in the kernel until our pump reads it.
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)

        def share(tag: str, path: str, readonly: bool) -> list[str]:
            # security_model=none: files are accessed/created with QEMU's (the caller's)
            # credentials, like hostfs under UML; multidevs=remap: the host root spans mounts.
            ro = ",readonly=on" if readonly else ""
            return [
                "-fsdev", f"local,id=fs_{tag},path={_qemu_opt(path)},security_model=none,multidevs=remap{ro}",
                "-device", f"virtio-9p-pci,fsdev=fs_{tag},mount_tag={tag}",
            ]  # fmt: skip

        argv = [
            qemu,
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            # Never KVM: /dev/kvm here answers ioctls but the guest hangs in its decompressor.
            "-accel", "tcg,thread=multi", "-cpu", "max",
            "-smp", str(_qemu_smp()),
            "-m", f"{max(256, _mem_bytes(mem) >> 20)}M",
            # No NIC at all: rxe runs on a dummy netdev, nothing leaves the guest.
            "-nic", "none",
            "-kernel", str(kernel.boot_image),
            "-initrd", str(initrd),
            # $RDMAKV_QEMU_APPEND: extra kernel arguments for debugging (e.g. "loglevel=7").
            "-append", " ".join([*QEMU_KERNEL_ARGS, *os.environ.get("RDMAKV_QEMU_APPEND", "").split()]),
            "-chardev", f"file,id=con,path={_qemu_opt(str(g.console))},append=on",
            "-serial", "chardev:con",
            "-device", "virtio-serial-pci,id=vser",
            "-chardev", f"file,id=out,path=/dev/fd/{w_out}",
            "-device", "virtserialport,bus=vser.0,chardev=out,name=rdmakv.out",
            "-chardev", f"file,id=err,path=/dev/fd/{w_err}",
            "-device", "virtserialport,bus=vser.0,chardev=err,name=rdmakv.err",
            *share("root", "/", readonly=True),
            *share("io", str(io), readonly=False),
            *share("modules", str(kernel.modules_dir), readonly=True),
        ]  # fmt: skip
        if workdir != "/":
            argv += share("cwd", workdir, readonly=False)
        bios = pathlib.Path("/usr/share/qemu/qboot.rom")
        if bios.is_file():
            argv += ["-bios", str(bios)]  # a minimal firmware: boots faster than SeaBIOS under TCG
        rc = g.boot(argv, timeout=timeout, what="QEMU", pass_fds=(w_out, w_err), cwd=g.tmp)
        if verbose:
            # Host-side mtimes of files the guest wrote through 9p: no guest-clock skew.
            g.log_timings(f"qemu tcg, {_qemu_smp()} vCPU", _mtime)
        return rc


def run(
    command: list[str],
    *,
    guest: str = "uml",
    timeout: float = 3000,
    mem: str = "3G",
    cwd: str | None = None,
    env: dict | None = None,
    verbose: bool | None = None,
) -> int:
    """Boot a guest with ``rxe0`` up, run ``command`` in it, return the command's exit status.

    ``command`` runs with ``cwd`` (default: the current directory, mounted read-write from the
    host at the same path) and the caller's environment (:data:`PASS_ENV`, every ``RDMAKV_*``,
    then ``env``) plus ``RDMAKV_IN_GUEST=1`` and ``RDMAKV_GUEST=<guest>``. Its stdout and stderr
    are streamed live to ``sys.stdout`` / ``sys.stderr``. A status >= 128 means "killed by signal
    status-128" as in a shell. ``timeout`` bounds the whole boot+run+shutdown (seconds; kernel
    build and package installs are not counted). ``verbose`` (default: $RDMAKV_VM_VERBOSE) prints
    boot/run/shutdown timings to stderr. ``guest="qemu"`` uses the QEMU TCG fallback instead of
    UML (its one-time kernel download/extract is not counted in ``timeout`` either).

    Raises :class:`GuestError` when the guest cannot be prepared (missing kernel or packages,
    rxe0 not ACTIVE, ...), dies without reporting a status, or times out.
    """
    if isinstance(command, (str, bytes)) or not command:
        raise ValueError("command must be a non-empty list of strings")
    if os.environ.get("RDMAKV_IN_GUEST"):
        raise GuestError("already inside the rxe guest (RDMAKV_IN_GUEST is set): run the command directly")
    if guest not in ("uml", "qemu"):
        raise GuestError(f"unknown guest {guest!r} (expected 'uml' or 'qemu')")
    if not re.fullmatch(r"[0-9]+[KMG]?", mem):
        raise GuestError(f"bad mem {mem!r} (expected e.g. 3G, 512M)")
    if verbose is None:
        verbose = os.environ.get("RDMAKV_VM_VERBOSE", "") not in ("", "0")
    workdir = os.path.realpath(cwd if cwd is not None else os.getcwd())
    if not os.path.isdir(workdir):
        raise GuestError(f"cwd {workdir} is not a directory")
    if guest == "qemu":
        return _run_qemu(command, timeout=timeout, mem=mem, workdir=workdir, env=env, verbose=verbose)
    if "," in workdir:
        raise GuestError(f"cwd {workdir} contains a comma, which hostfs mount options cannot carry")
    for tool in ("taskset",):
        if shutil.which(tool) is None:
            raise GuestError(f"{tool} not found on the host (package util-linux)")
    ensure_packages(RUNTIME_PACKAGES)
    kernel = ensure_kernel()
    genv = _guest_env(env)

    cpu, cpu_lock = _pick_cpu()
    with _guest_run("rdmakv-uml-", cpu_lock) as g:
        io, tmp = g.io, g.tmp
        for d in (io / "rw", io / "root", tmp / "uml"):
            d.mkdir(parents=True)
        _copy_stage_scripts(io, "stage1.sh", "stage2.sh")
        _write_guest_files(io, command, genv, workdir)
        g.log = log = open(g.console, "wb")
        w_out, w_err = g.open_pipes()
        argv = [
            "taskset", "-c", str(cpu),
            str(kernel),
            f"mem={mem}",
            f"uml_dir={tmp / 'uml'}",
            "rootfstype=hostfs", "rootflags=/", "ro",
            "quiet", "loglevel=4",
            f"init={io / 'stage1.sh'}",
            "con=null", "ssl=null",
            f"con0=null,fd:{log.fileno()}",
            f"con1=null,fd:{w_out}",
            f"con2=null,fd:{w_err}",
        ]  # fmt: skip
        rc = g.boot(
            argv,
            timeout=timeout,
            what="UML",
            pass_fds=(log.fileno(), w_out, w_err),
            cwd=tmp / "uml",  # a UML core dump (if any) lands in the temp dir
            env=_uml_host_env(mem, tmp),
        )
        if verbose:
            g.log_timings(f"cpu {cpu}", _read_float)
        return rc


# --------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rdmakv rxe-vm",
        description=(
            "Run COMMAND inside a throw-away User-Mode Linux guest that has a real soft-RoCE "
            "device rxe0 (rdma_rxe on a dummy netdev d0, 192.0.2.1/24, PORT_ACTIVE). The host's "
            "root is shared read-only (writes go to a tmpfs overlay), the current directory is "
            "mounted read-write at the same path, and COMMAND runs there with the caller's "
            "environment plus RDMAKV_IN_GUEST=1. Its output is streamed live; its exit status "
            f"becomes ours. Harness failures exit with {HARNESS_FAILURE}."
        ),
        epilog="Example: rdmakv rxe-vm -- ibv_devinfo -d rxe0",
    )
    p.add_argument(
        "--guest",
        choices=("uml", "qemu"),
        default="uml",
        help="guest kind: 'uml' (User-Mode Linux, boots in <1 s, the default) or 'qemu' "
        "(QEMU TCG emulation of Debian's stock kernel: no kernel build, but ~10 s to boot and "
        "20-50x slower; for machines where the UML kernel cannot be built)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=3000,
        metavar="S",
        help="kill the guest and fail after S seconds for boot + COMMAND + shutdown "
        "(default: %(default)g; a first-time kernel build is not counted)",
    )
    p.add_argument(
        "--mem",
        default="3G",
        help="guest RAM, UML 'mem=' syntax such as 512M or 3G (default: %(default)s; "
        "backed lazily by host memory in /dev/shm or $TMPDIR)",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="rebuild the cached UML kernel first even if one matching the current "
        "config is cached (normally it is rebuilt only when missing or when "
        "rdmakv/guest/uml.config or build-uml.sh changed); with --guest qemu: fetch and "
        "extract the kernel package linux-image-amd64 now depends on again",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print boot / command / shutdown timings to stderr (same as RDMAKV_VM_VERBOSE=1)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...", help="the command to run in the guest")
    return p


def cli(argv: list[str]) -> int:
    """``rdmakv rxe-vm [--guest uml|qemu] [--timeout S] [--mem 3G] [--rebuild] -- COMMAND...``"""
    p = _parser()
    args = p.parse_args(argv)
    command = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        p.error("no COMMAND given (usage: rdmakv rxe-vm [options] -- COMMAND...)")

    def _on_sigterm(signum, frame):
        raise SystemExit(128 + signum)  # unwinds run(): kills the guest, removes temp dirs

    with contextlib.suppress(ValueError):  # ValueError: not in the main thread
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.rebuild and args.guest == "qemu":
            ensure_qemu_guest(rebuild=True)
        elif args.rebuild:
            ensure_kernel(rebuild=True)
        return run(command, guest=args.guest, timeout=args.timeout, mem=args.mem, verbose=args.verbose or None)
    except GuestError as e:
        msg = str(e)
        print(f"{_PREFIX}: error: {msg}", file=sys.stderr, flush=True)
        return HARNESS_FAILURE
    except KeyboardInterrupt:
        print(f"{_PREFIX}: interrupted; guest killed", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
