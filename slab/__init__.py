"""Registered-memory slab allocator (memory only, no sockets)."""

from .allocator import CapacityBudget, Region, Slab, SlabFullError, Slot
from .size_classes import class_size, total_class_size

__all__ = ["CapacityBudget", "Region", "Slab", "SlabFullError", "Slot", "class_size", "total_class_size"]
