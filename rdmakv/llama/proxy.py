"""`rdmakv llama-proxy`: keeps llama-server's slot saves in an rdmakv store, with no patch to llama-server.

Every request is passed through unchanged (bodies and streamed responses alike)
except ``POST /slots/{id}?action=save|restore``:

- save: llama-server writes the slot file into its ``--slot-save-path`` (our
  ``--slot-dir``); the proxy ingests it into the store (chunked, deduplicated,
  a one-round-trip warm save when every chunk is already there), removes the
  local file and answers llama-server's JSON plus an ``rdmakv`` report.
- restore: the proxy materialises the file from the store (over RDMA when the
  connection can), forwards the restore, then removes the file.

Both hand llama-server a private scratch filename (``.rdmakv-PID-N.slot``) in
place of the client's and put the client's name back in the answer, so
concurrent saves/restores of one name (a shared system prompt restored into
every slot) never see each other's file, and a file the operator keeps in the
directory under that name is never overwritten or deleted by a restore. The
client's name is checked with llama-server's own rules first; names that
break them go to llama-server unchanged, so it answers them in its own words.

Errors use llama-server's error shape. An unreachable store is a 503 with a
clear message, and never leaves a half-written slot file behind (a save whose
store is unreachable leaves llama-server's complete file under the client's
name, as llama-server alone would have, so nothing is lost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CodecError, NotFoundError, RdmakvError
from ..units import parse_size
from ..wire.auth import KEY_ENV
from . import slotfile
from .completion_request import ENDPOINTS as COMPLETION_ENDPOINTS
from .local_cache import LocalCache
from .scratch import ScratchFiles, remove, sweep, work_dir
from .store_pool import DEFAULT_POOL_SIZE, StorePool
from .upstream import llama_error

if TYPE_CHECKING:  # aiohttp is optional: imported where it is used
    import aiohttp
    from aiohttp import web

    from .auto_cache import AutoCache

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip
SLOT_PATH = re.compile(r"^(?P<prefix>.*)/slots/(?P<id>[^/]+)$")


class Proxy:
    def __init__(self, upstream: str, slot_dir: str, store: StorePool, local: LocalCache | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.slot_dir = Path(slot_dir)
        self.store = store
        self.local = local
        self.session: aiohttp.ClientSession | None = None
        self.scratch = ScratchFiles(self.slot_dir)
        self.auto: AutoCache | None = None  # with --auto-cache

    async def start(self) -> None:
        import aiohttp

        # auto_decompress off: bytes pass through exactly as llama-server sent them
        self.session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        if self.auto is not None:
            await self.auto.close()
        if self.session is not None:
            await self.session.close()
        await asyncio.to_thread(self.store.close)
        self.scratch.close()

    # -- plumbing ----------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        m = SLOT_PATH.match(request.path)
        action = request.query.get("action")
        if m and request.method == "POST" and action in ("save", "restore"):
            return await (self.slot_save if action == "save" else self.slot_restore)(request)
        if self.auto is not None and request.method == "POST" and request.path in COMPLETION_ENDPOINTS:
            return await self.auto.handle(request)
        return await self.passthrough(request, await request.read())

    def clean_headers(self, headers) -> dict:
        return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}

    async def forward_body(self, request, body: bytes):
        """``request`` to llama-server with ``body`` (a context manager giving its response)."""
        assert self.session is not None  # (started)
        return self.session.request(
            request.method, self.upstream + request.path_qs, headers=self.clean_headers(request.headers), data=body
        )

    @staticmethod
    def _with_filename(body: bytes, name: str) -> bytes:
        parsed = json.loads(body)
        parsed["filename"] = name
        return json.dumps(parsed).encode()

    def upstream_down(self, e: Exception) -> web.Response:
        return llama_error(502, f"rdmakv llama-proxy: upstream {self.upstream} unreachable: {e}", "server_error")

    async def passthrough(self, request: web.Request, body: bytes) -> web.StreamResponse:
        from aiohttp import ClientError, web

        try:
            async with await self.forward_body(request, body) as up:
                resp = web.StreamResponse(status=up.status, reason=up.reason, headers=self.clean_headers(up.headers))
                await resp.prepare(request)
                async for chunk in up.content.iter_any():  # streaming completions pass through as they come
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except ClientError as e:
            return self.upstream_down(e)

    async def _upstream_json(self, request: web.Request, body: bytes) -> tuple[int, dict | None, bytes, dict]:
        async with await self.forward_body(request, body) as up:
            raw = await up.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            return up.status, parsed, raw, self.clean_headers(up.headers)

    @staticmethod
    def _filename(body: bytes) -> str | None:
        try:
            name = json.loads(body).get("filename")
        except (ValueError, AttributeError):
            return None
        if not isinstance(name, str):
            return None
        try:
            slotfile.validate_filename(name)
        except ValueError:
            return None
        return name

    # -- save --------------------------------------------------------------------------------
    async def slot_save(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import ClientError, web

        body = await request.read()
        name = self._filename(body)
        if name is None:  # llama-server answers bad filenames itself, in its own words
            return await self.passthrough(request, body)
        scratch = self.scratch.path()
        t0 = time.perf_counter()
        try:
            status, parsed, raw, headers = await self._upstream_json(request, self._with_filename(body, scratch.name))
        except ClientError as e:
            await asyncio.to_thread(remove, scratch)  # llama-server may have written it before the link broke
            return self.upstream_down(e)
        finally:
            t_llama = time.perf_counter() - t0
        if status != 200 or not isinstance(parsed, dict):
            await asyncio.to_thread(remove, scratch)
            return web.Response(status=status, body=raw, headers=headers)
        try:
            t1 = time.perf_counter()
            report, parse_error, size, cached, split_s, ingest_s = await asyncio.to_thread(self._ingest, name, scratch)
        except OSError as e:
            if not scratch.exists():
                return llama_error(500, f"rdmakv llama-proxy: llama-server saved the slot but {scratch} is "
                                   f"unreadable ({e.strerror}); is --slot-dir the same directory as "
                                   "--slot-save-path?", "server_error")  # fmt: skip
            return self._save_failed(name, scratch, e)
        except RdmakvError as e:
            return self._save_failed(name, scratch, e)
        parsed["filename"] = name
        parsed["rdmakv"] = {
            "stored_as": name,
            "chunked": not parse_error,
            "parse_error": parse_error or None,
            "file_bytes": size,
            "local_copy": cached,
            "llama_save_ms": t_llama * 1e3,
            "map_and_chunk_ms": split_s * 1e3,  # mmap, parse, cut into chunks, hash them
            "thread_hop_ms": (time.perf_counter() - t1 - ingest_s) * 1e3,
            "proxy_total_ms": (time.perf_counter() - t0) * 1e3,
            **asdict(report),
        }
        return web.json_response(parsed)

    def _ingest(self, name: str, scratch: Path) -> tuple:
        """Store llama-server's file; keep it as the local copy or remove it. In a worker thread."""
        from .slotstore import put_slotfile

        t0 = time.perf_counter()
        with open(scratch, "rb") as f:  # mapped, not read: the chunks are views of llama-server's pages
            size = os.fstat(f.fileno()).st_size
            m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE) \
                if size else b""  # fmt: skip
        try:
            report, parse_error = self.store.run(put_slotfile, name, memoryview(m))
        finally:
            if isinstance(m, mmap.mmap):  # (size > 0)
                _close_map(m)
        split_s = time.perf_counter() - t0 - report.wall_s
        cached = self.local is not None and self.local.adopt(name, scratch, report.manifest_xxh3)
        if not cached:
            self.scratch.release(scratch)  # its pages serve a later restore
        return report, parse_error, size, cached, split_s, time.perf_counter() - t0

    def _save_failed(self, name: str, scratch: Path, e: Exception) -> web.Response:
        # keep llama-server's complete file under the client's name: the save is not lost
        try:
            os.replace(scratch, self.slot_dir / name)
        except OSError:
            pass
        return llama_error(503, f"rdmakv store {self.store.url} unreachable or refused the save ({e}); the slot "
                           f"file was left in {self.slot_dir} as {name!r}", "unavailable_error")

    # -- restore -----------------------------------------------------------------------------
    async def slot_restore(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import ClientError, web

        from ..client.reports import RestoreReport

        body = await request.read()
        name = self._filename(body)
        if name is None:
            return await self.passthrough(request, body)
        t0 = time.perf_counter()
        rep = RestoreReport()
        # llama-server only opens the scratch file after it is complete and closed
        scratch = self.scratch.path()
        try:
            source, size, mx, verified = await asyncio.to_thread(self._materialise, name, scratch, rep)
        except NotFoundError:
            return llama_error(404, f"slot file {name!r} is not in the rdmakv store", "not_found_error")
        except CodecError as e:  # e.g. the name holds a KV manifest, not a slot file
            return llama_error(400, f"rdmakv store: {e}", "invalid_request_error")
        except (RdmakvError, OSError) as e:
            await asyncio.to_thread(remove, scratch)
            return llama_error(503, f"rdmakv store {self.store.url} unreachable: {e}", "unavailable_error")
        keep = False
        try:
            t1 = time.perf_counter()
            status, parsed, raw, headers = await self._upstream_json(request, self._with_filename(body, scratch.name))
            t_llama = time.perf_counter() - t1
            # a file fetched from the store becomes the local copy; a local copy was only linked
            keep = status == 200 and source == "store" and self.local is not None
        except ClientError as e:
            return self.upstream_down(e)
        finally:
            await asyncio.to_thread(self._done_with, scratch, name if keep else None, mx)
        if status != 200 or not isinstance(parsed, dict):
            return web.Response(status=status, body=raw, headers=headers)
        parsed["filename"] = name
        parsed["rdmakv"] = {
            "source": source,
            "local_verified": verified if source == "local" else None,
            "file_bytes": size,
            "prepare_ms": (t1 - t0) * 1e3,
            "llama_restore_ms": t_llama * 1e3,
            "proxy_total_ms": (time.perf_counter() - t0) * 1e3,
            **asdict(rep),
        }
        return web.json_response(parsed)

    def _materialise(self, name: str, scratch: Path, rep) -> tuple[str, int, int, bool]:
        """Put ``name``'s file at ``scratch``: the local copy when it is still the store's version,
        else fetched from the store. (source, bytes, manifest xxh3, verified). In a worker thread."""
        from .slotstore import get_slotfile_parts, manifest_xxh3

        entry = self.local.get(name) if self.local is not None else None
        if entry is not None:
            assert self.local is not None  # (the entry came from it)
            try:
                current = self.store.run(manifest_xxh3, name)
                verified = True
            except NotFoundError:
                self.local.drop(name)  # deleted in the store: so it is here
                raise
            except (RdmakvError, OSError):
                current, verified = entry.manifest_xxh3, False  # the store is down: the copy is all there is
            if current == entry.manifest_xxh3 and self.local.link(entry, scratch):
                rep.transport, rep.tier = "local", "local"
                return "local", entry.size, entry.manifest_xxh3, verified
            self.local.drop(name)  # saved again elsewhere: the store's version wins

        def fetch(store):  # the parts are views of the connection's buffer: write before giving it back
            parts, mx = get_slotfile_parts(store, name, rep)
            self.scratch.write(scratch, parts)
            return sum(memoryview(p).nbytes for p in parts), mx

        size, mx = self.store.run(fetch)
        return "store", size, mx, True

    def _done_with(self, scratch: Path, keep_as: str | None, mx: int) -> None:
        if keep_as is None or self.local is None or not self.local.adopt(keep_as, scratch, mx):
            self.scratch.release(scratch)


def _close_map(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:  # a view outlived the save (an exception's traceback): the GC unmaps it
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rdmakv llama-proxy",
        description="HTTP proxy in front of llama-server that keeps slot saves in an rdmakv store. Start "
        "llama-server with --slot-save-path DIR and give the proxy the same DIR as --slot-dir; point clients "
        f"at the proxy. The store key comes from ${KEY_ENV}.",
    )
    p.add_argument("--upstream", default="http://127.0.0.1:8080", help="llama-server base URL")
    p.add_argument("--slot-dir", required=True, help="llama-server's --slot-save-path directory")
    p.add_argument("--store", required=True, help="rdmakv://HOST:PORT/NAMESPACE where slot files live")
    p.add_argument("--listen", default="127.0.0.1:8081", help="HOST:PORT to listen on (default 127.0.0.1:8081)")
    p.add_argument("--window", type=int, default=256, help="W: positions per chunk (default 256)")
    p.add_argument("--transport", choices=("auto", "rdma", "tcp"), default="auto",
                   help="how restores fetch chunks (saves always use TCP)")
    p.add_argument("--store-connections", type=int, default=DEFAULT_POOL_SIZE,
                   help=f"store connections shared by concurrent slot requests (default {DEFAULT_POOL_SIZE})")
    p.add_argument("--local-cache", metavar="SIZE", type=parse_size,
                   help="keep recently saved and restored slot files on this node, an LRU of SIZE bytes "
                   "(e.g. 4GiB) in SLOT_DIR/.rdmakv-proxy-PID; put the slot dir on tmpfs to keep them in memory")
    p.add_argument("--auto-cache", action="store_true",
                   help="completions (/completion, /v1/completions, /v1/chat/completions) resume from the longest "
                   "prefix stored in the namespace by any conversation or proxy, and every answered slot is saved "
                   "back in the background; no client change")
    p.add_argument("--cache-key", default="",
                   help="with --auto-cache: added to the model identity that prefixes are stored under (give "
                   "different keys to models the proxy cannot tell apart by file name and shape)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus /metrics (auto-cache hits, misses, tokens restored) on HOST:PORT")
    return p


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        from aiohttp import web
    except ImportError:
        print("rdmakv llama-proxy: needs aiohttp: pip install 'rdmakv[llama]'", file=sys.stderr)
        return 1
    if not Path(args.slot_dir).is_dir():
        print(f"rdmakv llama-proxy: --slot-dir {args.slot_dir} is not a directory", file=sys.stderr)
        return 1
    if args.store_connections < 1:
        print("rdmakv llama-proxy: --store-connections must be at least 1", file=sys.stderr)
        return 2
    if args.local_cache is not None and args.local_cache <= 0:
        print("rdmakv llama-proxy: --local-cache must be a positive size", file=sys.stderr)
        return 2
    for name in sweep(Path(args.slot_dir)):
        print(f"rdmakv llama-proxy: removed stale scratch file {name}", file=sys.stderr)
    host, _, port = args.listen.rpartition(":")
    pool = StorePool(args.store, args.transport, args.window, size=args.store_connections)
    try:
        pool.run(lambda store: store.stats())  # fail fast: wrong key, unreachable store
    except (RdmakvError, OSError) as e:
        print(f"rdmakv llama-proxy: store {args.store}: {e}", file=sys.stderr)
        return 1
    local = LocalCache(work_dir(Path(args.slot_dir)) / "cache", args.local_cache) if args.local_cache else None
    proxy = Proxy(args.upstream, args.slot_dir, pool, local)
    metrics = None
    if args.metrics_listen:
        from .proxy_metrics import ProxyMetrics

        metrics = ProxyMetrics()
        try:
            maddr = metrics.listen(args.metrics_listen)
        except (ValueError, OSError) as e:
            print(f"rdmakv llama-proxy: --metrics-listen {args.metrics_listen}: {e}", file=sys.stderr)
            return 2
        print(f"rdmakv llama-proxy: metrics on http://{maddr[0]}:{maddr[1]}/metrics", file=sys.stderr, flush=True)
    if args.auto_cache:
        from .auto_cache import AutoCache

        proxy.auto = AutoCache(proxy, args.window, args.cache_key, metrics)
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    app.on_startup.append(lambda _: proxy.start())
    app.on_cleanup.append(lambda _: proxy.close())
    print(f"rdmakv llama-proxy: http://{host}:{port} -> {args.upstream}, slot files in {args.store}"
          + (f", auto-cache on (W={args.window})" if args.auto_cache else ""), file=sys.stderr, flush=True)
    web.run_app(app, host=host.strip("[]") or "127.0.0.1", port=int(port), print=None, access_log=None)
    return 0
