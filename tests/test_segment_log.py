"""The durable log: torn tails are truncated, corrupt records stop replay, fsync policies."""

from __future__ import annotations

import numpy as np
import pytest

from rdmakv import kvgen
from rdmakv.store.engine import Engine
from rdmakv.store.segment_log import REC_CHUNK, SegmentLog, chunk_parts
from rdmakv.wire import chunking


def _kv(seed, n=50):
    return kvgen.generate(kvgen.token_stream(seed, n), kvgen.ModelShape("t", 2, 32, 32))


def _save(engine, ns, name, kv, w=16):
    m, chunks = chunking.split(kv, w)
    engine.put_chunks(ns, list(zip(m.keys.tolist(), chunks)))
    assert len(engine.commit_manifest(ns, name, m.encode())) == 0


def _restore(engine, ns, name):
    from rdmakv.wire import manifest as mf

    data, _ = engine.get_manifest(ns, name)
    m = mf.decode(data)
    layout = chunking.decode_layout(m)
    _, _, offsets = layout.chunk_table()
    buf = np.zeros(layout.total_bytes, np.uint8)
    for k, off, n in zip(m.keys.tolist(), offsets.tolist(), m.lengths.tolist()):
        _, (chunk,) = engine.read_chunks_into(ns, [k], bytearray())
        buf[off : off + n] = np.frombuffer(chunk, np.uint8)
    return chunking.assemble(layout, buf)


@pytest.mark.parametrize("cut", [1, 7, 30, 500])
def test_torn_tail_is_truncated_and_committed_data_survives(tmp_path, cut):
    e = Engine(tmp_path, 64 << 20)
    e.open()
    _save(e, "ns", "a", _kv(1))
    m2, chunks2 = chunking.split(_kv(2), 16)
    e.put_chunks("ns", list(zip(m2.keys.tolist(), chunks2)))  # chunks of a save that never commits
    e.close()
    seg = sorted(tmp_path.glob("seg-*.log"))[-1]
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(size - cut)  # crash mid-record
    e2 = Engine(tmp_path, 64 << 20)
    e2.open()
    assert _restore(e2, "ns", "a").equals(_kv(1))
    assert seg.stat().st_size < size - cut or cut == 0
    _save(e2, "ns", "b", _kv(3))  # appending after the truncation works
    e2.close()
    e3 = Engine(tmp_path, 64 << 20)
    e3.open()
    assert _restore(e3, "ns", "b").equals(_kv(3)) and _restore(e3, "ns", "a").equals(_kv(1))


def test_corrupt_record_stops_replay_at_that_point(tmp_path):
    log = SegmentLog(tmp_path)
    log.open_for_append()
    for i in range(3):
        log.append(REC_CHUNK, chunk_parts("ns", i, bytes([i]) * 100))
    log.close()
    seg = log.segments()[0]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    got = [r.key for r in SegmentLog(tmp_path).replay()]
    assert got == [0]


def test_replaced_and_deleted_manifests_replay_to_the_final_state(tmp_path):
    e = Engine(tmp_path, 64 << 20, segment_bytes=8 << 10)  # force several segments
    e.open()
    _save(e, "ns", "x", _kv(1))
    _save(e, "ns", "x", _kv(2))
    _save(e, "ns", "y", _kv(3))
    e.delete_manifest("ns", "y")
    _save(e, "other", "x", _kv(4))
    e.close()
    assert len(list(tmp_path.glob("seg-*.log"))) > 1
    e2 = Engine(tmp_path, 64 << 20)
    e2.open()
    assert [r["name"] for r in e2.list("ns")] == ["x"]
    assert _restore(e2, "ns", "x").equals(_kv(2))
    assert _restore(e2, "other", "x").equals(_kv(4))
    # only chunks of live manifests are loaded back
    st = e2.stats("ns")
    assert st["orphan_chunks"] == 0 and st["chunks"] == len(set(chunking.split(_kv(2), 16)[0].keys.tolist()))
