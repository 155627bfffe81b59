"""Online log compaction (docs/data-model.md §4).

A background thread rewrites sealed segments whose live fraction has fallen below the
threshold (default 50%): it copies their live records, byte for byte, into a new file,
fsyncs it, renames it into place and fsyncs the directory, repoints the index at the copies
and then removes the old segment. The engine lock is taken per record (is it live?) and once
to repoint, never across a copy or an fsync. Because replay keeps the highest sequence number
per name, the log replays to the same state whatever point a crash interrupts this at.

Deleted and evicted sessions, their chunks and their token ids are gone from disk once the
segments that held them are compacted; ``full_pass`` (``rdmakv compact``) seals the open
segment and compacts everything that has any garbage.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from ...errors import DiskFullError, RdmakvError
from . import records as rec
from .datadir import Reserve
from .index import Namespace
from .live_bytes import LiveBytes
from .segment_log import Location, SegmentLog, SegmentWriter

POLL_S = 2.0


class CompactionHost(Protocol):
    """What compaction needs of the store: its lock, log and index, which bytes are live, the
    disk reserve, the room the filesystem has, and its log of events."""

    lock: threading.RLock
    log: SegmentLog
    namespaces: dict[str, Namespace]
    live: LiveBytes
    reserve: Reserve
    say: Callable[[str], None]

    def fs_room(self) -> int: ...


class Compactor:
    def __init__(self, engine: CompactionHost, threshold: float = 0.5) -> None:
        self.engine = engine
        self.threshold = threshold
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pass_lock = threading.Lock()  # the background thread and `rdmakv compact` take turns
        self._thread: threading.Thread | None = None
        self.totals: Counter[str] = Counter()

    # -- thread -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="rdmakv-compactor")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                with self._pass_lock:
                    self._seal_if_mostly_garbage()
                    for sid in self.candidates(self.threshold):
                        if self._stop.is_set():
                            return
                        self.compact_segment(sid)
            except RdmakvError as e:
                self.engine.say(f"rdmakv: compaction paused: {e}")
            except Exception as e:  # noqa: BLE001 - a bug here must not end the server
                self.engine.say(f"rdmakv: compaction failed: {e!r}")

    def _seal_if_mostly_garbage(self) -> None:
        """The open segment is never compacted while appends go to it: in a small store most
        garbage can sit there, so seal it once it is big enough and mostly garbage."""
        e = self.engine
        with e.lock:
            sid = e.log.active_id
            seg = e.log.segments.get(sid) if sid is not None else None
            if sid is None or seg is None or seg.size < min(e.log.segment_bytes // 4, 4 << 20):
                return
            if e.live.fraction(sid, seg.size) >= self.threshold:
                return
        e.log.rotate()

    # -- passes -----------------------------------------------------------------------------
    def candidates(self, below: float) -> list[int]:
        """Sealed segments whose live fraction is below ``below``, emptiest first."""
        e = self.engine
        with e.lock:
            active = e.log.active_id
            out = []
            for sid, seg in e.log.segments.items():
                if sid == active or seg.size == 0:
                    continue
                frac = e.live.fraction(sid, seg.size)
                if frac < below:
                    out.append((frac, sid))
        return [sid for _, sid in sorted(out)]

    def full_pass(self) -> dict[str, float]:
        """Compact everything with garbage, the open segment included."""
        e = self.engine
        t0 = time.perf_counter()
        before = e.log.disk_bytes()
        with self._pass_lock:
            e.log.rotate()
            done = 0
            for _ in range(3):  # a later round drops tombstones an earlier one made redundant
                sids = self.candidates(1.0)
                if not sids:
                    break
                for sid in sids:
                    self.compact_segment(sid)
                    done += 1
        return {
            "segments_compacted": done,
            "disk_bytes_before": before,
            "disk_bytes_after": e.log.disk_bytes(),
            "live_bytes": e.live.total,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    def make_room(self, nbytes: int) -> None:
        """Compact, emptiest segments first (the open one too, if it has to be), until the
        filesystem takes ``nbytes`` more. Called by a save that needs the room, without locks."""
        e = self.engine
        with self._pass_lock:
            for rotated in (False, True):
                if rotated:
                    e.log.rotate()
                for sid in self.candidates(1.0):
                    if e.log.disk_bytes() + nbytes <= e.fs_room():
                        return
                    self.compact_segment(sid)
                if e.log.disk_bytes() + nbytes <= e.fs_room():
                    return

    def compact_segment(self, sid: int) -> None:
        e = self.engine
        log = e.log
        size = log.segment(sid).size
        writer = log.new_segment_writer()
        moves: list[tuple[rec.Record, Location, int]] = []
        dead_manifests: Counter[tuple[str, str]] = Counter()
        try:
            for r, loc, raw in log.scan(sid):
                with e.lock:
                    live = self._is_live(r, loc)
                    if not live and r.rtype == rec.REC_MANIFEST:
                        dead_manifests[(r.ns, r.name)] += 1
                if live:
                    moves.append((r, loc, self._write(writer, raw)))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        new_id = None
        if moves:
            new_id = log.install(writer).id
        else:
            writer.abort()
        with e.lock:
            for r, loc, offset in moves:
                assert new_id is not None  # (installed: there are moves)
                self._repoint(r, loc, Location(new_id, offset, loc.size, loc.body_offset))
            for (ns_name, name), n in dead_manifests.items():
                self._forget_manifests(ns_name, name, n)
        log.remove(sid)
        with e.lock:
            leftover = e.live.forget(sid)
        if leftover:
            e.say(f"rdmakv: compaction accounting: {leftover} live bytes left in removed segment {sid}")
        self.totals["segments"] += 1
        self.totals["bytes_copied"] += sum(loc.size for _, loc, _ in moves)
        self.totals["bytes_freed"] += size - sum(loc.size for _, loc, _ in moves)

    def _write(self, writer: SegmentWriter, raw: memoryview) -> int:
        try:
            return writer.write(raw)
        except DiskFullError:
            if not self.engine.reserve.give_up():
                raise
            self.engine.say("rdmakv: disk full: gave up the reserve so that compaction can free space")
            return writer.write(raw)

    # -- liveness ---------------------------------------------------------------------------
    def _is_live(self, r: rec.Record, loc: Location) -> bool:
        ns = self.engine.namespaces.get(r.ns)
        if ns is None:
            return False
        if r.rtype == rec.REC_CHUNK:
            c = ns.chunks.get(r.key)
            return c is not None and c.loc == loc
        if r.rtype == rec.REC_MANIFEST:
            s = ns.sessions.get(r.name)
            return s is not None and s.loc == loc
        if r.rtype == rec.REC_DELETE:
            t = ns.tombstones.get(r.name)
            return t is not None and t.loc == loc
        if r.rtype == rec.REC_PIN:
            s = ns.sessions.get(r.name)
            return s is not None and s.pin_loc == loc
        return False

    def _repoint(self, r: rec.Record, old: Location, new: Location) -> None:
        """Point the index at the copy, if the record is still live where it was copied from."""
        e = self.engine
        if not self._is_live(r, old):
            return  # died meanwhile: its copy is garbage in the new segment
        ns = e.namespaces[r.ns]
        if r.rtype == rec.REC_CHUNK:
            ns.chunks[r.key].loc = new
        elif r.rtype == rec.REC_MANIFEST:
            ns.sessions[r.name].loc = new
        elif r.rtype == rec.REC_DELETE:
            ns.tombstones[r.name].loc = new
        elif r.rtype == rec.REC_PIN:
            ns.sessions[r.name].pin_loc = new
        e.live.moved(old, new)

    def _forget_manifests(self, ns_name: str, name: str, n: int) -> None:
        """Dead manifest records of a name left the disk; once none is left, its tombstone has
        nothing to outrank and is garbage too."""
        e = self.engine
        ns = e.namespaces[ns_name]
        ns.disk_records[name] -= n
        if ns.disk_records[name] <= 0:
            del ns.disk_records[name]
            tomb = ns.tombstones.pop(name, None)
            if tomb is not None:
                e.live.dead(ns, tomb.loc)
