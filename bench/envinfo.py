"""The environment a benchmark ran in: printed with every result."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata


def _pkg(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _deb(name: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "not installed"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def accel() -> str:
    guest = os.environ.get("RDMAKV_GUEST")
    if guest == "uml":
        return "UML guest (User-Mode Linux, 1 vCPU pinned to one host core)"
    if guest == "qemu":
        return "QEMU TCG guest (software emulation)"
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        if "User Mode Linux" in info:
            return "UML guest"
        if "hypervisor" in info:
            return "VM (hypervisor flag set)"
    except OSError:
        pass
    return "native"


def rdma_device() -> dict:
    try:
        from rdmakv import rdma

        ok, why = rdma.pyverbs_status()
        if not ok:
            return {"available": False, "reason": why}
        if not rdma.list_devices():
            return {"available": False, "reason": "no RDMA device"}
        caps = rdma.Device.open(os.environ.get("RDMAKV_RDMA_DEVICE") or None).caps
        return {
            "available": True,
            "name": caps.name,
            "active_mtu_bytes": caps.mtu_bytes,
            "max_sge": caps.max_sge,
            "max_qp_rd_atom": caps.max_qp_rd_atom,
            "max_qp_wr": caps.max_qp_wr,
            "max_msg_sz": caps.max_msg_sz,
            "roce": caps.is_roce,
        }
    except Exception as e:  # noqa: BLE001 - environment probing must never fail the bench
        return {"available": False, "reason": str(e)}


def collect() -> dict:
    import numpy

    import rdmakv

    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "accel": accel(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "rdmakv": rdmakv.__version__,
        "packages": {
            "numpy": numpy.__version__,
            "xxhash": _pkg("xxhash"),
            "cryptography": _pkg("cryptography"),
            "rdma-core": _deb("rdma-core"),
            "python3-pyverbs": _deb("python3-pyverbs"),
            "perftest": _deb("perftest"),
        },
        "rdma": rdma_device(),
    }
