"""A second kv_store_v1 consumer, in Python with ctypes: the same library, loaded RTLD_LOCAL through
KV_STORE_LIBRARY_PATH, the same save and restore calls as the C consumer.

    python consumer_ctypes.py URI SESSIONS_FILE      prints "ctypes ok" when all went well
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

U8P = ctypes.POINTER(ctypes.c_uint8)


class VTable(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint32),
        ("open", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)),
        ("close", ctypes.CFUNCTYPE(None, ctypes.c_void_p)),
        ("put_chunk", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                       ctypes.c_char_p, ctypes.c_size_t)),
        ("get_chunk", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                       ctypes.POINTER(U8P), ctypes.POINTER(ctypes.c_size_t))),
        ("put_manifest", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                          ctypes.c_size_t)),
        ("get_manifest", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p,
                                          ctypes.POINTER(U8P), ctypes.POINTER(ctypes.c_size_t))),
        ("delete_manifest", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)),
        ("prefetch_chunks", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                             ctypes.c_size_t)),
    ]  # fmt: skip


_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]


def load() -> VTable:
    lib = ctypes.CDLL(os.path.join(os.environ["KV_STORE_LIBRARY_PATH"], "libkv_store_rdmakv.so"),
                      mode=os.RTLD_NOW | os.RTLD_LOCAL)  # fmt: skip
    lib.kv_store_get_vtable.restype = ctypes.POINTER(VTable)
    return lib.kv_store_get_vtable().contents


def _take(out: U8P, n: ctypes.c_size_t) -> bytes:
    data = ctypes.string_at(out, n.value)
    _libc.free(out)
    return data


def put_manifest(vt: VTable, h, name: bytes, body: bytes) -> int:
    return vt.put_manifest(h, name, body, len(body))


def get_manifest(vt: VTable, h, name: bytes) -> tuple[int, bytes]:
    out, n = U8P(), ctypes.c_size_t()
    rc = vt.get_manifest(h, name, ctypes.byref(out), ctypes.byref(n))
    return rc, (_take(out, n) if rc == 0 else b"")


def get_chunk(vt: VTable, h, hash_: bytes) -> tuple[int, bytes]:
    out, n = U8P(), ctypes.c_size_t()
    rc = vt.get_chunk(h, hash_, len(hash_), ctypes.byref(out), ctypes.byref(n))
    return rc, (_take(out, n) if rc == 0 else b"")


def read_sessions(path: str) -> list[list[tuple[bytes, bytes]]]:
    with open(path, "rb") as f:
        data = f.read()
    magic, hash_len, n_sessions, n_chunks = struct.unpack_from("<4sIII", data)
    assert magic == b"RKVC"
    pos, out = 16, []
    for _ in range(n_sessions):
        chunks = []
        for _ in range(n_chunks):
            h = data[pos : pos + hash_len]
            (ln,) = struct.unpack_from("<I", data, pos + hash_len)
            pos += hash_len + 4
            chunks.append((h, data[pos : pos + ln]))
            pos += ln
        out.append(chunks)
    return out


def main(uri: str, path: str) -> int:
    vt = load()
    assert vt.version == 2
    h = vt.open(uri.encode())
    assert h, "open returned NULL"
    chunks = read_sessions(path)[0]
    body = b"ENGM" + struct.pack("<I", len(chunks)) + b"".join(hh for hh, _ in chunks)
    for hh, data in chunks:
        assert vt.put_chunk(h, hh, len(hh), data, len(data)) == 0
    assert put_manifest(vt, h, b"from-ctypes", body) == 0
    rc, got = get_manifest(vt, h, b"from-ctypes")
    assert rc == 0 and got == body, (rc, len(got))
    hashes = b"".join(hh for hh, _ in chunks)
    assert vt.prefetch_chunks(h, hashes, len(chunks), len(chunks[0][0])) == 0
    for hh, data in chunks:
        rc, got = get_chunk(vt, h, hh)
        assert rc == 0 and got == data
    assert vt.delete_manifest(h, b"from-ctypes") == 0
    assert get_manifest(vt, h, b"from-ctypes")[0] == -2
    vt.close(h)
    print("ctypes ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
