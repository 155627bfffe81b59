"""Host side of the guest harness: its error, packages, cache directories and host facts."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import subprocess
import sys

GUEST_DIR = pathlib.Path(__file__).resolve().parent

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

#: cli() exit status when the harness itself fails (not the command).
HARNESS_FAILURE = 125

PREFIX = "rdmakv rxe-vm"


class GuestError(RuntimeError):
    """The guest could not be prepared, booted, or did not report the command's status."""


def log_step(msg: str) -> None:
    print(f"{PREFIX}: {msg}", file=sys.stderr, flush=True)


def host_has_rdma() -> bool:
    """True when this kernel already exposes an RDMA device (then no guest is needed)."""
    d = pathlib.Path("/sys/class/infiniband")
    try:
        return any(d.iterdir())
    except OSError:
        return False


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
    log_step(f"installing missing packages: {' '.join(missing)}")
    apt_env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *missing]):
        # apt's chatter goes to stderr so that our stdout stays the command's stdout.
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=2, env=apt_env)
        if r.returncode != 0:
            raise GuestError(f"`{' '.join(argv)}` failed with status {r.returncode}")
    still = _missing_packages(missing)
    if still:
        raise GuestError(f"packages still missing after apt-get install: {' '.join(still)}")


def sbin_tool(name: str) -> str:
    """A tool from /sbin or /usr/sbin (often not on a normal user's PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise GuestError(f"{name} not found on the host (package kmod)")
    return found


# --------------------------------------------------------------------------------------------
# Cache directories


def writable_dir(path: pathlib.Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


@contextlib.contextmanager
def builder_lock(path: pathlib.Path, waiting: str):
    """Hold the exclusive flock of a cache builder's lock file ``path``. When another process
    holds it, log "waiting for another process ``waiting``" and wait; then yields True (that
    process has just built or fetched what it guards), else False."""
    with open(path, "w") as lock:
        waited = False
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log_step(f"waiting for another process {waiting}")
            fcntl.flock(lock, fcntl.LOCK_EX)
            waited = True
        yield waited


def cache_root() -> pathlib.Path:
    """$RDMAKV_CACHE, else /var/cache/rdmakv when writable, else ~/.cache/rdmakv."""
    env = os.environ.get("RDMAKV_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    system = pathlib.Path("/var/cache/rdmakv")
    if writable_dir(system):
        return system
    return pathlib.Path.home() / ".cache" / "rdmakv"


def cache_roots() -> list[pathlib.Path]:
    roots = [cache_root()]
    if not os.environ.get("RDMAKV_CACHE") and pathlib.Path("/var/cache/rdmakv") not in roots:
        roots.append(pathlib.Path("/var/cache/rdmakv"))  # what a root run prepared, read-only
    return roots
