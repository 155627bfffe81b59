"""The QEMU TCG guest: the fallback for machines where the UML kernel cannot be built."""

from __future__ import annotations

import contextlib
import fcntl
import lzma
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time
import zlib

from .host import (
    RUNTIME_PACKAGES,
    GuestError,
    builder_lock,
    cache_root,
    cache_roots,
    ensure_packages,
    log_step,
    sbin_tool,
    writable_dir,
)
from .initramfs import ensure_qemu_initrd
from .qemu_kernel import QemuKernel
from .runner import copy_stage_scripts, guest_env, guest_run, mem_bytes, write_run_files

# --------------------------------------------------------------------------------------------
# QEMU TCG guest (fallback for machines where the UML kernel cannot be built)
#
# Debian's stock kernel package is extracted (never installed) into the cache; a small
# initramfs (busybox-static + the 9p/virtio/overlay modules; qemu-init.sh) mounts the host root
# read-only over 9p with a tmpfs overlay and switch_roots into qemu-stage2.sh, which loads
# rdma_rxe and runs the command like stage2.sh does. Always TCG: /dev/kvm on these machines is
# a stub that hangs a guest kernel in its decompressor (docs/rdma-path.md §4).

#: Host packages the QEMU guest needs on top of RUNTIME_PACKAGES.
QEMU_PACKAGES = ("qemu-system-x86", "busybox-static", "kmod")
#: Debian meta package whose dependency names the stock kernel package we extract.
QEMU_KERNEL_META = "linux-image-amd64"
QEMU_STAGE2 = "qemu-stage2.sh"  # copied into the io dir per run, like stage2.sh
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


_QEMU_MARKER = ".rdmakv-kver"  # written last into an extracted kernel dir: it is complete


def cached_qemu_kernel() -> QemuKernel | None:
    """The newest complete extracted kernel in the cache, or None (never downloads).

    A cached kernel is used as long as it exists, so runs stay offline and reproducible;
    ``rdmakv rxe-vm --guest qemu --rebuild`` fetches the one linux-image-amd64 currently names.
    """
    best: tuple[float, QemuKernel] | None = None
    for root in cache_roots():
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
        log_step("apt-get update (to find the kernel package linux-image-amd64 depends on)")
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
    if not writable_dir(root):
        raise GuestError(f"QEMU guest kernel not cached and cache dir {root} is not writable (set RDMAKV_CACHE)")
    with builder_lock(root / "qemu-linux.lock", f"extracting the QEMU guest kernel into {root}") as waited:
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
        log_step(f"fetching {pkg} for the QEMU guest into {root} (download ~70 MB, extract ~400 MB)")
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
            depmod = [sbin_tool("depmod"), "-b", str(modules_base), kver]
            r = subprocess.run(depmod, stdin=subprocess.DEVNULL, stdout=2)
            if r.returncode != 0:
                raise GuestError(f"depmod -b {modules_base} {kver} failed (status {r.returncode})")
            if not _extract_vmlinux(k):
                log_step("could not extract an uncompressed PVH vmlinux; booting the bzImage (~5 s slower)")
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
            log_step(f"older QEMU guest kernels in {root} (unused now, removable): {' '.join(others)}")
        log_step(f"QEMU guest kernel {kver} ({version}) ready in {time.monotonic() - t0:.0f} s: {dest}")
        return QemuKernel(dest, kver)


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


def run_qemu(command, *, timeout: float, mem: str, workdir: str, env: dict | None, verbose: bool) -> int:
    """run(guest="qemu"): boot the QEMU TCG guest, run ``command``, return its exit status."""
    ensure_packages(RUNTIME_PACKAGES + QEMU_PACKAGES)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise GuestError("qemu-system-x86_64 not found on the host (package qemu-system-x86)")
    kernel, initrd = ensure_qemu_guest()
    genv = guest_env(env, "qemu")

    with guest_run("rdmakv-qemu-") as g:
        io = g.io
        io.mkdir()
        copy_stage_scripts(io, QEMU_STAGE2)
        write_run_files(io, command, genv, workdir)
        # O_APPEND: QEMU's own messages (stderr) and the guest serial console (chardev with
        # append=on) share this file without overwriting each other.
        g.log = open(g.console, "ab")  # noqa: SIM115 - the guest's console log, closed when it ends
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
            "-m", f"{max(256, mem_bytes(mem) >> 20)}M",
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
