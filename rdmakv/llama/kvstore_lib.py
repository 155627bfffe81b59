"""Build ``libkv_store_rdmakv.so``: the kv_store_v1 ABI, in C where an engine calls per chunk and in
Python (cffi's embedding mode) for everything that talks to the store.

Why cffi embedding: the library must be the Python client (one implementation of the protocol,
RDMA included), and cffi's embedding mode is the maintained way to call Python from a plain C
library: it generates the entry points, starts the interpreter on the first call from any thread
and takes the GIL around each call. The C (``kvstore_shim.c``) is the vtable, the handles, and the
two per-chunk calls (put_chunk into a pending arena, get_chunk from the prefetch table), which must
not pay a crossing into Python each; and a constructor that promotes the already loaded libpython
to global symbol scope, because engines load backends ``RTLD_LOCAL`` and the extension modules the
embedded interpreter imports (numpy, xxhash, _cffi_backend) need libpython's symbols.

The same file is also installed as ``libkv_store_memkv.so`` (a symbolic link), the reference
backend's name, so an engine that hard-codes it loads rdmakv from ``KV_STORE_LIBRARY_PATH``.

The library bakes in the site-packages of the Python that built it (``RDMAKV_KVSTORE_PYTHONPATH``
overrides), so it finds rdmakv and its dependencies however the engine was started.
"""

from __future__ import annotations

import os
import shutil
import site
import sys
import sysconfig
import tempfile
from pathlib import Path

LIB_NAME = "libkv_store_rdmakv.so"
ALIAS_NAMES = ("libkv_store_memkv.so",)  # the reference backend's name: engines that hard-code it load rdmakv
HEADER = Path(__file__).with_name("kv_store_abi.h")
SHIM = Path(__file__).with_name("kvstore_shim.c")
PATH_ENV = "RDMAKV_KVSTORE_PYTHONPATH"

# Implemented in Python (kvstore_embed.py), called by the C side
_API = """
int64_t rdmakv_py_open(kv_store_v1 *h, const char *uri);
void rdmakv_py_close(kv_store_v1 *h);
void rdmakv_py_say(const char *what);
void rdmakv_py_bad_key(const char *what, size_t hash_len, int has_hash);
void rdmakv_py_bad_chunk(const char *what, size_t len, int has_data);
int rdmakv_py_send_ahead(kv_store_v1 *h);
int rdmakv_py_put_manifest(kv_store_v1 *h, const char *name, const uint8_t *data, size_t len);
int rdmakv_py_get_manifest(kv_store_v1 *h, const char *name, uint8_t **out, size_t *out_len);
int rdmakv_py_get_chunk(kv_store_v1 *h, const uint8_t *key, uint8_t **out, size_t *out_len);
int rdmakv_py_delete_manifest(kv_store_v1 *h, const char *name);
int rdmakv_py_prefetch_chunks(kv_store_v1 *h, const uint8_t *hashes, size_t count, size_t hash_len);
"""
# Implemented in C (kvstore_shim.c), called by the Python side inside its calls
_HELPERS = """
void *malloc(size_t);
void free(void *);
size_t rdmakv_c_pending(kv_store_v1 *h, uint8_t **keys, uint32_t **lens, uint64_t **offs, uint8_t **data);
void rdmakv_c_pending_sent(kv_store_v1 *h);
void rdmakv_c_pending_clear(kv_store_v1 *h);
int rdmakv_c_cache_add(kv_store_v1 *h, uint32_t gen, const uint8_t *keys, const uint8_t *base, const uint64_t *offs,
                       const uint32_t *lens, size_t n);
int rdmakv_c_cache_drop(kv_store_v1 *h, uint32_t gen);
void rdmakv_c_cache_clear(kv_store_v1 *h);
size_t rdmakv_c_cache_size(kv_store_v1 *h);
"""
_INIT = """
import os, site, sys
for _p in (os.environ.get({env!r}) or {paths!r}).split(os.pathsep)[::-1]:
    if _p and _p not in sys.path:
        site.addsitedir(_p)  # .pth files too: an editable rdmakv is found through one
        sys.path.remove(_p)
        sys.path.insert(0, _p)
from _rdmakv_kvstore import ffi, lib
from rdmakv.llama import kvstore_embed
kvstore_embed.install(ffi, lib)
"""


