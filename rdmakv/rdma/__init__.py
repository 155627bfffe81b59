"""The verbs glue: device and caps, PD/MR, RC QPs, the READ requester, READ plans, the server's
exporter and the client's restorer. Only this package touches pyverbs, imported lazily."""

from .device import Device, DeviceCaps, list_devices, pyverbs_status
from .errors import RdmaError, RdmaUnavailable, ReadTimeout, WorkCompletionError
from .memory import MemoryRegion, ProtectionDomain
from .qp import QPInfo, Responder
from .requester import ReadOp, ReadStats, Requester, Sge

__all__ = [
    "Device",
    "DeviceCaps",
    "MemoryRegion",
    "ProtectionDomain",
    "QPInfo",
    "RdmaError",
    "RdmaUnavailable",
    "ReadOp",
    "ReadStats",
    "ReadTimeout",
    "Requester",
    "Responder",
    "Sge",
    "WorkCompletionError",
    "list_devices",
    "pyverbs_status",
]
