"""pyverbs loading, device discovery and capabilities.

pyverbs is imported lazily (``load_pyverbs``): importing this package never needs it, so pure
code and hosts without RDMA keep working. Over hostfs in the UML guest the first
``import pyverbs`` alone takes seconds, so nobody should pay it by accident. ``Device.open``
opens one ibv context per device per process and queries its caps up front; everything else
in this package creates its verbs resources from that context.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib
import os
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import RdmaError, RdmaUnavailable

# --------------------------------------------------------------------------- pyverbs loading

_pv: Pyverbs | None = None
_pv_error: str | None = None
_pv_lock = threading.Lock()


class Pyverbs:
    """The pyverbs modules we use, resolved once."""

    def __init__(self) -> None:
        try:
            self.e = importlib.import_module("pyverbs.enums")
        except ImportError:
            # rdma-core >= 59 (e.g. the PyPI sdist) renamed the module.
            self.e = importlib.import_module("pyverbs.libibverbs_enums")
        self.device = importlib.import_module("pyverbs.device")
        self.pd = importlib.import_module("pyverbs.pd")
        self.mr = importlib.import_module("pyverbs.mr")
        self.cq = importlib.import_module("pyverbs.cq")
        self.qp = importlib.import_module("pyverbs.qp")
        self.wr = importlib.import_module("pyverbs.wr")
        self.addr = importlib.import_module("pyverbs.addr")
        self.err = importlib.import_module("pyverbs.pyverbs_error")
        e = self.e
        self.wc_names = {
            int(v): n for n, v in vars(e).items() if n.startswith("IBV_WC_") and type(v) is type(e.IBV_WC_SUCCESS)
        }
        self.version = getattr(importlib.import_module("pyverbs"), "__version__", "")


def load_pyverbs() -> Pyverbs:
    global _pv, _pv_error
    if _pv is not None:
        return _pv
    with _pv_lock:
        if _pv is None and _pv_error is None:
            try:
                _pv = Pyverbs()
            except ImportError as exc:
                _pv_error = (
                    f"pyverbs is not importable ({exc}); install Debian's "
                    "python3-pyverbs and use a venv made with --system-site-packages"
                )
            except Exception as exc:  # noqa: BLE001 - a broken build raises odd things (ABI mismatch)
                _pv_error = f"pyverbs failed to load: {type(exc).__name__}: {exc}"
    if _pv is None:
        raise RdmaUnavailable(_pv_error or "pyverbs failed to load")
    return _pv


def pyverbs_status() -> tuple[bool, str]:
    """(usable, explanation). Only checks that pyverbs imports, not that a device exists."""
    try:
        pv = load_pyverbs()
    except RdmaUnavailable as exc:
        return False, str(exc)
    return True, f"pyverbs {pv.version or '(unknown version)'} ({pv.e.__name__})"


def errno_text(exc: BaseException) -> str:
    code = getattr(exc, "error_code", None)
    if code:
        return f"{exc} [{errno.errorcode.get(code, code)}]"
    return str(exc)


# --------------------------------------------------------------------------- devices

DEVICE_ENV = "RDMAKV_RDMA_DEVICE"  # names the device to use when a host has several


def rdma_here() -> tuple[bool, str]:
    """Whether this host can do RDMA at all (pyverbs and a device), without opening anything;
    (False, why not) otherwise."""
    ok, why = pyverbs_status()
    if not ok:
        return False, why
    if not list_devices():
        return False, "no RDMA device on this host"
    return True, ""


def probe_device() -> tuple[Device | None, str]:
    """The one device probe, for the server's exporter and the client's restorer alike: the
    device ``RDMAKV_RDMA_DEVICE`` names (else the first one), or (None, why there is none)."""
    ok, why = pyverbs_status()
    if not ok:
        return None, why  # already says "pyverbs is not importable (...)"
    if not list_devices():
        return None, "no RDMA device on this host"
    try:
        return Device.open(os.environ.get(DEVICE_ENV) or None), ""
    except RdmaError as e:
        return None, str(e)


def list_devices() -> list[str]:
    """Names of the RDMA devices the kernel exposes (empty when there are none)."""
    pv = load_pyverbs()
    try:
        return [dev.name.decode() for dev in pv.device.get_device_list()]
    except pv.err.PyverbsError:
        # ibv_get_device_list() returns NULL when the kernel has no uverbs at all.
        return []


MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
_PORT_ACTIVE = 4
_LINK_ETHERNET = 2
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


@dataclass(frozen=True)
class DeviceCaps:
    """What the device and the chosen port allow, as queried at open time."""

    name: str
    port: int
    gid_index: int
    gid: bytes  # 16 raw bytes, network order
    link_layer: int  # IBV_LINK_LAYER_*; Ethernet (RoCE) needs a GRH on every path
    lid: int
    active_mtu: int  # IBV_MTU_* enum value (1..5)
    mtu_bytes: int
    max_msg_sz: int
    max_sge: int
    max_sge_rd: int  # some HCAs take fewer SGEs on READ than on SEND; 0 = not reported
    max_qp_rd_atom: int  # READs this device answers at once per QP (responder resources)
    max_qp_init_rd_atom: int  # READs this device keeps outstanding per QP (initiator depth)
    max_qp_wr: int
    max_mr_size: int
    max_cqe: int

    @property
    def read_sge_limit(self) -> int:
        """Most SGEs one READ WR may scatter into on this device."""
        return min(self.max_sge, self.max_sge_rd) if self.max_sge_rd else self.max_sge

    @property
    def is_roce(self) -> bool:
        return self.link_layer == _LINK_ETHERNET


def _gid_to_bytes(gid_str: str) -> bytes:
    return bytes.fromhex(gid_str.replace(":", ""))


def gid_from_bytes(pv: Pyverbs, raw: bytes) -> Any:
    h = raw.hex()
    return pv.addr.GID(":".join(h[i : i + 4] for i in range(0, 32, 4)))


def _gid_score(raw: bytes, roce_v2: bool, ethernet: bool) -> int:
    """Preference among GIDs; 0 = unusable."""
    if not any(raw[8:]):
        return 0
    if not ethernet:
        return 1
    # RoCE v2 over IPv4 is routable and is what rxe on an IPv4 netdev gives; v1 and the
    # link-local v2 entries still work on one L2 segment, so keep them as fallbacks.
    if roce_v2:
        return 3 if raw.startswith(_V4_MAPPED_PREFIX) else 2
    return 1


class Device:
    """An opened RDMA device (ibv context) and its caps; ``Device.open`` caches per process."""

    _cache: ClassVar[dict[str | None, Device]] = {}
    _cache_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, ctx: Any, caps: DeviceCaps) -> None:
        self._ctx = ctx
        self.caps = caps
        self._closed = False

    @classmethod
    def open(cls, name: str | None = None) -> Device:
        """Open ``name`` (or the first device with an ACTIVE port) once per process.

        The port and GID chosen are the first ACTIVE port with the best GID: a RoCE v2
        IPv4-mapped GID when there is one.
        """
        with cls._cache_lock:
            dev = cls._cache.get(name)
            if dev is not None and not dev._closed:
                return dev
            dev = cls._open_uncached(name)
            cls._cache[name] = dev
            cls._cache[dev.caps.name] = dev
            return dev

    @classmethod
    def _open_uncached(cls, name: str | None) -> Device:
        pv = load_pyverbs()
        names = list_devices()
        if not names:
            raise RdmaUnavailable(
                "no RDMA devices: the kernel exposes none (no /sys/class/infiniband entries; "
                "is ib_uverbs loaded and an rxe link added, e.g. `rdma link add rxe0 type rxe "
                "netdev IFACE`?)"
            )
        if name is not None and name not in names:
            raise RdmaUnavailable(f"RDMA device {name!r} not found; devices: {', '.join(names)}")
        reasons = []
        for cand in [name] if name is not None else names:
            try:
                ctx = pv.device.Context(name=cand)
            except pv.err.PyverbsError as exc:
                reasons.append(f"{cand}: cannot open ({errno_text(exc)})")
                continue
            try:
                caps = cls._pick_port(pv, ctx, cand)
            except RdmaUnavailable as exc:
                ctx.close()
                reasons.append(str(exc))
                continue
            return cls(ctx, caps)
        raise RdmaUnavailable("no usable RDMA port: " + "; ".join(reasons))

    @staticmethod
    def _pick_port(pv: Pyverbs, ctx: Any, name: str) -> DeviceCaps:
        e = pv.e
        attr = ctx.query_device()
        why = []
        for port in range(1, attr.phys_port_cnt + 1):
            pattr = ctx.query_port(port)
            if pattr.state != _PORT_ACTIVE:
                why.append(f"port {port} is {pv.device.port_state_to_str(pattr.state)}")
                continue
            ethernet = pattr.link_layer == _LINK_ETHERNET
            best: tuple[int, int, bytes] | None = None  # (score, index, gid)
            try:
                # One ioctl for the whole table; rxe's table has 1024 slots and per-index
                # queries go through sysfs (several syscalls each, ~15 us apiece in UML).
                entries = ctx.query_gid_table(max(1, pattr.gid_tbl_len) * attr.phys_port_cnt)
                for ent in entries:
                    if ent.port_num != port:
                        continue
                    raw = _gid_to_bytes(ent.gid_str())
                    score = _gid_score(raw, ent.gid_type == e.IBV_GID_TYPE_ROCE_V2, ethernet)
                    if score and (best is None or score > best[0]):
                        best = (score, ent.gid_index, raw)
            except (pv.err.PyverbsError, AttributeError):
                for idx in range(pattr.gid_tbl_len):
                    try:
                        raw = _gid_to_bytes(ctx.query_gid(port, idx).gid)
                        v2 = ethernet and ctx.query_gid_type(port, idx) == e.IBV_GID_TYPE_SYSFS_ROCE_V2
                    except pv.err.PyverbsError:
                        continue
                    score = _gid_score(raw, v2, ethernet)
                    if score and (best is None or score > best[0]):
                        best = (score, idx, raw)
                    if score == 3:
                        break
            if best is None:
                if ethernet:
                    why.append(
                        f"port {port} is ACTIVE but has no GID (RoCE needs an IP "
                        "address on the netdev under the rxe link)"
                    )
                    continue
                best = (1, 0, bytes(16))  # InfiniBand addresses by LID; the GID is unused
            mtu = int(pattr.active_mtu)
            return DeviceCaps(
                name=name,
                port=port,
                gid_index=best[1],
                gid=best[2],
                link_layer=int(pattr.link_layer),
                lid=int(pattr.lid),
                active_mtu=mtu,
                mtu_bytes=MTU_BYTES.get(mtu, 0),
                max_msg_sz=int(pattr.max_msg_sz),
                max_sge=int(attr.max_sge),
                max_sge_rd=int(attr.max_sge_rd),
                max_qp_rd_atom=int(attr.max_qp_rd_atom),
                max_qp_init_rd_atom=int(attr.max_qp_init_rd_atom),
                max_qp_wr=int(attr.max_qp_wr),
                max_mr_size=int(attr.max_mr_size),
                max_cqe=int(attr.max_cqe),
            )
        raise RdmaUnavailable(f"{name}: " + ("; ".join(why) or "no ports"))

    @property
    def context(self) -> Any:
        """The pyverbs Context (for this package's modules; others should not need it)."""
        if self._closed:
            raise RdmaError(f"device {self.caps.name} is closed")
        return self._ctx


    def close(self) -> None:
        """Close the context and, through pyverbs, everything still open under it.

        Only for tests and process teardown: the object is shared per process.
        """
        if self._closed:
            return
        self._closed = True
        with Device._cache_lock:
            for key in [k for k, v in Device._cache.items() if v is self]:
                del Device._cache[key]
        self._ctx.close()


@atexit.register
def _close_devices() -> None:
    # Left to interpreter finalization, pyverbs tears contexts down after the modules it
    # needs are gone and prints "Error in sys.excepthook". Close them while Python is whole.
    for dev in list(Device._cache.values()):
        with contextlib.suppress(Exception):
            dev.close()
