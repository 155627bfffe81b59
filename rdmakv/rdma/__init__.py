"""RDMA transport pieces. Only ``verbs`` touches pyverbs (imported lazily)."""

from rdmakv.rdma.requester import (
    Device,
    DeviceCaps,
    MemoryRegion,
    ProtectionDomain,
    QPInfo,
    RdmaError,
    RdmaUnavailable,
    ReadOp,
    ReadStats,
    ReadTimeout,
    Requester,
    Responder,
    Sge,
    WorkCompletionError,
    list_devices,
    pyverbs_status,
)

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
