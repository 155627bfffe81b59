"""A kv_store_v1 consumer written the way a paged prefix cache is (the one public third-party
consumer: an MLX inference server's SSD prefix cache, whose MemKV backend loads the reference
library): each block of KV is keyed by a 32-byte SHA-256 *chain hash of token ids* (the hash of the
block's whole prefix), not by a hash of its bytes; after every block it writes a sentinel manifest
with an empty body so that the put is visible; later it reads blocks back by key with get_chunk.

    python chain_consumer.py URI BLOCKS [--lib NAME] [--prefetch]   put, sentinel, read all back
    python chain_consumer.py URI BLOCKS --read-only [--prefetch]     read back what another process put
    python chain_consumer.py URI 0 --errors                          each bad call with its code
    python chain_consumer.py URI BLOCKS --threads                    two handles, two threads, same keys

The library is loaded RTLD_LOCAL from $KV_STORE_LIBRARY_PATH under --lib (default rdmakv; memkv is
the reference backend's name). Prints one "name value" line per result; "chain ok" at the end.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import consumer_ctypes as cc

BLOCK_TOKENS = 16
SENTINEL = b"__prefix_index__"


def load(lib: str) -> cc.VTable:
    path = os.path.join(os.environ["KV_STORE_LIBRARY_PATH"], f"libkv_store_{lib}.so")
    so = ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
    so.kv_store_get_vtable.restype = ctypes.POINTER(cc.VTable)
    return so.kv_store_get_vtable().contents


def blocks(n: int, seed: int = 7, size: int = 16 << 10) -> list[tuple[bytes, bytes]]:
    """(chain key, block bytes): key i = SHA-256(key i-1 || token ids of block i); bytes that
    hash to nothing in particular (and never to their key)."""
    out, prev = [], b"\0" * 32
    for i in range(n):
        tokens = b"".join((seed * 1000003 + i * BLOCK_TOKENS + t).to_bytes(4, "little") for t in range(BLOCK_TOKENS))
        key = hashlib.sha256(prev + tokens).digest()
        data = hashlib.shake_256(key + b"kv").digest(size)
        out.append((key, data))
        prev = key
    return out


def put_all(vt, h, items) -> list[int]:
    codes = []
    for key, data in items:
        codes.append(vt.put_chunk(h, key, len(key), data, len(data)))
        codes.append(vt.put_manifest(h, SENTINEL, b"", 0))  # empty body: "these puts are visible"
    return codes


def read_all(vt, h, items, prefetch: bool) -> tuple[int, int]:
    """(blocks read back byte for byte, first failing code or 0)."""
    if prefetch:
        keys = b"".join(k for k, _ in items)
        rc = vt.prefetch_chunks(h, keys, len(items), 32)
        if rc != 0:
            return 0, rc
    same = 0
    for key, data in items:
        rc, got = cc.get_chunk(vt, h, key)
        if rc != 0:
            return same, rc
        same += got == data
    return same, 0


def errors(vt, uri: bytes) -> None:
    h = vt.open(uri)
    assert h, "open returned NULL"
    data = b"x" * 64
    out, n = cc.U8P(), ctypes.c_size_t()
    unterminated = ctypes.create_string_buffer(b"a" * 4096, 4096)  # no NUL anywhere
    results = {
        "key_0_bytes": vt.put_chunk(h, b"", 0, data, len(data)),
        "key_65_bytes": vt.put_chunk(h, b"k" * 65, 65, data, len(data)),
        "key_64_bytes": vt.put_chunk(h, b"k" * 64, 64, data, len(data)),
        "key_1_byte": vt.put_chunk(h, b"k", 1, data, len(data)),
        "null_key": vt.put_chunk(h, None, 8, data, len(data)),
        "chunk_over_max": vt.put_chunk(h, b"big", 3, data, (1 << 31) + 1),  # never read: refused on its length
        "empty_chunk": vt.put_chunk(h, b"empty", 5, data, 0),
        "null_name": vt.put_manifest(h, None, b"", 0),
        "unterminated_name": vt.put_manifest(h, ctypes.cast(unterminated, ctypes.c_char_p), b"", 0),
        "empty_body_sentinel": vt.put_manifest(h, SENTINEL, b"", 0),
        "never_put": vt.get_chunk(h, b"n" * 32, 32, ctypes.byref(out), ctypes.byref(n)),
        "get_key_0_bytes": vt.get_chunk(h, b"", 0, ctypes.byref(out), ctypes.byref(n)),
        "get_1_byte_key": cc.get_chunk(vt, h, b"k")[0],
        "get_64_byte_key": cc.get_chunk(vt, h, b"k" * 64)[0],
        "prefetch_65_byte_keys": vt.prefetch_chunks(h, b"k" * 65, 1, 65),
    }
    vt.close(h)
    for name, rc in results.items():
        print(name, rc)


def two_threads(vt, uri: bytes, items) -> None:
    """Two handles in two threads put the same keys at once; both sentinels commit; every block
    reads back whole from a third handle."""
    codes: list[list[int]] = [[], []]
    start = threading.Barrier(2)

    def run(i: int) -> None:
        h = vt.open(uri)
        start.wait()
        codes[i] = put_all(vt, h, items) if h else [-999]
        if h:
            vt.close(h)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h = vt.open(uri)
    same, rc = read_all(vt, h, items, prefetch=False)
    vt.close(h)
    print("thread_failures", sum(c != 0 for cs in codes for c in cs))
    print("read_back", same)
    print("read_rc", rc)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("blocks", type=int)
    p.add_argument("--lib", default="rdmakv")
    p.add_argument("--prefetch", action="store_true")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--errors", action="store_true")
    p.add_argument("--threads", action="store_true")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    vt = load(a.lib)
    uri = a.uri.encode()
    items = blocks(a.blocks, a.seed)
    if a.errors:
        errors(vt, uri)
        return 0
    if a.threads:
        two_threads(vt, uri, items)
        return 0
    h = vt.open(uri)
    if not h:
        print("open NULL")
        return 1
    if not a.read_only:
        codes = put_all(vt, h, items)
        print("put_failures", sum(c != 0 for c in codes))
    same, rc = read_all(vt, h, items, a.prefetch)
    vt.close(h)
    print("read_back", same)
    print("read_rc", rc)
    ok = same == len(items) and rc == 0
    print("chain ok" if ok else "chain FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
