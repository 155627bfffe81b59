"""`rdmakv llama-proxy --auto-cache`: completions resume from the longest stored prefix by themselves.

For each managed completion (``completion_request``) the proxy

1. learns the prompt's tokens from llama-server (``/apply-template`` for chats, ``/tokenize``),
   and the model's identity (``/v1/models``), which seeds the prefix names;
2. asks the store for the longest stored prefix (``prefix_store.longest_prefix``) while it asks
   llama-server which slots hold what (``/slots``, reconciled in the ``SlotTable``);
3. leases a slot: one already holding the longest prefix, or one to restore the stored prefix
   into (the entry is fetched, its tokens checked against the prompt, a slot file written and
   llama-server's own slot restore loads it);
4. forwards the request pinned to that slot (``id_slot``, ``cache_prompt: true``) and streams
   the answer back, with ``X-Rdmakv-*`` headers (and an ``rdmakv`` field in a JSON answer);
5. after the answer has been sent, saves the slot in the background and registers its
   prefixes in the store (``prefix_store.register``), releasing the slot once llama-server has
   written the file.

The store being down never fails a request: it is a miss (logged once), and llama-server
prefills as it would alone.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..client.reports import RestoreReport
from ..errors import NotFoundError, RdmakvError
from . import completion_request as cr
from . import prefix_entry as pe
from . import prefix_names as pn
from . import prefix_store as ps
from . import slotfile
from .mapped_scratch import MappedScratch
from .proxy_metrics import ProxyMetrics
from .scratch import remove
from .slot_table import SlotsBusyError, SlotTable, signature

if TYPE_CHECKING:
    from aiohttp import web

    from .upstream import Upstream

UPSTREAM_CALL_S = 60.0  # one of the proxy's own calls to llama-server (tokenize, slots, save, restore)
STORE_CALL_S = 10.0  # a lookup or a prefix fetch; past it the request goes on without the store
STORE_RETRY_S = 2.0  # after a failure, requests skip the store this long before trying it again
MAX_PENDING_SAVES = 8  # slot files saved and waiting to be registered; past it a response's slot is not saved
SETTLE_POLLS = 20  # /slots asked at most this often (10 ms apart) for the answered slot to be released
MAX_REGISTERING = 1  # registered one at a time: a worker thread and a store connection, never more


class _Bypass(Exception):
    """llama-server did not answer the proxy's own call: hand the request over untouched."""


class StoreHealth:
    """Says once that the store is unreachable, once that it is back; skips it meanwhile."""

    def __init__(self, url: str, metrics: ProxyMetrics) -> None:
        self.url, self.metrics = url, metrics
        self.down_since: float | None = None
        self.retry_at = 0.0

    def usable(self) -> bool:
        return self.down_since is None or time.monotonic() >= self.retry_at

    def failed(self, e: BaseException) -> None:
        self.metrics.store_errors.inc()
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log(f"store {self.url} unreachable ({type(e).__name__}: {e}); completions go to llama-server "
                "without the auto-cache until it answers again")  # fmt: skip
        self.retry_at = now + STORE_RETRY_S

    def ok(self) -> None:
        if self.down_since is not None:
            log(f"store {self.url} answers again after {time.monotonic() - self.down_since:.1f} s; auto-cache on")
            self.down_since = None


def log(message: str) -> None:
    print(f"rdmakv llama-proxy: {message}", file=sys.stderr, flush=True)


