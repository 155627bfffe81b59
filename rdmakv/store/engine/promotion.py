"""Promotion (docs/data-model.md §4): a demoted session's chunks and manifest read back from
the log into fresh slab slots, each chunk checked against its key, without the engine lock held
across the reads. Also a session's manifest read straight from its log record."""

from __future__ import annotations

import threading

from ...errors import BusyError, StorageError, StoreFullError
from ...hashing import key_hex, verified
from .index import Chunk, Namespace, Session
from .records import decode_header, payload_ok
from .segment_log import SegmentLog
from .tiering import Tiers


class Promotion:
    """Brings sessions back into memory; one promotion at a time (``promote_lock``), so two
    restores of the same demoted session do not both read it."""

    def __init__(self, lock: threading.RLock, tiers: Tiers, log: SegmentLog) -> None:
        self.lock = lock
        self.tiers = tiers
        self.log = log
        self.promote_lock = threading.Lock()

    def promote(self, ns: Namespace, s: Session) -> bool:
        """Bring a session's chunks (and manifest) back into memory. Engine lock NOT held on entry.
        Returns False when there is no room for it (then it is served from disk)."""
        with self.promote_lock:
            with self.lock:
                if s.dead or s.complete:
                    return s.complete
                self.tiers.claim(ns, s)
                todo = [ns.chunks[k] for k in s.unique_keys() if ns.chunks[k].slot is None]
                need_manifest = s.manifest_len if s.data is None else 0
                try:
                    if need_manifest:
                        self.tiers.make_room(ns, need_manifest, protect=s)
                    slots = self.tiers.alloc_run(ns, [c.length for c in todo], protect=s) if todo else []
                except (StoreFullError, BusyError):  # no room now (pinned, or saves in flight hold it)
                    return False
                for c, slot in zip(todo, slots):
                    c.slot, c.ready = slot, False
                    c.holds += 1
                reads = [(c, ns.slab.view(slot), self.log.segment(c.loc.segment).acquire(), c.loc.body)
                         for c, slot in zip(todo, slots)]  # fmt: skip
            failed: list[Chunk] = []
            data = None
            try:
                for c, view, seg, offset in reads:
                    seg.pread_into(offset, view)
                    if not verified(c.key, view, c.check):
                        failed.append(c)
                if need_manifest:
                    data = self.read_manifest(s)
            finally:
                for _, _, seg, _ in reads:
                    seg.release()
                reads.clear()
                with self.lock:
                    for c in todo:
                        c.ready = True
                        if c in failed:
                            self.tiers.drop_slot(ns, c)
                        self.tiers.unhold(ns, c)
                    if data is not None and s.data is None and not s.dead:
                        self.tiers.charge_manifest(ns, s, data)
                    ns.counters["promotions"] += 1
                    ns.counters["promoted_chunks"] += len(todo)
                    s.complete = not failed and s.resident and not s.dead and all(
                        ns.chunks[k].slot is not None for k in s.unique_keys()
                    )
                    self.tiers.cache_locations(ns, s, None)
            if failed:
                raise StorageError(
                    f"session {s.name!r}: {len(failed)} chunks read back from the log do not match their "
                    f"keys (first {key_hex(failed[0].key)}); the data dir is damaged"
                )
            return s.complete

    def read_manifest(self, s: Session) -> bytes:
        """A session's manifest bytes from its log record (the record's checksum is checked)."""
        with self.lock:  # the compactor may move the record: learn where it is and pin that file
            loc = s.loc
            seg = self.log.segment(loc.segment).acquire()
        try:
            raw = bytearray(loc.size)
            seg.pread_into(loc.offset, memoryview(raw))
        finally:
            seg.release()
        h = decode_header(raw)
        if h is None or not payload_ok(h, memoryview(raw)[h.size :]):
            raise StorageError(f"the log record of session {s.name!r} is damaged")
        return bytes(memoryview(raw)[loc.body_offset :])
