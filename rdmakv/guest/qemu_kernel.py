"""A Debian kernel package extracted for the QEMU guest (its own module: the initramfs builder
and the QEMU runner both use it, and neither imports the other for it)."""

from __future__ import annotations

import pathlib


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