def default_dir() -> Path:
    """Where ``build`` puts the library by default: beside the Python environment that runs rdmakv."""
    return Path(sys.prefix) / "lib" / "rdmakv"


def library_path(out_dir: str | os.PathLike | None = None) -> Path:
    return Path(out_dir or default_dir()) / LIB_NAME


def baked_paths() -> list[str]:
    """This environment's site-packages, plus the directory rdmakv itself is imported from."""
    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the rdmakv package
    return [root, *[p for p in paths if p != root]]


def _c_source(soname: str) -> str:
    header = HEADER.read_text()
    protos = "".join(f"CFFI_DLLEXPORT {line.strip()}\n" for line in _API.strip().splitlines())
    return f"""
#include <dlfcn.h> /* RTLD_NOLOAD: Python.h has defined _GNU_SOURCE */
#include <stdlib.h>
{header}
{protos}
__attribute__((constructor)) static void rdmakv_promote_libpython(void) {{
    /* the engine loaded us RTLD_LOCAL: make libpython's symbols visible to extension modules */
    dlopen("{soname}", RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
}}
{SHIM.read_text()}
"""


def build(out_dir: str | os.PathLike | None = None, verbose: bool = False) -> Path:
    """Compile the library into ``out_dir`` (default ``default_dir()``); returns its path.
    Needs a C compiler and the Python headers (Debian: build-essential, python3-dev)."""
    try:
        import cffi
    except ImportError as e:
        raise RuntimeError("building the kv_store library needs cffi (pip install cffi)") from e
    soname = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so"
    target = library_path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    ffi = cffi.FFI()
    ffi.cdef("typedef struct kv_store_v1 kv_store_v1;\n" + _HELPERS)
    ffi.embedding_api(_API)
    ffi.set_source("_rdmakv_kvstore", _c_source(soname), libraries=["dl", "pthread"],
                   extra_compile_args=["-O2", "-Wall"])  # fmt: skip
    ffi.embedding_init_code(_INIT.format(env=PATH_ENV, paths=os.pathsep.join(baked_paths())))
    with tempfile.TemporaryDirectory(prefix="rdmakv-kvstore-") as tmp:
        built = ffi.compile(tmpdir=tmp, target=LIB_NAME, verbose=verbose)
        staged = target.with_suffix(".so.tmp")
        shutil.copyfile(built, staged)
        os.chmod(staged, 0o755)
        os.replace(staged, target)  # an engine that has the old one open keeps its mapping
    shutil.copyfile(HEADER, target.parent / HEADER.name)
    for alias in ALIAS_NAMES:
        link = target.parent / alias
        staged_link = link.with_suffix(".so.tmp")
        staged_link.unlink(missing_ok=True)
        staged_link.symlink_to(LIB_NAME)
        os.replace(staged_link, link)
    return target


def cli(argv: list[str]) -> int:
    """`rdmakv kvstore-lib build [--out DIR]` and `rdmakv kvstore-lib path [--out DIR]`."""
    import argparse

    p = argparse.ArgumentParser(
        prog="rdmakv kvstore-lib",
        description=f"The kv_store_v1 backend library ({LIB_NAME}) for a chunked-save llama-server: "
        "`build` compiles it (cffi embedding mode; needs cc and python3-dev), `path` prints the directory "
        "to put in KV_STORE_LIBRARY_PATH.",
    )
    p.add_argument("action", choices=("build", "path"))
    p.add_argument("--out", help=f"directory of the library (default {default_dir()})")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = p.parse_args(argv)
    lib = library_path(args.out)
    if args.action == "build":
        print(build(args.out, verbose=args.verbose))
        return 0
    if not lib.exists():
        print(f"rdmakv kvstore-lib: {lib} is not built yet: run `rdmakv kvstore-lib build`", file=sys.stderr)
        return 1
    print(lib.parent)
    return 0
