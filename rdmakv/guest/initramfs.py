"""The QEMU guest's initramfs: busybox-static, the modules that reach the 9p root, and
qemu-init.sh as /init, written as an uncompressed newc cpio and cached per kernel."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
from typing import TYPE_CHECKING

from .host import GUEST_DIR, GuestError, cache_root, cache_roots, sbin_tool, writable_dir

if TYPE_CHECKING:
    from .qemu_kernel import QemuKernel

#: Modules the initramfs loads (plus their dependencies, in `modprobe --show-depends` order)
#: to reach the 9p root; everything else is modprobe'd by stage 2 from the shared module tree.
QEMU_INITRD_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
QEMU_INIT = "qemu-init.sh"  # the initramfs /init: part of the initramfs cache key
QEMU_BUSYBOX = pathlib.Path("/bin/busybox")  # busybox-static's binary


def _initrd_modules(kernel: QemuKernel) -> list[tuple[pathlib.Path, str]]:
    """(module file, parameters) for QEMU_INITRD_MODULES and their dependencies, load order."""
    modprobe = sbin_tool("modprobe")
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
    for root in cache_roots():
        if (root / name / "initrd.cpio").is_file():
            return root / name / "initrd.cpio"
    if not QEMU_BUSYBOX.is_file():
        raise GuestError(f"{QEMU_BUSYBOX} missing (package busybox-static)")
    d = cache_root() / name
    if not writable_dir(d):
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
