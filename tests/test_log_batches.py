"""The save path's batches: SegmentLog.append_many (the records of one PUT_CHUNKS or one RDMA
commit in few writevs) and the background writeback of ``--fsync manifest`` (same records, same
locations and the same failure behaviour as a loop of ``append``; commits still wait for their
own fsync), and the frame reader reusing its buffer between back-to-back frames."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from rdmakv.errors import DiskFullError, StorageError
from rdmakv.store.engine import log_batches
from rdmakv.store.engine import records as rec
from rdmakv.store.engine.segment_log import SegmentLog

from .conftest import exit_code_in_a_child


def _replayed(path) -> list[tuple[int, bytes]]:
    log = SegmentLog(path)
    out = []
    for r, loc in log.replay():
        raw = bytearray(loc.size)  # the whole record as it lies in its segment
        log.segment(loc.segment).pread_into(loc.offset, memoryview(raw))
        out.append((r.key, bytes(raw)[-len(r.body) :]))
    log.close()
    return out


def _records(n: int, size: int, base: int = 0) -> list[list]:
    return [rec.chunk_parts("ns", base + i, bytes([i % 251]) * (size + i)) for i in range(n)]


def test_append_many_is_a_loop_of_appends(tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    a, b = SegmentLog(one), SegmentLog(many)
    a.open_for_append()
    b.open_for_append()
    records = _records(700, 100)  # more buffers than one writev takes
    locs_a = [a.append(rec.REC_CHUNK, parts)[0] for parts in records]
    locs_b = b.append_many(rec.REC_CHUNK, records)
    assert locs_a == locs_b
    for loc, parts in zip(locs_b, records):
        dest = bytearray(memoryview(parts[-1]).nbytes)
        b.read_into(loc, memoryview(dest))
        assert bytes(dest) == bytes(parts[-1])
    a.close()
    b.close()
    assert [p.read_bytes() for p in sorted(one.glob("seg-*"))] == [p.read_bytes() for p in sorted(many.glob("seg-*"))]
    assert [k for k, _ in _replayed(many)] == list(range(700))


def test_append_many_rotates_segments_like_append(tmp_path):
    log = SegmentLog(tmp_path, segment_bytes=1 << 20)
    log.open_for_append()
    records = _records(40, 100_000)  # ~4 MB: four or five segments
    locs = log.append_many(rec.REC_CHUNK, records)
    log.close()
    assert len({loc.segment for loc in locs}) >= 4
    for loc in locs:  # no record crosses a segment's end
        assert loc.offset + loc.size <= max(1 << 20, loc.size)
    assert [k for k, _ in _replayed(tmp_path)] == list(range(40))


def test_a_failed_batch_is_truncated_away(tmp_path):
    """EFBIG in the middle of a batch (child process, RLIMIT_FSIZE): nothing of the failing write
    stays in the segment; the log takes appends afterwards and replays clean."""
    import resource

    def child() -> int:
        log = SegmentLog(tmp_path)
        log.open_for_append()
        log.append_many(rec.REC_CHUNK, _records(2, 1000))
        size0 = log._path(log.active_id).stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size0 + 3000, size0 + 3000))
        try:
            log.append_many(rec.REC_CHUNK, _records(5, 1000, base=10))
            code = 2
        except DiskFullError:
            size = log._path(log.active_id).stat().st_size
            log.append(rec.REC_CHUNK, rec.chunk_parts("ns", 99, b"c" * 500))
            code = 0 if size == size0 else 3
        log.close()
        return code

    assert exit_code_in_a_child(child) == 0
    assert [k for k, _ in _replayed(tmp_path)] == [0, 1, 99]


def test_large_batches_start_fsyncs_in_the_background(tmp_path, monkeypatch):
    monkeypatch.setattr(log_batches, "WRITEBACK_BYTES", 1 << 20)
    log = SegmentLog(tmp_path)
    log.open_for_append()
    before = log.fsyncs
    for i in range(4):
        log.append_many(rec.REC_CHUNK, _records(8, 200_000, base=100 * i))
    deadline = 100
    while log.fsyncs == before and deadline:  # the writeback thread's fsync, with no commit asking
        os.sched_yield()
        import time

        time.sleep(0.02)
        deadline -= 1
    assert log.fsyncs > before
    loc, lsn = log.append(rec.REC_CHUNK, rec.chunk_parts("ns", 7, b"x" * 10))
    log.sync_to(lsn)  # a commit still gets an fsync that covers its record
    assert log._synced >= lsn
    log.close()


def test_no_background_fsync_under_never_or_for_small_saves(tmp_path):
    never = SegmentLog(tmp_path / "never", fsync="never")
    never.open_for_append()
    never.append_many(rec.REC_CHUNK, _records(40, 1_000_000))
    small = SegmentLog(tmp_path / "small")
    small.open_for_append()
    base = small.fsyncs
    small.append_many(rec.REC_CHUNK, _records(4, 1000))
    assert never.fsyncs == 0 and small._flusher is None and small.fsyncs == base
    never.close()
    small.close()


def test_a_failed_background_fsync_acknowledges_nothing_more(tmp_path, monkeypatch):
    monkeypatch.setattr(log_batches, "WRITEBACK_BYTES", 1 << 20)
    log = SegmentLog(tmp_path)
    log.open_for_append()

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(log, "_fsync", broken_fsync)
    log.append_many(rec.REC_CHUNK, _records(8, 200_000))
    import time

    for _ in range(200):
        if log.broken:
            break
        time.sleep(0.02)
    assert log.broken and "background fsync" in log.broken
    try:
        _, lsn = log.append(rec.REC_CHUNK, rec.chunk_parts("ns", 1, b"y"))
        log.sync_to(lsn)
        raised = False
    except StorageError:
        raised = True
    assert raised
    monkeypatch.undo()
    log.close()


# -- the server's frame reader between back-to-back frames (a save's PUT_CHUNKS stream) ----------
def _stream(n: int, size: int):
    from rdmakv.wire.protocol import MAC_BLAKE3, FrameAuth, Op

    k1, k2 = bytes(range(32)), bytes(range(32, 64))
    tx, rx = FrameAuth(k1, k2, MAC_BLAKE3), FrameAuth(k2, k1, MAC_BLAKE3)
    payloads = [bytes([i]) * size for i in range(n)]
    frames = [b"".join(bytes(p) for p in tx.seal(Op.PUT_CHUNKS, 0, i, [pl])) for i, pl in enumerate(payloads)]
    return rx, payloads, b"".join(frames)


def _read(reader, stream: bytes, keep: list):
    """Feed ``stream`` as a socket would (what ``wanted`` asks for at a time); payloads kept in
    ``keep`` when it is a list, else dropped at once (as a served request drops them)."""
    got, pos = [], 0
    while pos < len(stream):
        view = reader.buffer()
        n = min(view.nbytes, len(stream) - pos)
        view[:n] = stream[pos : pos + n]
        view.release()
        reader.received(n)
        pos += n
        for f in reader.frames():
            got.append(bytes(f.payload))
            if keep is not None:
                keep.append(f.payload)
    return got


def test_back_to_back_frames_reuse_the_buffer_and_never_move_a_live_payload():
    from rdmakv.wire.frames import SMALL_BUFFER, FrameReader

    rx, payloads, stream = _stream(6, 300_000)
    reader = FrameReader(1 << 20, rx)
    assert _read(reader, stream, None) == payloads
    assert reader.capacity <= SMALL_BUFFER  # the stream is over: an idle connection keeps little

    rx, payloads, stream = _stream(6, 300_000)
    reader = FrameReader(1 << 20, rx)
    kept: list = []  # payloads still in use while more frames arrive: their bytes must not change
    assert _read(reader, stream, kept) == payloads
    assert [bytes(p) for p in kept] == payloads


def test_a_batch_of_chunk_records_is_each_chunks_record_and_any_buffer_type_logs_alike(tmp_path):
    import numpy as np

    keys = [7, 8, 9, b"\x01" * 32]
    bodies = [b"abc", memoryview(b"defg"), bytearray(b"hi"), np.arange(5, dtype=np.uint16)]
    checks = {b"\x01" * 32: None}
    batch = rec.chunk_records("ns", keys, bodies, checks)
    assert batch == [rec.chunk_parts("ns", k, b) for k, b in zip(keys, bodies)]
    one, many = SegmentLog(tmp_path / "one"), SegmentLog(tmp_path / "many")
    one.open_for_append()
    many.open_for_append()
    assert [one.append(rec.REC_CHUNK, parts)[0] for parts in batch] == many.append_many(rec.REC_CHUNK, batch)
    one.close()
    many.close()
    assert [p.read_bytes() for p in sorted((tmp_path / "one").glob("seg-*"))] == [
        p.read_bytes() for p in sorted((tmp_path / "many").glob("seg-*"))
    ]


@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 1 << 20)), max_size=40))
def test_a_batch_made_live_counts_as_its_records_one_by_one(records):
    from rdmakv.store.engine.index import Namespace
    from rdmakv.store.engine.live_bytes import LiveBytes
    from rdmakv.store.engine.log_files import Location
    from slab import CapacityBudget, Slab

    locs = [Location(segment, 0, size) for segment, size in records]
    one, many = LiveBytes(), LiveBytes()
    ns_one, ns_many = (Namespace("ns", Slab(CapacityBudget(1 << 20))) for _ in range(2))
    for loc in locs:
        one.live(ns_one, loc)
    many.live_many(ns_many, locs)
    assert (many.total, +many.by_segment, ns_many.disk_live) == (one.total, +one.by_segment, ns_one.disk_live)
