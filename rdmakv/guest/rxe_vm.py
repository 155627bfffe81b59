"""Run a command inside a throw-away guest that has real soft-RoCE (rdma_rxe) device ``rxe0``.

The host kernel of our CI machines has no RDMA. A User-Mode Linux (UML) kernel built from
Debian's ``linux-source-6.1`` with rxe compiled in boots in well under a second and runs the
host's own userland (host root shared read-only over hostfs, a tmpfs overlay on top), so the
project's venv, pyverbs, perftest and tests are all available unchanged inside.

Inside the guest: ``lo`` up, a ``dummy`` netdev ``d0`` with 192.0.2.1/24 (a documentation
address; the guest has no network device to the host), ``rxe0`` on ``d0`` (checked
PORT_ACTIVE), ``ulimit -l unlimited``, fresh /proc /sys /dev, /tmp and /run on tmpfs, the
caller's cwd mounted read-write at the same path, and ``RDMAKV_IN_GUEST=1 RDMAKV_GUEST=uml``.

``run(..., nodes=2)`` / ``rdmakv rxe-vm --nodes 2`` boots two such UML guests at once, one per
host core, joined by an Ethernet link ``vec0`` (frames in UDP on the host's 127.0.0.1) with
rxe0 on it instead of d0: node 0 at 192.0.2.1/24, node 1 at 192.0.2.2/24, real RoCE between
two kernels. Both run the command, told their role by ``RDMAKV_NODE`` (0/1), ``RDMAKV_NODES``
and ``RDMAKV_NODE_ADDRS``; node 0's status is the run's (``rdmakv.guest.uml_pair``).

``run(..., guest="qemu")`` is the fallback for machines where that kernel cannot be built:
QEMU TCG (never KVM) boots Debian's stock kernel package, extracted into the same cache, with
the host root shared read-only over 9p; same guest setup, ``RDMAKV_GUEST=qemu``, ~10 s to
boot and everything 20-50x slower (``rdmakv.guest.qemu`` and docs/rdma-path.md §4).

Public API: :func:`run`, :func:`ensure_kernel`, :func:`host_has_rdma`, :func:`cli`,
:class:`GuestError`; helpers :func:`cache_root`, :func:`kernel_key`, :func:`cached_kernel`;
for the QEMU guest :func:`ensure_qemu_guest`, :func:`cached_qemu_kernel`.

The parts: ``host`` (packages, cache dirs, the error), ``kernel`` (the UML kernel build and
cache), ``runner`` (what both guests share: io files, output pipes, one boot), ``uml`` and
``qemu`` (the two guests), ``uml_pair`` (two linked UML guests), ``initramfs`` (the QEMU guest's
cpio).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
from collections.abc import Sequence

from .host import HARNESS_FAILURE, PREFIX, GuestError, cache_root, host_has_rdma
from .kernel import cached_kernel, ensure_kernel, kernel_key
from .qemu import cached_qemu_kernel, ensure_qemu_guest, run_qemu
from .runner import POWER_CUT, PowerCut, mem_bytes
from .uml import run_uml
from .uml_pair import NODE_ADDRS, run_uml_pair

__all__ = [
    "NODE_ADDRS",
    "POWER_CUT",
    "GuestError",
    "PowerCut",
    "cache_root",
    "cached_kernel",
    "cached_qemu_kernel",
    "cli",
    "ensure_kernel",
    "ensure_qemu_guest",
    "host_has_rdma",
    "kernel_key",
    "run",
]


def run(
    command: list[str],
    *,
    guest: str = "uml",
    timeout: float = 3000,
    mem: str = "3G",
    cwd: str | None = None,
    env: dict | None = None,
    verbose: bool | None = None,
    disks: Sequence[str] = (),
    power_cut: PowerCut | None = None,
    nodes: int = 1,
) -> int:
    """Boot a guest with ``rxe0`` up, run ``command`` in it, return the command's exit status.

    UML only: ``disks`` are image files attached as /dev/ubda, /dev/ubdb, ... (the command
    mounts them); ``power_cut`` kills the whole guest at a moment it names, and then run()
    returns POWER_CUT instead of a status.

    ``command`` runs with ``cwd`` (default: the current directory, mounted read-write from the
    host at the same path) and the caller's environment (:data:`PASS_ENV`, every ``RDMAKV_*``,
    then ``env``) plus ``RDMAKV_IN_GUEST=1`` and ``RDMAKV_GUEST=<guest>``. Its stdout and stderr
    are streamed live to ``sys.stdout`` / ``sys.stderr``. A status >= 128 means "killed by signal
    status-128" as in a shell. ``timeout`` bounds the whole boot+run+shutdown (seconds; kernel
    build and package installs are not counted). ``verbose`` (default: $RDMAKV_VM_VERBOSE) prints
    boot/run/shutdown timings to stderr. ``guest="qemu"`` uses the QEMU TCG fallback instead of
    UML (its one-time kernel download/extract is not counted in ``timeout`` either).

    ``nodes=2`` (UML only; no disks or power cuts) boots two guests at once, one per host core,
    joined by an Ethernet link (``vec0``: frames in UDP on the host's 127.0.0.1, or L2TPv3 with
    RDMAKV_GUEST_LINK=l2tpv3; see ``rdmakv.guest.uml_pair``) that rxe0 runs on, node i at
    ``NODE_ADDRS[i]`` (192.0.2.1, 192.0.2.2 /24). Both run ``command``, told their role by
    ``RDMAKV_NODE`` (0/1), ``RDMAKV_NODES=2`` and ``RDMAKV_NODE_ADDRS``. Node 1's output lines
    are prefixed ``[node1] ``. The result is node 0's status, unless node 1's command exits
    non-zero on its own (then a zero becomes node 1's status; it is reported on stderr either
    way); node 1 is killed 2 s after node 0 ends, which is no failure. ``timeout`` covers both
    guests.

    Raises :class:`GuestError` when the guest cannot be prepared (missing kernel or packages,
    rxe0 not ACTIVE, ...), dies without reporting a status, or times out.
    """
    if isinstance(command, (str, bytes)) or not command:
        raise ValueError("command must be a non-empty list of strings")
    if os.environ.get("RDMAKV_IN_GUEST"):
        raise GuestError("already inside the rxe guest (RDMAKV_IN_GUEST is set): run the command directly")
    if guest not in ("uml", "qemu"):
        raise GuestError(f"unknown guest {guest!r} (expected 'uml' or 'qemu')")
    if nodes not in (1, 2):
        raise ValueError(f"nodes must be 1 or 2, not {nodes!r}")
    if not re.fullmatch(r"[0-9]+[KMG]?", mem):
        raise GuestError(f"bad mem {mem!r} (expected e.g. 3G, 512M)")
    if verbose is None:
        verbose = os.environ.get("RDMAKV_VM_VERBOSE", "") not in ("", "0")
    workdir = os.path.realpath(cwd if cwd is not None else os.getcwd())
    if not os.path.isdir(workdir):
        raise GuestError(f"cwd {workdir} is not a directory")
    if guest == "uml" and (why := map_count_warning(mem)):
        print(f"{PREFIX}: {why}", file=sys.stderr, flush=True)
    if nodes == 2:
        if guest != "uml" or disks or power_cut:
            raise GuestError("two-node runs are for the UML guest only, without disks or power cuts")
        return run_uml_pair(command, timeout=timeout, mem=mem, workdir=workdir, env=env, verbose=verbose)
    if guest == "qemu":
        if disks or power_cut:
            raise GuestError("disks and power cuts are for the UML guest only")
        return run_qemu(command, timeout=timeout, mem=mem, workdir=workdir, env=env, verbose=verbose)
    return run_uml(
        command, timeout=timeout, mem=mem, workdir=workdir, env=env, verbose=verbose, disks=disks, power_cut=power_cut
    )


# --------------------------------------------------------------------------------------------
# CLI


def map_count_warning(mem: str, max_map_count: int | None = None) -> str | None:
    """Why a large guest process may die, if it may. UML maps a guest process's pages into its
    host process one mmap at a time (merged only where they happen to be adjacent), so a guest
    process holding more than about vm.max_map_count pages is SIGKILLed ("UML ran out of memory on
    the host side!" in the guest's dmesg) with most of the guest's RAM still free. The host's
    default, 65,530, is 256 MiB of pages: bench throughput at 16,384 tokens (a 201 MB session,
    its restore, the client's buffers) died of it in a 10G guest. Said only for a guest asked for
    more than 16 times that (4 GiB at the default): one meant for large processes."""
    if max_map_count is None:
        try:
            with open("/proc/sys/vm/max_map_count") as f:
                max_map_count = int(f.read())
        except (OSError, ValueError):
            return None
    if mem_bytes(mem) <= 16 * max_map_count * 4096:
        return None
    return (f"vm.max_map_count is {max_map_count}: a guest process using more than ~{max_map_count * 4096 >> 20} "
            f"MiB may be SIGKILLed (dmesg: 'UML ran out of memory on the host side'); with --mem {mem}, "
            "raise it first: sysctl -w vm.max_map_count=262144")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rdmakv rxe-vm",
        description=(
            "Run COMMAND inside a throw-away User-Mode Linux guest that has a real soft-RoCE "
            "device rxe0 (rdma_rxe on a dummy netdev d0, 192.0.2.1/24, PORT_ACTIVE). The host's "
            "root is shared read-only (writes go to a tmpfs overlay), the current directory is "
            "mounted read-write at the same path, and COMMAND runs there with the caller's "
            "environment plus RDMAKV_IN_GUEST=1. Its output is streamed live; its exit status "
            f"becomes ours. Harness failures exit with {HARNESS_FAILURE}. With --nodes 2, two such "
            "guests linked by vec0 (rxe0 on it) run COMMAND side by side."
        ),
        epilog="Examples: rdmakv rxe-vm -- ibv_devinfo -d rxe0; "
        "rdmakv rxe-vm --nodes 2 -- sh -c 'echo node $RDMAKV_NODE; ibv_devinfo -d rxe0 | grep state'",
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
        "--quiet", action="store_true",
        help="no progress line while the kernel builds (there is none anyway when stdout is not a terminal)",
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
        "--disk", action="append", default=[], metavar="IMAGE",
        help="attach an image file as a block device (UML: /dev/ubda, /dev/ubdb, ... in order); repeatable",
    )
    p.add_argument(
        "--power-cut-after", type=float, metavar="S",
        help="kill the whole guest S seconds after COMMAND starts (or after --power-cut-when appears): "
        "a power cut, its page cache lost; exits 137",
    )
    p.add_argument(
        "--power-cut-when", metavar="FILE",
        help="start the --power-cut-after clock when this file (in the shared cwd) appears",
    )
    p.add_argument(
        "--nodes", type=int, default=1, metavar="N",
        help="1 (default) or 2: with 2, boot two UML guests at once, one per host core, joined by "
        "a link vec0 (Ethernet frames in UDP on the host's 127.0.0.1; RDMAKV_GUEST_LINK=l2tpv3 "
        "for L2TPv3) with rxe0 on it, node 0 at "
        "192.0.2.1/24 and node 1 at 192.0.2.2/24. Both run COMMAND with RDMAKV_NODE=0|1, "
        "RDMAKV_NODES=2, RDMAKV_NODE_ADDRS=192.0.2.1,192.0.2.2; node 1's output lines are "
        "prefixed '[node1] '. The exit status is node 0's (or node 1's non-zero one if node 0 "
        "succeeded); node 1 is stopped 2 s after node 0 ends",
    )  # fmt: skip
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print boot / command / shutdown timings to stderr (same as RDMAKV_VM_VERBOSE=1)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...", help="the command to run in the guest")
    return p


def cli(argv: list[str]) -> int:
    """``rdmakv rxe-vm [--guest uml|qemu] [--nodes 1|2] [--timeout S] [--mem 3G] [--rebuild] -- COMMAND...``"""
    p = _parser()
    args = p.parse_args(argv)
    command = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        p.error("no COMMAND given (usage: rdmakv rxe-vm [options] -- COMMAND...)")
    if args.nodes not in (1, 2):
        p.error(f"--nodes must be 1 or 2, not {args.nodes}")
    if args.nodes == 2 and (args.guest != "uml" or args.disk or args.power_cut_after is not None):
        p.error("--nodes 2 needs --guest uml and no --disk / --power-cut-after")

    def _on_sigterm(signum, frame):
        raise SystemExit(128 + signum)  # unwinds run(): kills the guest, removes temp dirs

    with contextlib.suppress(ValueError):  # ValueError: not in the main thread
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.quiet:
            os.environ["RDMAKV_QUIET"] = "1"
        if args.rebuild and args.guest == "qemu":
            ensure_qemu_guest(rebuild=True)
        elif args.rebuild:
            ensure_kernel(rebuild=True)
        if args.power_cut_when and args.power_cut_after is None:
            p.error("--power-cut-when needs --power-cut-after")
        cut = PowerCut(args.power_cut_after, args.power_cut_when) if args.power_cut_after is not None else None
        rc = run(
            command, guest=args.guest, timeout=args.timeout, mem=args.mem, verbose=args.verbose or None,
            disks=args.disk, power_cut=cut, nodes=args.nodes,
        )  # fmt: skip
        return 137 if rc == POWER_CUT else rc
    except GuestError as e:
        msg = str(e)
        print(f"{PREFIX}: error: {msg}", file=sys.stderr, flush=True)
        return HARNESS_FAILURE
    except KeyboardInterrupt:
        print(f"{PREFIX}: interrupted; guest killed", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
