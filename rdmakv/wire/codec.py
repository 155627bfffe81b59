"""The bounds-checked cursor every payload codec reads with, and names (pure)."""

from __future__ import annotations

import struct

import numpy as np

from ..errors import CodecError

MAX_NAME = 255
U8 = struct.Struct("<B")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")


class Reader:
    """Bounds-checked cursor over a payload."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            have = len(self.data) - self.pos
            raise CodecError(f"payload truncated: need {n} bytes at offset {self.pos}, have {have}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return int(U8.unpack(self.take(1))[0])

    def u16(self) -> int:
        return int(U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(U32.unpack(self.take(4))[0])

    def array(self, dtype: np.dtype, count: int) -> np.ndarray:
        return np.frombuffer(self.take(count * np.dtype(dtype).itemsize), dtype=dtype, count=count)

    def rest(self) -> memoryview:
        return self.take(len(self.data) - self.pos)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise CodecError(f"{len(self.data) - self.pos} unexpected trailing bytes in payload")


def validate_name(name: str, what: str = "manifest name") -> bytes:
    """Names and namespaces: 1..255 bytes of UTF-8, printable (no control characters: they would
    let a client inject lines into the server's log)."""
    raw = name.encode("utf-8") if isinstance(name, str) else b""
    if not 0 < len(raw) <= MAX_NAME:
        raise CodecError(f"{what} must be 1..{MAX_NAME} UTF-8 bytes, got {len(raw)}")
    if not name.isprintable():
        raise CodecError(f"{what} contains control or other unprintable characters")
    return raw


def validate_namespace(ns: str) -> bytes:
    raw = validate_name(ns, "namespace")
    if "/" in ns:
        raise CodecError("namespace must not contain '/'")
    return raw


def read_name(r: Reader) -> str:
    raw = bytes(r.take(r.u8()))
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CodecError("manifest name is not valid UTF-8") from e
    validate_name(name)
    return name


def enc_name(name: str) -> bytes:
    raw = validate_name(name)
    return U8.pack(len(raw)) + raw
