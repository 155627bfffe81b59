"""How one LMCache chunk (a ``MemoryObj``) is stored: pure, no LMCache or torch here.

An LMCache chunk becomes one rdmakv session (a manifest of kind ``engine``):

- **name**: the key's ``CacheEngineKey.to_string()`` under ``lmc/`` when that is a valid name
  of at most ``MAX_PLAIN`` bytes, else its first bytes plus ``~`` and the BLAKE3-128 of the whole
  string (bounded and collision-resistant; the full string is in the body and checked on every
  read, so two keys can never be confused);
- **body**: magic, the full key string, LMCache's own ``RemoteMetadata`` header (shapes, dtypes,
  format and length: what ``get`` allocates from and checks), and the window the chunk was cut by;
- **chunks**: the MemoryObj's bytes cut at (K/V, layer, window of W tokens) boundaries. A KV
  object ``[2, layers, tokens, hidden]`` is K of every layer then V of every layer, each
  ``[tokens, hidden]`` contiguous, so the pieces are consecutive slices in manifest order and a
  restore lands them back to back into the object's own buffer. Identical layers, and the
  windows two engines' chunks share (a common prefix that ends inside an LMCache chunk), are
  stored once: the chunks are content-addressed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import blake3

from ..errors import CodecError
from ..wire.messages import Reader, validate_name

NAME_PREFIX = "lmc/"
MAX_PLAIN = 200  # bytes of key string used as the name as is; longer ones are cut and hashed
MAX_KEY_STRING = 4096  # bytes of CacheEngineKey string kept in a body
MAX_HEADER = 1024  # bytes of RemoteMetadata header (28 for one group; 4 + 20 per group)
MAX_PIECE = 1 << 20  # bytes of a piece when the object has no (K/V, layer, token) layout
MAGIC = b"LMC1"
_HEAD = struct.Struct("<4sH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def value_name(key_string: str) -> str:
    """The session name of an LMCache key: printable, at most 255 bytes, distinct per key."""
    plain = NAME_PREFIX + key_string
    raw = plain.encode("utf-8")
    if len(raw) <= MAX_PLAIN and plain.isprintable():
        return plain
    digest = blake3.blake3(key_string.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    head = "".join(c if c.isprintable() else "_" for c in key_string)
    head = head.encode("utf-8")[: MAX_PLAIN - len(NAME_PREFIX) - 40].decode("utf-8", "ignore")
    name = f"{NAME_PREFIX}{head}~{digest}"
    validate_name(name)
    return name


@dataclass(frozen=True)
class Body:
    key_string: str
    header: bytes  # LMCache's RemoteMetadata, serialized by LMCache
    window: int  # tokens per piece (0: a whole layer per piece)


def encode_body(b: Body) -> bytes:
    key = b.key_string.encode("utf-8", "surrogatepass")
    if len(key) > MAX_KEY_STRING:
        raise CodecError(f"LMCache key of {len(key)} bytes exceeds {MAX_KEY_STRING}")
    if len(b.header) > MAX_HEADER:
        raise CodecError(f"LMCache header of {len(b.header)} bytes exceeds {MAX_HEADER}")
    return b"".join([_HEAD.pack(MAGIC, len(key)), key, _U16.pack(len(b.header)), b.header, _U32.pack(b.window)])


def decode_body(data: bytes | memoryview) -> Body:
    """The body of a stored LMCache value; CodecError for anything else (another engine's
    manifest, a newer layout, damage)."""
    r = Reader(data)
    magic, klen = _HEAD.unpack(r.take(_HEAD.size))
    if magic != MAGIC:
        raise CodecError(f"not an LMCache value (magic {bytes(magic)!r})")
    if klen > MAX_KEY_STRING:
        raise CodecError(f"LMCache key of {klen} bytes exceeds {MAX_KEY_STRING}")
    key = bytes(r.take(klen)).decode("utf-8", "surrogatepass")
    hlen = r.u16()
    if hlen > MAX_HEADER:
        raise CodecError(f"LMCache header of {hlen} bytes exceeds {MAX_HEADER}")
    header = bytes(r.take(hlen))
    window = r.u32()
    r.end()
    return Body(key, header, window)


@dataclass(frozen=True)
class Group:
    """One group of a MemoryObj: its shape and element size, in the object's byte order."""

    shape: tuple[int, ...]
    itemsize: int

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for d in self.shape:
            n *= d
        return n


def piece_lengths(groups: Sequence[Group], window: int) -> list[int]:
    """Lengths of the consecutive pieces an object is stored as (they sum to its size).

    A 4-D group ``[kv, layers, tokens, hidden]`` is cut per (kv, layer) slice and, with
    ``window`` > 0, each slice into windows of ``window`` tokens (the last one shorter). Any other
    group is cut into pieces of at most ``MAX_PIECE`` bytes."""
    if window < 0:
        raise ValueError(f"window must be >= 0 tokens, got {window}")
    out: list[int] = []
    for g in groups:
        if g.nbytes == 0:
            continue
        if len(g.shape) == 4 and min(g.shape) > 0:
            kv, layers, tokens, hidden = g.shape
            row = hidden * g.itemsize
            step = window if 0 < window < tokens else tokens
            per_slice = [step * row] * (tokens // step) + ([tokens % step * row] if tokens % step else [])
            out += per_slice * (kv * layers)
        else:
            whole, rest = divmod(g.nbytes, MAX_PIECE)
            out += [MAX_PIECE] * whole + ([rest] if rest else [])
    return out
