"""The durable log: torn tails are truncated, damage in the middle is skipped (and only that),
failed appends leave nothing behind, commits share fsyncs, one server per data dir."""

from __future__ import annotations

import os
import struct
import threading

import numpy as np
import pytest
import xxhash

from rdmakv import kvgen
from rdmakv.errors import DiskFullError
from rdmakv.store.engine import records as rec
from rdmakv.store.engine.core import Engine
from rdmakv.store.engine.datadir import DataDirInUse
from rdmakv.store.engine.segment_log import SegmentLog
from rdmakv.wire import chunking
from rdmakv.wire import manifest as mf

from .conftest import exit_code_in_a_child


def _kv(seed, n=50):
    return kvgen.generate(kvgen.token_stream(seed, n), kvgen.ModelShape("t", 2, 32, 32))


def _save(engine, ns, name, kv, w=16):
    m, chunks = chunking.split(kv, w)
    engine.put_chunks(ns, list(zip(m.keys.tolist(), chunks)))
    assert len(engine.commit_manifest(ns, name, m.encode())) == 0


def _restore(engine, ns, name):
    data, _, _ = engine.get_manifest(ns, name)
    m = mf.decode(data)
    layout = chunking.decode_layout(m)
    _, _, offsets = layout.chunk_table()
    buf = np.zeros(layout.total_bytes, np.uint8)
    _, chunks = engine.read_chunks_into(ns, m.keys.tolist(), bytearray())
    for chunk, off in zip(chunks, offsets.tolist()):
        buf[off : off + len(chunk)] = np.frombuffer(chunk, np.uint8)
    return chunking.assemble(layout, buf)


def _open(path, **kw):
    e = Engine(path, 64 << 20, **kw)
    e.open(background=False)
    return e


@pytest.mark.parametrize("cut", [1, 7, 30, 500])
def test_torn_tail_is_truncated_and_committed_data_survives(tmp_path, cut):
    e = _open(tmp_path)
    _save(e, "ns", "a", _kv(1))
    m2, chunks2 = chunking.split(_kv(2), 16)
    e.put_chunks("ns", list(zip(m2.keys.tolist(), chunks2)))  # chunks of a save that never commits
    e.close()
    seg = max(p for p in tmp_path.glob("seg-*.log") if p.stat().st_size)
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(size - cut)  # crash mid-record
    e2 = _open(tmp_path)
    assert _restore(e2, "ns", "a").equals(_kv(1))
    assert seg.stat().st_size < size - cut
    assert any("torn tail" in str(d) for d in e2.damage)
    _save(e2, "ns", "b", _kv(3))  # appending after the truncation works
    e2.close()
    e3 = _open(tmp_path)
    assert _restore(e3, "ns", "b").equals(_kv(3)) and _restore(e3, "ns", "a").equals(_kv(1))
    e3.close()


def _chunk_records(tmp_path, n):
    log = SegmentLog(tmp_path)
    log.open_for_append()
    locs = [log.append(rec.REC_CHUNK, rec.chunk_parts("ns", i, bytes([i]) * 1000))[0] for i in range(n)]
    log.close()
    return log._path(locs[0].segment), locs


def _replayed_keys(tmp_path):
    damage = []
    log = SegmentLog(tmp_path, on_damage=damage.append)
    keys = [r.key for r, _ in log.replay()]
    log.close()
    return keys, damage


def test_a_corrupt_payload_skips_that_record_only(tmp_path):
    seg, locs = _chunk_records(tmp_path, 5)
    data = bytearray(seg.read_bytes())
    data[locs[2].body + 500] ^= 0xFF
    seg.write_bytes(bytes(data))
    keys, damage = _replayed_keys(tmp_path)
    assert keys == [0, 1, 3, 4]
    assert len(damage) == 1 and damage[0].segment == seg.name and damage[0].offset == locs[2].offset
    assert "checksum" in damage[0].what and seg.stat().st_size == len(data)  # nothing truncated


def test_a_smashed_header_is_resynced_past(tmp_path):
    seg, locs = _chunk_records(tmp_path, 5)
    data = bytearray(seg.read_bytes())
    data[locs[1].offset : locs[1].offset + 30] = b"\x00" * 30  # header and the start of its payload
    seg.write_bytes(bytes(data))
    keys, damage = _replayed_keys(tmp_path)
    assert keys == [0, 2, 3, 4]
    assert damage[0].offset == locs[1].offset and damage[0].length == locs[1].size


