"""The LMCache plugin's pure parts (no LMCache needed): names, bodies, pieces, settings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdmakv.errors import CodecError
from rdmakv.lmcache import values as v
from rdmakv.lmcache.settings import SettingsError, load_key, parse_settings
from rdmakv.wire.messages import validate_name


@settings(max_examples=300, deadline=None)
@given(key=st.text(min_size=1, max_size=600))
def test_every_key_string_maps_to_a_valid_bounded_name(key):
    name = v.value_name(key)
    validate_name(name)  # printable, 1..255 bytes
    assert len(name.encode()) <= v.MAX_PLAIN
    assert v.value_name(key) == name  # deterministic: another process finds the same session


def test_short_keys_are_their_own_names_and_long_ones_are_hashed_apart():
    short = "Qwen/Qwen2.5-0.5B@1@0@-33f9bce42327706c@bfloat16"
    assert v.value_name(short) == "lmc/" + short
    a, b = "m" * 300 + "@1@0@aa@bfloat16", "m" * 300 + "@1@0@ab@bfloat16"  # same 200-byte prefix
    assert v.value_name(a) != v.value_name(b) and v.value_name(a).startswith("lmc/mmm")
    assert "\n" not in v.value_name("model\nname@1@0@1@bfloat16")


@settings(max_examples=200, deadline=None)
@given(key=st.text(max_size=300), header=st.binary(max_size=200), window=st.integers(0, 2**32 - 1))
def test_body_round_trip(key, header, window):
    body = v.Body(key, header, window)
    assert v.decode_body(v.encode_body(body)) == body


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=100))
def test_body_decoder_raises_codec_errors_only(data):
    try:
        v.decode_body(data)
    except CodecError:
        pass


def test_body_rejects_other_manifests_and_oversized_fields():
    with pytest.raises(CodecError, match="not an LMCache value"):
        v.decode_body(b"XXXX\x00\x00\x00\x00\x00\x00\x00\x00")
    with pytest.raises(CodecError, match="exceeds"):
        v.encode_body(v.Body("k" * (v.MAX_KEY_STRING + 1), b"", 0))
    with pytest.raises(CodecError, match="exceeds"):
        v.encode_body(v.Body("k", b"h" * (v.MAX_HEADER + 1), 0))


groups = st.lists(
    st.builds(v.Group, st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(0, 300), st.integers(1, 40)),
              st.sampled_from([1, 2, 4])) | st.builds(v.Group, st.tuples(st.integers(0, 3 << 20)), st.just(1)),
    min_size=1, max_size=3,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(gs=groups, window=st.integers(0, 400))
def test_pieces_cover_the_object_exactly(gs, window):
    lengths = v.piece_lengths(gs, window)
    assert sum(lengths) == sum(g.nbytes for g in gs)
    assert all(0 < n for n in lengths)


def test_pieces_follow_kv_layer_and_window_boundaries():
    g = v.Group((2, 3, 100, 8), 2)  # K and V of 3 layers, 100 tokens, 16-byte rows
    assert v.piece_lengths([g], 0) == [1600] * 6  # a whole layer slice each
    assert v.piece_lengths([g], 64) == [64 * 16, 36 * 16] * 6  # 64-token windows, the last shorter
    assert v.piece_lengths([g], 256) == [1600] * 6
    assert v.piece_lengths([v.Group(((5 << 20) + 3,), 1)], 64) == [1 << 20] * 5 + [3]
    with pytest.raises(ValueError):
        v.piece_lengths([g], -1)


def test_settings_parse_and_say_what_is_wrong():
    s = parse_settings("rdmakv://10.0.0.5:9901/llm?transport=tcp&window=0&pin=1&ttl=60", "u")
    assert (str(s.url), s.transport, s.window, s.pin, s.ttl) == ("rdmakv://10.0.0.5:9901/llm", "tcp", 0, True, 60.0)
    assert parse_settings("rdmakv://h/ns", "u").window == 64
    for bad, says in [(None, "u is not set"), ("redis://h:1", "not a usable rdmakv URL"),
                      ("rdmakv://h:99999/ns", "bad port"), ("rdmakv://h/ns?colour=red", "unknown option"),
                      ("rdmakv://h/ns?transport=ib", "transport must be one of"),
                      ("rdmakv://h/ns?window=-3", "window must be between"),
                      ("rdmakv://h/ns?timeout=soon", "timeout must be a number")]:  # fmt: skip
        with pytest.raises(SettingsError, match=says):
            parse_settings(bad, "u")


def test_the_key_comes_from_the_environment_or_a_keys_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RDMAKV_AUTH_KEY", raising=False)
    monkeypatch.delenv("RDMAKV_KEY_FILE", raising=False)
    with pytest.raises(SettingsError, match="no key: set RDMAKV_AUTH_KEY"):
        load_key("ns")
    monkeypatch.setenv("RDMAKV_AUTH_KEY", "abc")
    with pytest.raises(SettingsError, match="RDMAKV_AUTH_KEY is not a usable key"):
        load_key("ns")
    monkeypatch.delenv("RDMAKV_AUTH_KEY")
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[key]]\nnamespace = "ns"\nkey = "{"ab" * 32}"\n')
    monkeypatch.setenv("RDMAKV_KEY_FILE", str(keys))
    assert load_key("ns") == bytes.fromhex("ab" * 32)
    with pytest.raises(SettingsError, match="no valid \\[\\[key\\]\\] for namespace 'other'"):
        load_key("other")
