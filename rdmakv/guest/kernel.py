"""The UML guest kernel: built once from Debian's linux-source-6.1 with rxe compiled in, cached
under a key of its build inputs (uml.config, build-uml.sh)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import subprocess
import sys
import time

from ..progress import stages as progress_stages
from .host import GUEST_DIR, GuestError, builder_lock, cache_root, ensure_packages, log_step, writable_dir

KERNEL_INPUTS = ("uml.config", "build-uml.sh", "uml-xstate.patch")  # order matters for the cache key

#: Host packages needed to build the UML kernel.
BUILD_PACKAGES = (
    "build-essential",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "xz-utils",
    "patch",
    "linux-source-6.1",
)


def kernel_key() -> str:
    """16 hex chars identifying the kernel build inputs.

    Identical to ``cd rdmakv/guest && sha256sum uml.config build-uml.sh uml-xstate.patch | sha256sum | cut -c1-16``.
    """
    lines = "".join(
        f"{hashlib.sha256((GUEST_DIR / name).read_bytes()).hexdigest()}  {name}\n" for name in KERNEL_INPUTS
    )
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


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


# (how the traced command begins, the stage it starts), in build-uml.sh's order
BUILD_STAGES = (
    ("tar ", "extract the source"),
    ("patch ", "patch"),
    ("make -s ARCH=um x86_64_defconfig", "configure"),
    ("make -s ARCH=um -j", "compile (~4 min)"),
    ("install ", "install"),
)
_TRACE = re.compile(r"^\++rdmakv-trace (.*)$")


def build_stage(line: str) -> str | None:
    """The stage a line of build-uml.sh's xtrace starts, if any."""
    m = _TRACE.match(line.rstrip("\n"))
    if not m:
        return None
    return next((name for prefix, name in BUILD_STAGES if m.group(1).startswith(prefix)), None)


def _run_build(out: pathlib.Path) -> int:
    """build-uml.sh under xtrace: its stages drive a progress line (rdmakv.progress); everything
    it prints besides the trace goes to stderr as it comes."""
    env = {**os.environ, "PS4": "+rdmakv-trace "}
    proc = subprocess.Popen(["bash", "-x", str(GUEST_DIR / "build-uml.sh"), str(out)], stdin=subprocess.DEVNULL,
                            stdout=2, stderr=subprocess.PIPE, text=True, errors="replace", env=env)  # fmt: skip
    assert proc.stderr is not None
    with progress_stages("rdmakv rxe-vm: building the UML kernel", [n for _, n in BUILD_STAGES]) as enter:
        for line in proc.stderr:
            stage = build_stage(line)
            if stage is not None:
                enter(stage)
            elif not _TRACE.match(line):
                sys.stderr.write(line)
    return proc.wait()


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
    if not writable_dir(root):
        raise GuestError(f"UML kernel not cached and cache dir {root} is not writable (set RDMAKV_CACHE)")
    out = root / f"uml-{key}"
    kernel = out / "linux"
    with builder_lock(root / f"uml-{key}.lock", f"building the UML kernel into {out}") as waited:
        if waited:
            rebuild = False  # whoever held the lock just built it
        if kernel.is_file() and not rebuild:
            return kernel
        ensure_packages(BUILD_PACKAGES)
        log_step(f"building the UML guest kernel (rxe) into {out}; takes ~5 min on 2 cores")
        t0 = time.monotonic()
        # build-uml.sh replaces the kernel atomically (install + mv): a failed rebuild keeps the old one.
        rc = _run_build(out)
        if rc != 0 or not kernel.is_file():
            raise GuestError(f"UML kernel build failed (build-uml.sh status {rc})")
        log_step(f"UML kernel built in {time.monotonic() - t0:.0f} s: {kernel}")
        return kernel
