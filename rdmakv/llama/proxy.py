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
import itertools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import CodecError, ConnectionLost, NotFoundError, RdmakvError
from ..wire.auth import KEY_ENV
from . import slotfile

if TYPE_CHECKING:  # aiohttp is optional: imported where it is used
    from aiohttp import web

T = TypeVar("T")

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip
SLOT_PATH = re.compile(r"^(?P<prefix>.*)/slots/(?P<id>[^/]+)$")


def llama_error(status: int, message: str, etype: str) -> web.Response:
    from aiohttp import web

    return web.json_response({"error": {"code": status, "message": message, "type": etype}}, status=status)


class StorePool:
    """One store connection used from worker threads, reconnected after a failure."""

    def __init__(self, url: str, transport: str, window: int) -> None:
        self.url, self.transport, self.window = url, transport, window
        self._store = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        from ..client import connect

        with self._lock:
            for attempt in range(2):
                if self._store is None:
                    self._store = connect(self.url, transport=self.transport, window=self.window, timeout=30)
                try:
                    return fn(self._store, *args)
                except (NotFoundError, CodecError):
                    raise  # answers, not failures: the connection is still in step
                except Exception as e:
                    # A timeout or reset can leave half a frame on the socket: never reuse it.
                    self._store.close()
                    self._store = None
                    if attempt or not isinstance(e, (ConnectionLost, OSError)):
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
        self._scratch = itertools.count()

    async def start(self) -> None:
        import aiohttp

        # auto_decompress off: bytes pass through exactly as llama-server sent them
        self.session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        await asyncio.to_thread(self.store.close)

    # -- plumbing ----------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
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

    def _scratch_name(self) -> str:
        # valid for llama-server, unique per request, and never a name a client can ask for
        # (clients' names are validated before we substitute this one)
        return f".rdmakv-{os.getpid()}-{next(self._scratch)}.slot"

    @staticmethod
    def _with_filename(body: bytes, name: str) -> bytes:
        parsed = json.loads(body)
        parsed["filename"] = name
        return json.dumps(parsed).encode()

    def _upstream_down(self, e: Exception) -> web.Response:
        return llama_error(502, f"rdmakv llama-proxy: upstream {self.upstream} unreachable: {e}", "server_error")

    async def passthrough(self, request: web.Request, body: bytes) -> web.StreamResponse:
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
            return self._upstream_down(e)

    async def _upstream_json(self, request: web.Request, body: bytes) -> tuple[int, dict | None, bytes, dict]:
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
    async def slot_save(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import ClientError, web

        body = await request.read()
        name = self._filename(body)
        if name is None:  # llama-server answers bad filenames itself, in its own words
            return await self.passthrough(request, body)
        scratch = self.slot_dir / self._scratch_name()
        t0 = time.perf_counter()
        try:
            status, parsed, raw, headers = await self._upstream_json(request, self._with_filename(body, scratch.name))
        except ClientError as e:
            await asyncio.to_thread(_remove, scratch)  # llama-server may have written it before the link broke
            return self._upstream_down(e)
        finally:
            t_llama = time.perf_counter() - t0
        if status != 200 or not isinstance(parsed, dict):
            await asyncio.to_thread(_remove, scratch)
            return web.Response(status=status, body=raw, headers=headers)
        try:
            data = await asyncio.to_thread(scratch.read_bytes)
        except OSError as e:
            return llama_error(500, f"rdmakv llama-proxy: llama-server saved the slot but {scratch} is unreadable "
                               f"({e.strerror}); is --slot-dir the same directory as --slot-save-path?", "server_error")
        from .slotstore import put_slotfile

        try:
            report, parse_error = await asyncio.to_thread(self.store.run, put_slotfile, name, data)
        except (RdmakvError, OSError) as e:
            # keep llama-server's complete file under the client's name: the save is not lost
            await asyncio.to_thread(os.replace, scratch, self.slot_dir / name)
            return llama_error(503, f"rdmakv store {self.store.url} unreachable or refused the save ({e}); the slot "
                               f"file was left in {self.slot_dir} as {name!r}", "unavailable_error")
        await asyncio.to_thread(_remove, scratch)
        parsed["filename"] = name
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
    async def slot_restore(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import ClientError, web

        from ..kvstate import RestoreReport
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
        except CodecError as e:  # e.g. the name holds a KV manifest, not a slot file
            return llama_error(400, f"rdmakv store: {e}", "invalid_request_error")
        except (RdmakvError, OSError) as e:
            return llama_error(503, f"rdmakv store {self.store.url} unreachable: {e}", "unavailable_error")
        # llama-server only opens the scratch file after it is complete and closed
        scratch = self.slot_dir / self._scratch_name()
        try:
            await asyncio.to_thread(scratch.write_bytes, data)
            t1 = time.perf_counter()
            status, parsed, raw, headers = await self._upstream_json(request, self._with_filename(body, scratch.name))
            t_llama = time.perf_counter() - t1
        except ClientError as e:
            return self._upstream_down(e)
        finally:
            await asyncio.to_thread(_remove, scratch)
        if status != 200 or not isinstance(parsed, dict):
            return web.Response(status=status, body=raw, headers=headers)
        parsed["filename"] = name
        parsed["rdmakv"] = {
            "file_bytes": len(data),
            "llama_restore_ms": t_llama * 1e3,
            "proxy_total_ms": (time.perf_counter() - t0) * 1e3,
            **asdict(rep),
        }
        return web.json_response(parsed)


def sweep_scratch(slot_dir: Path) -> list[str]:
    """Remove scratch files left by a proxy that died mid-request (its pid is gone); returns their names."""
    removed = []
    for p in slot_dir.glob(".rdmakv-*-*.slot"):
        try:
            os.kill(int(p.name.split("-")[1]), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
            removed.append(p.name)
        except (ValueError, OSError):  # not our naming, or a live process of another user
            pass
    return removed


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
    for name in sweep_scratch(Path(args.slot_dir)):
        print(f"rdmakv llama-proxy: removed stale scratch file {name}", file=sys.stderr)
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
