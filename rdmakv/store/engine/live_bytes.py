"""Which log bytes are live: per segment (the compactor's measure of garbage), in all (what the
disk tier holds against its budget) and per namespace (its share, for disk quotas). A record is
live while the index points at it: a chunk, a session's manifest or pin, a tombstone."""

from __future__ import annotations

from collections import Counter

from .index import Namespace
from .segment_log import Location


class LiveBytes:
    def __init__(self) -> None:
        self.by_segment: Counter[int] = Counter()
        self.total = 0

    def live(self, ns: Namespace, loc: Location) -> None:
        self.by_segment[loc.segment] += loc.size
        self.total += loc.size
        ns.disk_live += loc.size

    def live_many(self, ns: Namespace, locs: list[Location]) -> None:
        """``live`` for the records of one batch (one update per segment, not per record)."""
        by_segment: dict[int, int] = {}
        for loc in locs:
            by_segment[loc.segment] = by_segment.get(loc.segment, 0) + loc.size
        total = 0
        for segment, size in by_segment.items():
            self.by_segment[segment] += size
            total += size
        self.total += total
        ns.disk_live += total

    def dead(self, ns: Namespace, loc: Location) -> None:
        self.by_segment[loc.segment] -= loc.size
        self.total -= loc.size
        ns.disk_live -= loc.size

    def moved(self, old: Location, new: Location) -> None:
        """Compaction copied a live record: its bytes count in the new segment."""
        self.by_segment[old.segment] -= old.size
        self.by_segment[new.segment] += new.size

    def fraction(self, segment: int, size: int) -> float:
        return self.by_segment.get(segment, 0) / size

    def forget(self, segment: int) -> int:
        """The segment is gone: what it still counted as live (0 unless the accounting is off)."""
        return self.by_segment.pop(segment, 0)
