"""PUT_MANIFESTS and GET_MANIFESTS: pure codec round trips and rejection, then a real server."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rdmakv
from rdmakv.errors import CodecError, ManifestError
from rdmakv.hashing import CHECK_DTYPES, HASH_BLAKE3_256, HASH_XXH3_64, KEY_OPAQUE_BLAKE3, KEY_OPAQUE_XXH3, key_dtype
from rdmakv.wire import batches as b
from rdmakv.wire import manifest as mf
from rdmakv.wire.messages import LOCATION_DTYPE, NO_REGION, SaveOptions, make_regions

from .conftest import request_counts

names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=60).filter(str.isprintable)
options = st.builds(SaveOptions, st.booleans(), st.integers(0, 10**6).map(lambda ms: ms / 1000))


@settings(max_examples=150, deadline=None)
@given(items=st.lists(st.tuples(names, st.binary(max_size=200), options), max_size=20))
def test_put_manifests_request_round_trip(items):
    got = b.dec_put_manifests(b"".join(bytes(p) for p in b.enc_put_manifests(items)))
    assert [(n, bytes(m), o) for n, m, o in got] == [(n, m, o) for n, m, o in items]


@st.composite
def outcomes(draw):
    kind = draw(st.sampled_from([b.COMMITTED, b.MISSING, b.FAILED]))
    if kind == b.MISSING:
        alg = draw(st.sampled_from([HASH_XXH3_64, HASH_BLAKE3_256]))
        n = draw(st.integers(0, 5))
        raw = draw(st.binary(min_size=n * key_dtype(alg).itemsize, max_size=n * key_dtype(alg).itemsize))
        return b.Outcome(b.MISSING, np.frombuffer(raw, key_dtype(alg)))
    if kind == b.FAILED:
        return b.Outcome(b.FAILED, code=draw(st.integers(1, 17)), message=draw(st.text(max_size=40)))
    return b.Outcome(b.COMMITTED)


@settings(max_examples=150, deadline=None)
@given(outs=st.lists(outcomes(), max_size=12))
def test_put_manifests_reply_round_trip(outs):
    got = b.dec_outcomes(b"".join(b.enc_outcomes(outs)), len(outs))
    for o, g in zip(outs, got, strict=True):
        assert (g.status, g.code, g.message) == (o.status, o.code, o.message)
        assert g.missing.tobytes() == (o.missing.tobytes() if o.status == b.MISSING else b"")


@st.composite
def found_lists(draw):
    with_loc = draw(st.booleans())
    out = []
    for _ in range(draw(st.integers(0, 8))):
        status = draw(st.sampled_from([b.FOUND, b.NOT_FOUND, b.NOT_SERVED]))
        if status != b.FOUND:
            out.append(b.Found(status))
            continue
        slots, checks, alg = None, None, 0
        if with_loc:
            slots = np.zeros(draw(st.integers(0, 4)), LOCATION_DTYPE)
            slots["region"] = draw(st.sampled_from([1, 2, NO_REGION]))
            slots["offset"] = draw(st.integers(0, 2**40))
            alg = draw(st.sampled_from([0, KEY_OPAQUE_XXH3, KEY_OPAQUE_BLAKE3]))
            if alg:
                size = CHECK_DTYPES[alg].itemsize * len(slots)
                checks = np.frombuffer(draw(st.binary(min_size=size, max_size=size)), CHECK_DTYPES[alg]).copy()
        out.append(b.Found(b.FOUND, draw(st.binary(max_size=100)), draw(st.sampled_from(b.TIERS)), slots, checks, alg))
    regions = make_regions([(1, 4096, 1 << 20, 7), (2, 8192, 1 << 20, 9)]) if with_loc else None
    return out, regions


@settings(max_examples=150, deadline=None)
@given(case=found_lists())
def test_get_manifests_reply_round_trip(case):
    items, regions = case
    got, table = b.dec_found(b"".join(bytes(p) for p in b.enc_found(items, regions)), len(items))
    assert (table is None) == (regions is None)
    for f, g in zip(items, got, strict=True):
        assert (g.status, g.manifest, g.tier if g.status == b.FOUND else "") == (
            f.status, f.manifest, f.tier if f.status == b.FOUND else "")  # fmt: skip
        if f.status == b.FOUND and f.slots is not None:
            assert g.slots.tobytes() == f.slots.tobytes()
            assert g.check_alg == f.check_alg
            if f.check_alg:
                assert g.checks.tobytes() == f.checks.tobytes()
            assert b.found_size(g) == sum(len(bytes(p)) for p in b.enc_found([g], regions)) - 5 - 4 - regions.nbytes


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120), expected=st.integers(0, 4))
def test_batch_decoders_raise_codec_errors_only(data, expected):
    for dec in (b.dec_put_manifests, b.dec_get_manifests, lambda d: b.dec_outcomes(d, expected),
                lambda d: b.dec_found(d, expected)):  # fmt: skip
        try:
            dec(data)
        except CodecError:
            pass


def test_batch_limits_are_checked_before_anything_is_read():
    with pytest.raises(CodecError, match="exceeds 4096"):
        b.enc_get_manifests(["n"] * (b.MAX_BATCH + 1), False)
    with pytest.raises(CodecError, match="exceeds 4096"):
        b.dec_put_manifests((b.MAX_BATCH + 1).to_bytes(4, "little"))
    with pytest.raises(CodecError, match="exceeds 4096"):
        b.dec_get_manifests(b"\x00" + (b.MAX_BATCH + 1).to_bytes(4, "little"))
    with pytest.raises(CodecError, match="reservations"):
        b.enc_put_manifests([("n", b"m", SaveOptions(reserve=True))])
    with pytest.raises(CodecError, match="answered 1 manifests of 2"):
        b.dec_outcomes(b"".join(b.enc_outcomes([b.Outcome(b.COMMITTED)])), 2)
    with pytest.raises(CodecError, match="region not in the region table"):
        slots = np.zeros(1, LOCATION_DTYPE)
        slots["region"] = 5
        b.dec_found(b"".join(bytes(p) for p in b.enc_found([b.Found(b.FOUND, b"m", "memory", slots)],
                                                             make_regions([(1, 0, 1, 1)]))), 1)  # fmt: skip


def test_a_reply_lists_at_most_the_missing_budget():
    big = np.arange(b.MAX_BATCH_MISSING - 10, dtype=np.uint64)
    outs = [b.Outcome(b.MISSING, big), b.Outcome(b.MISSING, np.arange(100, dtype=np.uint64))]
    got = b.dec_outcomes(b"".join(b.enc_outcomes(outs)), 2)
    assert len(got[0].missing) == len(big) and len(got[1].missing) == 10
    assert got[1].status == b.MISSING  # still "not committed": the client sends what it was told, and asks again


# -- against a real server ---------------------------------------------------------------
def _object(st, payloads: list[bytes]) -> tuple[mf.Manifest, list[bytes]]:
    return st.build_object(mf.KIND_OPAQUE, b"", payloads, range(len(payloads))), payloads


def test_put_manifests_commits_warm_ones_in_one_round_trip_and_names_what_cold_ones_lack(server, ns, key):
    with rdmakv.connect(server.url(ns), key=key, transport="tcp") as st:
        warm = [_object(st, [b"shared-a" * 100, bytes([i]) * 300]) for i in range(5)]
        for _, chunks in warm:
            st.put_chunks(chunks)
        cold, cold_chunks = _object(st, [b"shared-a" * 100, b"never sent" * 50])
        bad = b"RKVM-not-a-manifest"
        items = [(f"w{i}", m) for i, (m, _) in enumerate(warm)] + [("cold", cold), ("bad", bad)]
        before = request_counts(server.url(ns))
        out = st.put_manifests(items, pin=True)
        after = request_counts(server.url(ns))
        assert after["PUT_MANIFESTS"] - before.get("PUT_MANIFESTS", 0) == 1
        assert [o.status for o in out] == [b.COMMITTED] * 5 + [b.MISSING, b.FAILED]
        assert out[5].missing.tolist() == [cold.keys[1]]  # the shared chunk is stored already
        assert out[6].code == ManifestError.code and "manifest" in out[6].message
        assert st.has_manifests([f"w{i}" for i in range(5)] + ["cold", "bad"]).tolist() == [True] * 5 + [False] * 2
        assert all(row["pinned"] for row in st.list("w"))
        st.put_chunks(cold_chunks)
        assert [o.status for o in st.put_manifests([("cold", cold)])] == [b.COMMITTED]
        assert st.load_object("cold")[1][1].tobytes() == cold_chunks[1]


def test_get_manifests_finds_many_names_in_one_round_trip_and_holds_them(server, ns, key):
    with rdmakv.connect(server.url(ns), key=key, transport="tcp") as st:
        saved = {}
        for i in range(8):
            m, chunks = _object(st, [bytes([i]) * 1000, b"common" * 10])
            st.save_manifest(f"s{i}", m, chunks)
            saved[f"s{i}"] = m
        asked = ["s3", "nope", "s0", "s7"]
        before = request_counts(server.url(ns))
        found, regions = st.get_manifests(asked, want_locations=True)
        after = request_counts(server.url(ns))
        assert after["GET_MANIFESTS"] - before.get("GET_MANIFESTS", 0) == 1
        assert [f.status for f in found] == [b.FOUND, b.NOT_FOUND, b.FOUND, b.FOUND]
        assert regions is None and all(f.slots is None for f in found)  # no RDMA on this connection
        for name, f in zip(asked, found):
            if f.status == b.FOUND:
                assert mf.decode(f.manifest) == saved[name] and f.tier == "memory"
        # held: deleting a version found does not free its chunks while this connection holds it
        with rdmakv.connect(server.url(ns), key=key, transport="tcp") as other:
            other.delete_manifest("s3")
        m3 = mf.decode(found[0].manifest)
        assert st.get_chunks(m3.keys.tolist())[0] == bytes([3]) * 1000
        assert st.stats()["restores"] == 3
        with pytest.raises(CodecError):
            st.get_manifests(["fine", "bad\nname"])
        assert [f.status for f in st.get_manifests(["s0"])[0]] == [b.FOUND]  # still in step
