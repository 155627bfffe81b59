"""Build ``libkv_store_rdmakv.so``: the kv_store_v1 ABI exported from Python by cffi's embedding mode.

Why cffi embedding: the library must be the Python client (one implementation of the
protocol, RDMA included), and cffi's embedding mode is the maintained way to export a plain
C ABI from Python: it generates the C entry points, starts the interpreter on the first call
from any thread and takes the GIL around each call. The C written here is only what cffi
cannot generate: the vtable and ``kv_store_get_vtable`` (a C function handing out pointers to
the Python-backed ones), and a constructor that promotes the already loaded libpython to
global symbol scope, because engines load backends ``RTLD_LOCAL`` and the extension modules
the embedded interpreter imports (numpy, xxhash, _cffi_backend) need libpython's symbols.

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
HEADER = Path(__file__).with_name("kv_store_abi.h")
PATH_ENV = "RDMAKV_KVSTORE_PYTHONPATH"

_FUNCS = ("open", "close", "put_chunk", "get_chunk", "put_manifest", "get_manifest", "delete_manifest",
          "prefetch_chunks")  # fmt: skip
_API = """
kv_store_v1 *rdmakv_kvs_open(const char *uri);
void rdmakv_kvs_close(kv_store_v1 *h);
int rdmakv_kvs_put_chunk(kv_store_v1 *h, const uint8_t *hash, size_t hash_len, const uint8_t *data, size_t len);
int rdmakv_kvs_get_chunk(kv_store_v1 *h, const uint8_t *hash, size_t hash_len, uint8_t **out, size_t *out_len);
int rdmakv_kvs_put_manifest(kv_store_v1 *h, const char *name, const uint8_t *data, size_t len);
int rdmakv_kvs_get_manifest(kv_store_v1 *h, const char *name, uint8_t **out, size_t *out_len);
int rdmakv_kvs_delete_manifest(kv_store_v1 *h, const char *name);
int rdmakv_kvs_prefetch_chunks(kv_store_v1 *h, const uint8_t *hashes, size_t count, size_t hash_len);
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
    slots = ",\n    ".join(f"rdmakv_kvs_{f}" for f in _FUNCS)
    return f"""
#include <dlfcn.h> /* RTLD_NOLOAD: Python.h has defined _GNU_SOURCE */
#include <stdlib.h>
{header}
{protos}
__attribute__((constructor)) static void rdmakv_promote_libpython(void) {{
    /* the engine loaded us RTLD_LOCAL: make libpython's symbols visible to extension modules */
    dlopen("{soname}", RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
}}

static const kv_store_vtable rdmakv_vtable = {{
    2,
    {slots}
}};

CFFI_DLLEXPORT const kv_store_vtable *kv_store_get_vtable(void) {{ return &rdmakv_vtable; }}
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
    decls = "typedef struct kv_store_v1 kv_store_v1;\n" + _API
    ffi.embedding_api(decls)
    ffi.cdef("void *malloc(size_t); void free(void *);")
    ffi.set_source("_rdmakv_kvstore", _c_source(soname), libraries=["dl"])
    ffi.embedding_init_code(_INIT.format(env=PATH_ENV, paths=os.pathsep.join(baked_paths())))
    with tempfile.TemporaryDirectory(prefix="rdmakv-kvstore-") as tmp:
        built = ffi.compile(tmpdir=tmp, target=LIB_NAME, verbose=verbose)
        staged = target.with_suffix(".so.tmp")
        shutil.copyfile(built, staged)
        os.chmod(staged, 0o755)
        os.replace(staged, target)  # an engine that has the old one open keeps its mapping
    shutil.copyfile(HEADER, target.parent / HEADER.name)
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
