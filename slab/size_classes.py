"""Slot size classes: four steps per power of two, multiples of 64 bytes.

Four steps bound internal waste to 25 % while power-of-two chunk sizes (the
common case: W and row sizes are powers of two) land in a class exactly, which
keeps a run of equal chunks back-to-back in memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

ALIGN = 64


def class_size(length: int) -> int:
    """Smallest class size that holds ``length`` bytes."""
    if length <= 0:
        raise ValueError(f"chunk length must be positive, got {length}")
    if length <= 4 * ALIGN:
        return -(-length // ALIGN) * ALIGN
    top = 1 << (length - 1).bit_length()  # next power of two >= length
    step = top // 8  # classes top/2 + k*step for k = 1..4
    size = -(-length // step) * step
    return -(-size // ALIGN) * ALIGN


def total_class_size(lengths: Iterable[int]) -> int:
    """The sum of ``class_size`` over ``lengths``, each distinct length sized once (a save's
    chunks have a handful of lengths)."""
    return sum(class_size(int(n)) * count for n, count in Counter(lengths).items())
