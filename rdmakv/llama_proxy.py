"""`rdmakv llama-proxy`: keeps llama-server's slot saves in an rdmakv store, with no patch to llama-server.

Every request is passed through unchanged (bodies and streamed responses alike)
except ``POST /slots/{id}?action=save|restore``:

- save: llama-server writes the slot file into its ``--slot-save-path`` (our
  ``--slot-dir``); the proxy ingests it into the store (chunked, deduplicated,
  a one-round-trip warm save when every chunk is already there), removes the
  local file and answers llama-server's JSON plus an ``rdmakv`` report.
- restore: the proxy materialises the file from the store (over RDMA when the
  connection can) by writing it aside and renaming it into place, forwards the
  restore, then removes the file.

Errors use llama-server's error shape. An unreachable store is a 503 with a
clear message, and never leaves a half-written slot file behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from . import slotfile
from .auth import KEY_ENV
from .errors import ConnectionLost, NotFoundError, RdmakvError

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip
SLOT_PATH = re.compile(r"^(?P<prefix>.*)/slots/(?P<id>[^/]+)$")


def llama_error(status: int, message: str, etype: str):
    from aiohttp import web

    return web.json_response({"error": {"code": status, "message": message, "type": etype}}, status=status)


class StorePool:
    """One store connection used from worker threads, reconnected after a failure."""

    def __init__(self, url: str, transport: str, window: int) -> None:
        self.url, self.transport, self.window = url, transport, window
        self._store = None
        self._lock = threading.Lock()

    def run(self, fn, *args):
        from .client import connect

        with self._lock:
            for attempt in range(2):
                if self._store is None:
                    self._store = connect(self.url, transport=self.transport, window=self.window, timeout=30)
                try:
                    return fn(self._store, *args)
                except ConnectionLost:
                    self._store.close()
                    self._store = None
                    if attempt:
                        raise
            raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


class Proxy:
    def __init__(self, upstream: str, slot_dir: str, store: StorePool) -> None:
        self.upstream = upstream.rstrip("/")
        self.slot_dir = Path(slot_dir)
        self.store = store
        self.session = None

    async def start(self) -> None:
        import aiohttp

        # auto_decompress off: bytes pass through exactly as llama-server sent them
        self.session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        await asyncio.to_thread(self.store.close)

    # -- plumbing ----------------------------------------------------------------------------
    async def handle(self, request):
        m = SLOT_PATH.match(request.path)
        action = request.query.get("action")
        if m and request.method == "POST" and action in ("save", "restore"):
            return await (self.slot_save if action == "save" else self.slot_restore)(request)
        return await self.passthrough(request, await request.read())

    def _headers(self, headers) -> dict:
        return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}

    async def _forward(self, request, body: bytes):
        return self.session.request(
            request.method, self.upstream + request.path_qs, headers=self._headers(request.headers), data=body
        )

    async def passthrough(self, request, body: bytes):
        from aiohttp import ClientError, web

        try:
            async with await self._forward(request, body) as up:
                resp = web.StreamResponse(status=up.status, reason=up.reason, headers=self._headers(up.headers))
                await resp.prepare(request)
                async for chunk in up.content.iter_any():  # streaming completions pass through as they come
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except ClientError as e:
            return llama_error(502, f"rdmakv llama-proxy: upstream {self.upstream} unreachable: {e}", "server_error")

    async def _upstream_json(self, request, body: bytes) -> tuple[int, dict | None, bytes, dict]:
        async with await self._forward(request, body) as up:
            raw = await up.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            return up.status, parsed, raw, self._headers(up.headers)

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
    async def slot_save(self, request):
        from aiohttp import web

        body = await request.read()
        name = self._filename(body)
        if name is None:  # llama-server answers bad filenames itself, in its own words
            return await self.passthrough(request, body)
        t0 = time.perf_counter()
        status, parsed, raw, headers = await self._upstream_json(request, body)
        t_llama = time.perf_counter() - t0
        if status != 200 or not isinstance(parsed, dict):
            return web.Response(status=status, body=raw, headers=headers)
        path = self.slot_dir / name
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as e:
            return llama_error(500, f"rdmakv llama-proxy: llama-server saved the slot but {path} is unreadable "
                               f"({e.strerror}); is --slot-dir the same directory as --slot-save-path?", "server_error")
        from .slotstore import put_slotfile

        try:
            report, parse_error = await asyncio.to_thread(self.store.run, put_slotfile, name, data)
        except (RdmakvError, OSError) as e:
            return llama_error(503, f"rdmakv store unreachable or refused the save ({e}); the slot file was left "
                               f"in {self.slot_dir}", "unavailable_error")
        await asyncio.to_thread(path.unlink, missing_ok=True)
        parsed["rdmakv"] = {
            "stored_as": name,
            "chunked": not parse_error,
            "parse_error": parse_error or None,
            "file_bytes": len(data),
            "llama_save_ms": t_llama * 1e3,
            "proxy_total_ms": (time.perf_counter() - t0) * 1e3,
            **asdict(report),
        }
        return web.json_response(parsed)

    # -- restore -----------------------------------------------------------------------------
    async def slot_restore(self, request):
        from aiohttp import web

        from .kvstate import RestoreReport
        from .slotstore import get_slotfile

        body = await request.read()
        name = self._filename(body)
        if name is None:
            return await self.passthrough(request, body)
        t0 = time.perf_counter()
        rep = RestoreReport()
        try:
            data = await asyncio.to_thread(self.store.run, get_slotfile, name, rep)
        except NotFoundError:
            return llama_error(404, f"slot file {name!r} is not in the rdmakv store", "not_found_error")
        except (RdmakvError, OSError) as e:
            return llama_error(503, f"rdmakv store unreachable: {e}", "unavailable_error")
        path = self.slot_dir / name
        tmp = self.slot_dir / f".rdmakv-{os.getpid()}-{id(request):x}.tmp"
        try:
            await asyncio.to_thread(_write_atomically, tmp, path, data)
            t1 = time.perf_counter()
            status, parsed, raw, headers = await self._upstream_json(request, body)
            t_llama = time.perf_counter() - t1
        finally:
            await asyncio.to_thread(_remove, tmp, path)
        if status != 200 or not isinstance(parsed, dict):
            return web.Response(status=status, body=raw, headers=headers)
        parsed["rdmakv"] = {
            "file_bytes": len(data),
            "llama_restore_ms": t_llama * 1e3,
            "proxy_total_ms": (time.perf_counter() - t0) * 1e3,
            **asdict(rep),
        }
        return web.json_response(parsed)


def _write_atomically(tmp: Path, path: Path, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # llama-server sees the whole file or none


def _remove(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
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
    host, _, port = args.listen.rpartition(":")
    pool = StorePool(args.store, args.transport, args.window)
    try:
        pool.run(lambda store: store.stats())  # fail fast: wrong key, unreachable store
    except (RdmakvError, OSError) as e:
        print(f"rdmakv llama-proxy: store {args.store}: {e}", file=sys.stderr)
        return 1
    proxy = Proxy(args.upstream, args.slot_dir, pool)
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    app.on_startup.append(lambda _: proxy.start())
    app.on_cleanup.append(lambda _: proxy.close())
    print(f"rdmakv llama-proxy: http://{host}:{port} -> {args.upstream}, slot files in {args.store}",
          file=sys.stderr, flush=True)
    web.run_app(app, host=host.strip("[]") or "127.0.0.1", port=int(port), print=None, access_log=None)
    return 0
