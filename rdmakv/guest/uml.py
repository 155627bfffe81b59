"""The User-Mode Linux guest: boot the cached UML kernel pinned to one host core, the host root
shared read-only over hostfs with a tmpfs overlay, and run the command in it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Sequence

from .host import RUNTIME_PACKAGES, GuestError, ensure_packages
from .kernel import ensure_kernel
from .runner import (
    PowerCut,
    copy_stage_scripts,
    guest_env,
    guest_run,
    mem_bytes,
    read_float,
    write_run_files,
)


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
        return _env_cpus(), None
    return pick_cpus(1)[0]


def _env_cpus() -> str:
    cpus = os.environ["RDMAKV_UML_CPU"].strip()
    if not re.fullmatch(r"[0-9]+([,-][0-9]+)*", cpus):
        raise GuestError(f"RDMAKV_UML_CPU={cpus!r} is not a taskset cpu list such as 1 or 0-1")
    return cpus


def _expand_cpus(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def pick_cpus(n: int) -> list[tuple[int | str, object]]:
    """``n`` host cores for ``n`` guests, one each where the machine has that many; each as
    (cpu, open lock file or None). Free cores first (last core first, as :func:`_pick_cpu`),
    then cores another run holds: two guests on one core would halve each one's speed, which
    is worse than sharing a core with another run's single guest only in the rare case that
    run is busy. With $RDMAKV_UML_CPU (a taskset list), guest i gets its i-th core (cycling)."""
    if os.environ.get("RDMAKV_UML_CPU"):
        listed = _expand_cpus(_env_cpus())
        return [(listed[i % len(listed)], None) for i in range(n)]
    try:
        cpus = sorted(os.sched_getaffinity(0), reverse=True)
    except (AttributeError, OSError):
        cpus = [0]
    lock_dir = pathlib.Path(tempfile.gettempdir())
    picked: list[tuple[int | str, object]] = []
    busy: list[int] = []
    for cpu in cpus:
        if len(picked) == n:
            break
        try:
            f = open(lock_dir / f"rdmakv-cpu{cpu}.lock", "a")  # noqa: SIM115 - held while the guest runs
        except OSError:
            busy.append(cpu)
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            busy.append(cpu)
            continue
        picked.append((cpu, f))
    while len(picked) < n:  # not enough free cores: share (busy ones, then round again)
        pool = busy or cpus
        picked.append((pool[(len(picked)) % len(pool)], None))
    return picked


def _write_guest_files(io: pathlib.Path, command, genv: dict, workdir: str, net=None) -> None:
    """Everything stage1.sh / stage2.sh read from the io dir (see their headers); ``net`` as
    for :func:`write_run_files`."""
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
    write_run_files(io, command, genv, workdir, net)


def uml_host_env(mem: str, tmp: pathlib.Path, guests: int = 1) -> dict[str, str]:
    """Environment of the UML process itself. UML backs guest RAM with a file in $TMPDIR, else
    /dev/shm; a small /dev/shm (containers often have 64 MB) would SIGBUS the guest, so then
    point TMPDIR at our temp dir instead (``guests`` running at once each need ``mem``)."""
    env = dict(os.environ)
    if env.get("TMPDIR"):
        return env
    try:
        st = os.statvfs("/dev/shm")
        shm_free = st.f_bavail * st.f_frsize
    except OSError:
        shm_free = 0
    if shm_free < guests * mem_bytes(mem):
        env["TMPDIR"] = str(tmp)
    return env


def check_host(workdir: str) -> pathlib.Path:
    """What every UML run needs on the host; returns the kernel (built if missing)."""
    if "," in workdir:
        raise GuestError(f"cwd {workdir} contains a comma, which hostfs mount options cannot carry")
    for tool in ("taskset",):
        if shutil.which(tool) is None:
            raise GuestError(f"{tool} not found on the host (package util-linux)")
    ensure_packages(RUNTIME_PACKAGES)
    return ensure_kernel()


def prepare_guest(g, command, genv: dict, workdir: str, net=None) -> tuple[int, int]:
    """Fill a fresh guest temp dir (io files, stage scripts), open its console log and output
    pipes; returns the pipes' write ends (the guest's)."""
    io, tmp = g.io, g.tmp
    for d in (io / "rw", io / "root", tmp / "uml"):
        d.mkdir(parents=True)
    copy_stage_scripts(io, "stage1.sh", "stage2.sh")
    _write_guest_files(io, command, genv, workdir, net)
    g.log = open(g.console, "wb")  # noqa: SIM115 - the guest's console log, closed when it ends
    return g.open_pipes()


def uml_argv(kernel: pathlib.Path, cpu, mem: str, g, w_out: int, w_err: int) -> list[str]:
    """The UML command line for guest ``g`` (after :func:`prepare_guest`), pinned to ``cpu``."""
    return [
        "taskset", "-c", str(cpu),
        str(kernel),
        f"mem={mem}",
        f"uml_dir={g.tmp / 'uml'}",
        "rootfstype=hostfs", "rootflags=/", "ro",
        "quiet", "loglevel=4",
        f"init={g.io / 'stage1.sh'}",
        "con=null", "ssl=null",
        f"con0=null,fd:{g.log.fileno()}",
        f"con1=null,fd:{w_out}",
        f"con2=null,fd:{w_err}",
    ]  # fmt: skip


def run_uml(
    command,
    *,
    timeout: float,
    mem: str,
    workdir: str,
    env: dict | None,
    verbose: bool,
    disks: Sequence[str] = (),
    power_cut: PowerCut | None = None,
) -> int:
    """run(guest="uml"): boot the UML guest, run ``command``, return its exit status.

    ``disks`` are image files attached as block devices /dev/ubda, /dev/ubdb, ..."""
    for d in disks:
        if not os.path.isfile(d) or "," in d or "=" in d:
            raise GuestError(f"disk image {d!r} is not a file (or its path has a comma or '=')")
    kernel = check_host(workdir)
    genv = guest_env(env)

    cpu, cpu_lock = _pick_cpu()
    with guest_run("rdmakv-uml-", cpu_lock) as g:
        w_out, w_err = prepare_guest(g, command, genv, workdir)
        argv = uml_argv(kernel, cpu, mem, g, w_out, w_err)
        argv += [f"ubd{i}={os.path.realpath(d)}" for i, d in enumerate(disks)]
        rc = g.boot(
            argv,
            timeout=timeout,
            what="UML",
            power_cut=power_cut,
            pass_fds=(g.log.fileno(), w_out, w_err),
            cwd=g.tmp / "uml",  # a UML core dump (if any) lands in the temp dir
            env=uml_host_env(mem, g.tmp),
        )
        if verbose:
            g.log_timings(f"cpu {cpu}", read_float)
        return rc