class AutoCache:
    def __init__(self, proxy: Upstream, window: int, cache_key: str = "", metrics: ProxyMetrics | None = None) -> None:
        self.proxy, self.window, self.cache_key = proxy, window, cache_key
        self.metrics = metrics or ProxyMetrics()
        self.slots = SlotTable()
        self.mapped = MappedScratch(proxy.slot_dir)
        self.health = StoreHealth(proxy.store.url, self.metrics)
        self.n_stream: int | None = None  # llama-server's stream count, once a restore or save showed it
        self.shape: pe.Shape | None = None  # its cache's shape, from its own saves
        self.pending_saves = 0
        self._registering: asyncio.Semaphore | None = None
        self.closing = False
        self._tasks: set[asyncio.Task] = set()
        self._told: set[str] = set()

    async def close(self) -> None:
        self.closing = True
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        self.mapped.close()

    # -- llama-server --------------------------------------------------------------------------
    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One of the proxy's own calls; retried once on a fresh connection (llama-server restarted
        behind a kept-alive one), else _Bypass."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=UPSTREAM_CALL_S)
        for attempt in range(2):
            try:
                async with self.proxy.session.request(method, self.proxy.upstream + path, json=body, timeout=timeout,
                                                      headers={"Accept-Encoding": "identity"}) as r:  # fmt: skip
                    raw = await r.read()
                    try:
                        return r.status, json.loads(raw)
                    except ValueError:
                        return r.status, None
            except (TimeoutError, aiohttp.ClientError) as e:
                self._forget_upstream()
                if attempt:
                    raise _Bypass(f"llama-server {path}: {e}") from e
        raise AssertionError("unreachable")

    def _forget_upstream(self) -> None:
        """llama-server may have restarted (maybe with another model or -np): trust nothing kept."""
        self.slots.forget_all()
        self.n_stream, self.shape = None, None

    async def _refresh_slots(self) -> None:
        status, listing = await self._call("GET", "/slots")
        if status == 200 and isinstance(listing, list) and all(isinstance(s, dict) for s in listing):
            if len(listing) != self.slots.n_slots:
                self.n_stream = None  # another -np: another stream count
            self.slots.reconcile(listing)
        elif not self.slots.n_slots:  # /slots turned off (--no-slots): the count from /props, memory only
            status, props = await self._call("GET", "/props")
            n = props.get("total_slots") if isinstance(props, dict) else None
            if not isinstance(n, int) or n < 1:
                raise _Bypass("llama-server says neither /slots nor total_slots")
            self.slots.resize(n)

    async def _tokens(self, req: cr.Completion) -> tuple[np.ndarray, bytes]:
        prompt = req.prompt
        if req.kind == "chat":
            status, res = await self._call("POST", "/apply-template", req.body)
            if status != 200 or not isinstance(res, dict) or not isinstance(res.get("prompt"), str):
                raise _Bypass(f"/apply-template answered {status}")
            prompt = res["prompt"]
        (st_tok, tok), (st_models, models) = await asyncio.gather(
            self._call("POST", "/tokenize", {"content": prompt, "add_special": True, "parse_special": True}),
            self._call("GET", "/v1/models"),
        )
        if st_tok != 200 or not isinstance(tok, dict) or st_models != 200:
            raise _Bypass(f"/tokenize answered {st_tok}, /v1/models {st_models}")
        try:
            tokens = pn.as_tokens(tok.get("tokens"))
        except (TypeError, ValueError) as e:
            raise _Bypass(f"/tokenize gave no token list: {e}") from None
        return tokens, pn.seed(cr.model_key(models, self.cache_key), self.window)

    # -- the store -----------------------------------------------------------------------------
    async def _store(self, fn, *args) -> Any:
        """``fn(store, *args)`` on a pooled connection in a worker thread, bounded in time."""
        return await asyncio.wait_for(asyncio.to_thread(self.proxy.store.run, fn, *args), STORE_CALL_S)

    async def _lookup(self, h0: bytes, tokens: np.ndarray) -> ps.Found:
        if not self.health.usable() or len(tokens) == 0:
            return ps.Found()
        try:
            found = await self._store(ps.longest_prefix, h0, tokens, self.window)
        except (TimeoutError, RdmakvError, OSError) as e:
            self.health.failed(e)
            return ps.Found()
        self.health.ok()
        return found

    # -- a completion --------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        from .upstream import llama_error

        raw = await request.read()
        req = cr.parse(request.path, raw)
        if req is None:
            return await self.proxy.passthrough(request, raw)
        t0 = time.perf_counter()
        try:
            tokens, h0 = await self._tokens(req)
            t_tokens = time.perf_counter()
            lookup = asyncio.ensure_future(self._lookup(h0, tokens))
            try:
                await self._refresh_slots()
            finally:
                found = await lookup
            choice = await self.slots.acquire(tokens, found.length, req.pinned, self._refresh_slots)
        except _Bypass as e:
            self._tell_once("bypass", f"a completion went to llama-server without the auto-cache: {e}")
            return await self.proxy.passthrough(request, raw)
        except SlotsBusyError as e:
            return llama_error(503, f"rdmakv llama-proxy: {e}", "unavailable_error")
        report: dict[str, Any] = {"slot": choice.slot, "prompt_tokens": len(tokens),
                                  "slot_prefix_tokens": choice.slot_prefix, "stored_prefix_tokens": found.length,
                                  "tokens_restored": 0, "restore_ms": 0.0, "prefix_source": "none",
                                  "tokenize_ms": (t_tokens - t0) * 1e3,
                                  "lookup_ms": (time.perf_counter() - t_tokens) * 1e3}  # fmt: skip
        try:
            if choice.restore:
                await self._restore(choice.slot, found, tokens, report)
            if report["tokens_restored"]:
                source = "store"
            elif choice.slot_prefix:
                source = "slot"
            else:
                source = "none"
            report["prefix_source"] = source
            if source == "none":
                self.metrics.misses.inc()
            else:
                self.metrics.hits.labels(source).inc()
            report["prepare_ms"] = (time.perf_counter() - t0) * 1e3
            resp, ok = await self._forward(request, req, choice.slot, report)
        except BaseException:
            await self.slots.release(choice.slot)
            raise
        if ok:
            self._spawn(self._after(choice.slot, tokens, found.length, h0))
        else:
            await self.slots.release(choice.slot)
        return resp

    async def _restore(self, slot: int, found: ps.Found, tokens: np.ndarray, report: dict) -> None:
        """Load the stored prefix into ``slot``; on any failure the completion just prefills."""
        t0 = time.perf_counter()
        scratch = self.proxy.scratch.path()
        rep = RestoreReport()
        try:
            entry, mapped = await self._store(self._materialise, found.name, tokens, scratch, self.n_stream, rep)
        except (NotFoundError, pe.PrefixEntryError, _Mismatch) as e:  # evicted since, or not this prompt's
            self._restore_failed("stale" if isinstance(e, NotFoundError) else "mismatch", e)
            await asyncio.to_thread(remove, scratch)
            return
        except (TimeoutError, RdmakvError, OSError) as e:
            self.health.failed(e)
            self._restore_failed("store", e)
            await asyncio.to_thread(remove, scratch)
            return
        report["fetch_ms"] = (time.perf_counter() - t0) * 1e3
        report["transport"] = rep.transport
        try:
            written = self.n_stream or entry.shape.n_stream
            tries = [written] + [n for n in (1, self.slots.n_slots) if n != written and self.n_stream is None]
            for n in tries:
                if n != written:  # llama-server refused that stream count: the file takes the other
                    await asyncio.to_thread(_retarget, scratch, entry.n_tokens, written, n)
                    written = n
                status, res = await self._call("POST", f"/slots/{slot}?action=restore", {"filename": scratch.name})
                if status == 200 and isinstance(res, dict) and res.get("n_restored") == entry.n_tokens:
                    self.n_stream = n
                    report["tokens_restored"] = entry.n_tokens
                    report["llama_restore_ms"] = (res.get("timings") or {}).get("restore_ms")
                    self.metrics.tokens_restored.inc(entry.n_tokens)
                    break
            else:
                self._restore_failed("llama-server", RuntimeError(f"llama-server refused the file: {status} {res}"))
        except _Bypass as e:
            self._restore_failed("llama-server", e)
        finally:
            if mapped is not None:
                await asyncio.to_thread(self.mapped.give_back, scratch, mapped)
            else:
                await asyncio.to_thread(self.proxy.scratch.release, scratch)
            report["restore_ms"] = (time.perf_counter() - t0) * 1e3
            self.metrics.restore_seconds.observe(time.perf_counter() - t0)

    def _materialise(self, store, name: str, tokens: np.ndarray, path: Path, n_stream: int | None,
                     rep: RestoreReport) -> tuple[pe.Entry, mmap.mmap | None]:  # fmt: skip
        """Fetch the entry into its slot file at ``path``, checked to be this prompt's prefix for this
        server (in a worker thread, on one pooled connection). Over TCP the chunks land in a kept
        mapped file (returned, to be given back); by RDMA they are READ into registered memory and
        written out from there (as is a transposed V, whose chunks have no place of their own)."""
        if store.active_transport == "tcp":
            got = ps.fetch_into_map(store, name, self.mapped, path, n_stream, rep)
            if got is not None:
                entry, held, m = got
                try:
                    self._check(name, entry, held, tokens)
                except BaseException:
                    self.mapped.give_back(path, m)
                    raise
                return entry, m
        entry, pieces = ps.fetch_entry(store, name, rep)
        self._check(name, entry, pe.entry_tokens(entry, pieces), tokens)
        self.proxy.scratch.write(path, pe.synthesize(entry, pieces, n_stream))
        return entry, None

    def _check(self, name: str, entry: pe.Entry, held: np.ndarray, tokens: np.ndarray) -> None:
        if len(held) > len(tokens) or not np.array_equal(held, tokens[: len(held)]):
            raise _Mismatch(f"entry {name} holds other tokens than the prompt (a hash collision)")
        if self.shape is not None and not self.shape.same_cache(entry.shape):
            raise _Mismatch(f"entry {name} was saved from a cache of another shape")

    def _restore_failed(self, reason: str, e: BaseException) -> None:
        self.metrics.restore_failures.labels(reason).inc()
        self._tell_once(f"restore-{reason}", f"a stored prefix was not restored ({reason}: {e}); the completion "
                        "prefilled instead")  # fmt: skip

    def _tell_once(self, what: str, message: str) -> None:
        if what not in self._told:
            self._told.add(what)
            log(message + " (said once)")

    async def _forward(self, request: web.Request, req: cr.Completion, slot: int, report: dict
                       ) -> tuple[web.StreamResponse, bool]:  # fmt: skip
        """The completion to llama-server pinned to ``slot``; its answer streamed back with the report.
        (response, whether llama-server answered it)."""
        from aiohttp import ClientError, web

        headers_out = {"X-Rdmakv-Slot": str(slot), "X-Rdmakv-Tokens-Restored": str(report["tokens_restored"]),
                       "X-Rdmakv-Restore-Ms": f"{report['restore_ms']:.3f}",
                       "X-Rdmakv-Prefix-Source": report["prefix_source"],
                       "X-Rdmakv-Report": json.dumps(report, separators=(",", ":"))}  # all of it, for streams too
        try:
            async with await self.proxy.forward_body(request, req.forwarded(slot)) as up:
                headers = {**self.proxy.clean_headers(up.headers), **headers_out}
                if not req.stream and up.status == 200:
                    raw = await up.read()
                    try:
                        parsed = json.loads(raw)
                    except ValueError:
                        parsed = None
                    if isinstance(parsed, dict):
                        parsed["rdmakv"] = report
                        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
                        resp: web.StreamResponse = web.json_response(parsed, headers=headers)
                    else:
                        resp = web.Response(status=up.status, body=raw, headers=headers)
                    await resp.prepare(request)  # sent before the background save starts
                    await resp.write_eof()
                    return resp, True
                resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp, up.status == 200
        except ClientError as e:
            self._forget_upstream()
            return self.proxy.upstream_down(e), False

    # -- after the response ------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after(self, slot: int, tokens: np.ndarray, stored: int, h0: bytes) -> None:
        """Record what the slot holds and save it, then release it; register its prefixes."""
        saved = None
        try:
            sig, n_now = None, None
            try:
                for _ in range(SETTLE_POLLS):  # the answer can reach us just before the slot is released
                    status, listing = await self._call("GET", "/slots")
                    if status != 200 or not isinstance(listing, list) or slot >= len(listing):
                        break
                    sig, n_now = signature(listing[slot]), listing[slot].get("n_prompt_tokens")
                    if not listing[slot].get("is_processing"):
                        break
                    await asyncio.sleep(0.01)
            except _Bypass:
                return  # llama-server is gone: nothing to record or save
            held = tokens if n_now is None or n_now >= len(tokens) else tokens[:0]  # truncated: unknown
            if self._worth_saving(n_now, stored):
                saved = await self._save(slot)
                if saved is not None:  # a copy: the file's pages are reused once it is registered
                    held = np.array(saved[1].tokens, dtype=np.int32)
            self.slots.record(slot, held, sig)
        finally:
            await self.slots.release(slot)
        if saved is not None:
            await self._register(saved, h0, len(tokens))

    def _worth_saving(self, n_now: int | None, stored: int) -> bool:
        if self.closing or not self.health.usable():
            return False
        if n_now is not None and n_now <= stored:
            return False  # nothing beyond what the store holds
        if self.pending_saves >= MAX_PENDING_SAVES:
            self.metrics.saves.labels("skipped").inc()
            return False
        return True

    async def _save(self, slot: int):
        """llama-server saves the slot into a scratch file; (path, parsed file, map) or None."""
        self.pending_saves += 1
        scratch = self.proxy.scratch.path()
        try:
            status, res = await self._call("POST", f"/slots/{slot}?action=save", {"filename": scratch.name})
            if status != 200:
                raise RuntimeError(f"llama-server answered {status}: {res}")
            parsed, m = await asyncio.to_thread(_map_and_parse, scratch)
            self.n_stream = parsed.blocks[0].n_stream or 1
            return scratch, parsed, m
        except (_Bypass, RuntimeError, OSError, slotfile.SlotFileError) as e:
            self.pending_saves -= 1
            self.metrics.saves.labels("failed").inc()
            self._tell_once("save", f"a slot could not be saved after a response: {e}")
            await asyncio.to_thread(remove, scratch)
            return None

    async def _register(self, saved, h0: bytes, prompt_len: int) -> None:
        if self._registering is None:
            self._registering = asyncio.Semaphore(MAX_REGISTERING)
        try:
            async with self._registering:
                rep = await asyncio.to_thread(self._ingest, saved, h0, prompt_len)
            self.health.ok()
            self.metrics.entries.inc(rep.committed)
            self.metrics.saves.labels("ok").inc()
            if rep.skipped_reason:
                self._tell_once("register", f"prefixes not all registered: {rep.skipped_reason}")
        except pe.Unsupported as e:
            self.metrics.saves.labels("failed").inc()
            self._tell_once("unsupported", f"this llama-server's slots cannot be cut into prefixes: {e}")
        except (RdmakvError, OSError) as e:
            self.health.failed(e)
            self.metrics.saves.labels("failed").inc()
        finally:
            self.pending_saves -= 1

    def _ingest(self, saved, h0: bytes, prompt_len: int) -> ps.Registered:
        """Cut the saved file and register its prefixes, then let the file go (a worker thread)."""
        scratch, parsed, m = saved
        saved = None
        cut: pe.Cut | None = None
        try:
            cut = pe.cut(parsed, self.window)
            self.shape = cut.shape
            return self.proxy.store.run(ps.register, cut, h0, (prompt_len,), lambda: self.closing)
        finally:
            cut = parsed = None  # the chunks are views of the map: drop them before unmapping it
            _close(m)
            self.proxy.scratch.release(scratch)


class _Mismatch(Exception):
    """A found entry that does not fit the prompt or the server."""


def _map_and_parse(path: Path) -> tuple[slotfile.SlotFile, mmap.mmap]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    try:
        return slotfile.parse(memoryview(m)), m
    except BaseException:
        _close(m)
        raise


def _close(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:  # a view still alive (a traceback): the GC unmaps it
        pass


def _retarget(path: Path, n_tokens: int, old: int, new: int) -> None:
    """Change a synthesized file's stream count in place: the count after the token words, and
    the empty streams' zero counts at the end."""
    at = 12 + 4 * n_tokens
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), new.to_bytes(4, "little"), at)
        size = os.fstat(f.fileno()).st_size
        os.ftruncate(f.fileno(), size - 4 * (old - 1))
        os.pwrite(f.fileno(), bytes(4 * (new - 1)), size - 4 * (old - 1))
