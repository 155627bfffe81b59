"""The verbs glue: device and caps, PD/MR, RC QPs, the READ requester, READ plans and the
client's restorer (the server's exporter builds on it from rdmakv.store.server). Only this
package touches pyverbs, imported lazily."""

from .device import Device, DeviceCaps, list_devices, probe_device, pyverbs_status, rdma_here
from .errors import RdmaError, RdmaUnavailable, ReadTimeout, WorkCompletionError
from .memory import MemoryRegion, ProtectionDomain, alloc_pd
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
    "alloc_pd",
    "list_devices",
    "probe_device",
    "pyverbs_status",
    "rdma_here",
]