def test_damage_in_a_sealed_segment_never_drops_later_segments(tmp_path):
    e = _open(tmp_path, segment_bytes=1 << 20)
    for i in range(6):
        _save(e, "ns", f"s{i}", _kv(i, 200))
        e.log.rotate()
    e.close()
    segs = sorted(p for p in tmp_path.glob("seg-*.log") if p.stat().st_size)
    data = bytearray(segs[1].read_bytes())
    data[len(data) // 3] ^= 0x5A
    segs[1].write_bytes(bytes(data))
    e2 = _open(tmp_path)
    assert all(p.exists() for p in segs)
    names = {r["name"] for r in e2.list("ns")}
    assert {"s0", "s2", "s3", "s4", "s5"} <= names  # everything outside the damage is back
    assert e2.damage and e2.damage[0].segment == segs[1].name
    for n in names:
        assert _restore(e2, "ns", n).equals(_kv(int(n[1:]), 200))
    e2.close()


def test_replaced_and_deleted_manifests_replay_to_the_final_state(tmp_path):
    e = _open(tmp_path, segment_bytes=1 << 20)
    _save(e, "ns", "x", _kv(1))
    _save(e, "ns", "x", _kv(2))
    _save(e, "ns", "y", _kv(3))
    e.delete_manifest("ns", "y")
    _save(e, "other", "x", _kv(4))
    e.close()
    e2 = _open(tmp_path)
    assert [r["name"] for r in e2.list("ns")] == ["x"]
    assert _restore(e2, "ns", "x").equals(_kv(2))
    assert _restore(e2, "other", "x").equals(_kv(4))
    st = e2.stats("ns")  # only chunks of live manifests are loaded back
    assert st["orphan_chunks"] == 0 and st["chunks"] == len(set(chunking.split(_kv(2), 16)[0].keys.tolist()))
    e2.close()


def test_a_failed_append_is_truncated_away(tmp_path):
    """EFBIG from a file-size limit, in a child process: the half-written record must not stay in
    the segment, and later appends and the replay must not trip over it."""
    import resource

    def child() -> int:
        log = SegmentLog(tmp_path)
        log.open_for_append()
        log.append(rec.REC_CHUNK, rec.chunk_parts("ns", 1, b"a" * 1000))
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
        try:
            log.append(rec.REC_CHUNK, rec.chunk_parts("ns", 2, b"b" * 5000))
            code = 2
        except DiskFullError:
            size = log._path(log.active_id).stat().st_size
            log.append(rec.REC_CHUNK, rec.chunk_parts("ns", 3, b"c" * 1000))
            code = 0 if size < 3000 else 3
        log.close()
        return code

    assert exit_code_in_a_child(child) == 0
    keys, damage = _replayed_keys(tmp_path)
    assert keys == [1, 3] and not damage


def test_concurrent_commits_share_fsyncs(tmp_path):
    e = _open(tmp_path)
    kvs = [_kv(100 + i, 30) for i in range(8)]
    before = e.log.fsyncs
    errors = []

    def commit(i):
        try:
            for j in range(5):
                _save(e, f"ns{i}", f"s{j}", kvs[i])
        except Exception as ex:  # noqa: BLE001
            errors.append(ex)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert e.log.fsyncs - before < 40  # 40 commits, fewer fsyncs: they were shared
    e.close()


def test_one_server_per_data_dir(tmp_path):
    e = _open(tmp_path)
    with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
        _open(tmp_path)
    e.close()
    _open(tmp_path).close()  # released on close


def _v1_record(rtype, payload):
    head = struct.pack("<4sBxxxIQ", b"RKLG", rtype, len(payload), 0)
    h = xxhash.xxh3_64()
    h.update(bytes((rtype,)))
    h.update(struct.pack("<Q", len(payload)))
    h.update(payload)
    return head[:12] + struct.pack("<Q", h.intdigest()) + payload


def _v1_str(s):
    return struct.pack("<H", len(s)) + s.encode()


def test_a_format_1_log_is_read_and_rewritten(tmp_path):
    """A data dir written by rdmakv 0.1 (written here from its documented record layout)."""
    kv = _kv(7)
    m, chunks = chunking.split(kv, 16)
    out = bytearray()
    for k, c in zip(m.keys.tolist(), chunks):
        out += _v1_record(1, _v1_str("ns") + struct.pack("<Q", k) + bytes(c))
    out += _v1_record(2, _v1_str("ns") + _v1_str("old") + m.encode())
    out += _v1_record(2, _v1_str("ns") + _v1_str("gone") + m.encode())
    out += _v1_record(3, _v1_str("ns") + _v1_str("gone"))
    (tmp_path / "seg-00000001.log").write_bytes(bytes(out))
    e = _open(tmp_path)
    assert [r["name"] for r in e.list("ns")] == ["old"] and _restore(e, "ns", "old").equals(kv)
    e.close()
    assert not (tmp_path / "seg-00000001.log").exists()
    assert all(p.read_bytes()[:4] in (b"", b"RKL2") for p in tmp_path.glob("seg-*.log"))
    e2 = _open(tmp_path)
    assert _restore(e2, "ns", "old").equals(kv)
    e2.close()


def test_peek_manifest_reads_a_demoted_session_without_promoting_counting_or_reordering(tmp_path):
    e = _open(tmp_path)
    try:
        _save(e, "ns", "a", _kv(1))
        _save(e, "ns", "b", _kv(2))
        want, _, _ = e.get_manifest("ns", "a")
        with e.lock:
            ns = e.namespaces["ns"]
            e.tiers.demote(ns, ns.sessions["a"])  # now only in the log
            lru = list(e.tiers.mem_lru)
            holds = ns.sessions["a"].holds  # the get_manifest above keeps its own until its next lookup
        before = e.stats("ns")
        assert e.peek_manifest("ns", "a") == want  # read back from the log record
        assert e.peek_manifest("ns", "b") is not None
        after = e.stats("ns")
        for k in ("restores", "memory_hits", "disk_hits", "promotions", "resident_sessions"):
            assert after[k] == before[k], k
        assert not ns.sessions["a"].resident and ns.sessions["a"].holds == holds  # peek kept none
        assert list(e.tiers.mem_lru) == lru
    finally:
        e.close()
