"""The measurements. Each returns plain dicts (JSON-ready) and never asserts on numbers."""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

import rdmakv
from rdmakv import kvgen
from rdmakv.cli import demo
from rdmakv.client.store import connect as connect_node
from rdmakv.kvgen import QWEN25_05B
from rdmakv.store.server.spawn import ServerProcess

from .stats import summary


@dataclass
class Ctx:
    server: ServerProcess
    key: str
    rdma: bool  # both ends can do RDMA
    rdma_reason: str
    out_dir: str
    quick: bool
    # label -> {"expected": transport, "seen": {transport the report gave: count}}, for every timed op
    ops: dict = field(default_factory=dict)

    def runs(self) -> int:
        """Timed operations so far (the progress line shows them)."""
        return sum(n for e in self.ops.values() for n in e["seen"].values())

    def record(self, label: str, expected: str, actual: str, n: int = 1) -> None:
        e = self.ops.setdefault(label, {"expected": expected, "seen": {}})
        e["seen"][actual] = e["seen"].get(actual, 0) + n

    # demo.* scenario functions take an object with url(ns) and key
    def url(self, ns: str) -> str:
        return self.server.url(ns)

    def connect(self, ns: str, transport: str, window: int = 64, **kw) -> rdmakv.Store:
        return connect_node(self.url(ns), key=self.key, transport=transport, window=window, **kw)

    def transports(self) -> list[str]:
        return ["tcp", "rdma"] if self.rdma else ["tcp"]


def session(n_tokens: int, seed: int = 1) -> rdmakv.KVState:
    return kvgen.generate(kvgen.token_stream(seed, n_tokens), QWEN25_05B)


def seed_scenarios(ctx: Ctx) -> dict:
    chat = demo.chat_scenario(ctx, "tcp")
    shared = demo.shared_prompt_scenario(ctx)
    t3 = chat["turns"][2]
    return {
        "chat_turns": demo.CHAT_TURNS,
        "bytes_on_wire": {
            "v1_blob_turn3": t3["v1"]["server_received"],
            "chunked_turn3_W64": t3["W=64"]["server_received"],
            "manifest_turn3_W64": t3["W=64"]["manifest_bytes"],
            "shared_prefix_last_save_W8": shared["last_save_received"]["W=8"],
            "shared_prefix_last_save_W64": shared["last_save_received"]["W=64"],
        },
        "chat": chat,
        "chat_storage": chat["storage"],
        "shared_prompt_storage": shared["storage"],
        "reference": demo.REFERENCE,
    }


def _v1_save(path: str, kv: rdmakv.KVState, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(kvgen.encode_v1(kv))
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _v1_restore(path: str) -> rdmakv.KVState:
    with open(path, "rb") as f:
        return kvgen.decode_v1(f.read())


def walls(ctx: Ctx, runs: int, fsync: bool) -> dict:
    """Cold save, warm save and restore of the 256-token session at W=64, interleaved."""
    kvs = [session(256, 1000 + i) for i in range(runs + 1)]
    ref = kvs[0]
    samples: dict[str, list[float]] = {"cold_save": [], "warm_save": [], "v1_save": [], "v1_restore": []}
    for t in ctx.transports():
        samples[f"restore_{t}"] = []
    stores = {t: ctx.connect("walls", t) for t in ctx.transports()}
    if ctx.rdma:  # the RDMA restore with its lookup over TCP (GET_MANIFEST), as before the index
        samples["restore_rdma_tcp_lookup"] = []
        stores["rdma_tcp_lookup"] = ctx.connect("walls", "rdma")
        lookup_by_tcp = stores["rdma_tcp_lookup"].rdma
        assert lookup_by_tcp is not None  # (connected by RDMA)
        lookup_by_tcp.one_sided = False
    tcp = stores["tcp"]
    tmp = tempfile.mkdtemp(dir=ctx.out_dir, prefix="v1-")
    v1 = os.path.join(tmp, "session.v1")
    reads = 0
    lookups: dict[str, int] = {}
    try:
        tcp.save("ref", ref)
        for st in stores.values():
            st.restore("ref")
        _v1_save(v1, ref, fsync)
        for i in range(runs):
            for label, rep in (("cold_save", tcp.save(f"cold{i}", kvs[i + 1])), ("warm_save", tcp.save("ref", ref))):
                samples[label].append(rep.wall_s)
                ctx.record(f"walls.{label}", "tcp", rep.transport)
            for t, st in stores.items():
                t0 = time.perf_counter()
                _, rrep = st.restore("ref", report=True)
                samples[f"restore_{t}"].append(time.perf_counter() - t0)
                ctx.record(f"walls.restore_{t}", "tcp" if t == "tcp" else "rdma", rrep.transport)
                if t == "rdma":
                    lookups[rrep.lookup] = lookups.get(rrep.lookup, 0) + 1
                if t == "rdma":
                    reads = rrep.reads_posted
            t0 = time.perf_counter()
            _v1_save(v1, ref, fsync)
            samples["v1_save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _v1_restore(v1)
            samples["v1_restore"].append(time.perf_counter() - t0)
    finally:
        for st in stores.values():
            st.close()
        shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, Any] = {k: summary(v) for k, v in samples.items()}
    out["kv_bytes"] = ref.nbytes
    out["window"] = 64
    out["rdma_reads_per_restore"] = reads
    out["rdma_lookups"] = lookups  # how each restore_rdma found its session (one-sided or tcp)
    out["v1_fsync"] = fsync
    return out


def _restore_samples(
    ctx: Ctx, label: str, transport: str, st: rdmakv.Store, name: str, runs: int
) -> tuple[list[float], rdmakv.RestoreReport]:
    """Timed restores; each one's reported transport is recorded under ``label``."""
    st.restore(name)  # warm the pool and caches
    samples = []
    rep = None
    for _ in range(runs):
        t0 = time.perf_counter()
        _, rep = st.restore(name, report=True)
        samples.append(time.perf_counter() - t0)
        ctx.record(label, transport, rep.transport)
    assert rep is not None
    return samples, rep


def scaling(ctx: Ctx, sizes: list[int], windows: list[int], fixed: int, runs: int) -> dict:
    by_size = []
    for n in sizes:
        kv = session(n, 7)
        reps = max(3, runs if n <= 1024 else runs // 3 if n <= 4096 else 5)
        row: dict = {"tokens": n, "bytes": kv.nbytes, "runs": reps}
        with ctx.connect("scale", "tcp", 64) as writer:
            writer.save(f"s{n}", kv)
        del kv
        for t in ctx.transports():
            with ctx.connect("scale", t, 64) as st:
                samples, rep = _restore_samples(ctx, f"scaling.by_size.{n}.{t}", t, st, f"s{n}", reps)
            row[t] = {**summary(samples), "reads_posted": rep.reads_posted, "chunks": rep.chunks}
        by_size.append(row)
        with ctx.connect("scale", "tcp", 64) as writer:
            writer.delete_manifest(f"s{n}")  # free the slab (and the guest's RAM) for what follows
    by_window = []
    kv = session(fixed, 8)
    for w in windows:
        row = {"window": w, "tokens": fixed, "bytes": kv.nbytes}
        with ctx.connect(f"scale-w{w}", "tcp", w) as st:
            row["cold_save"] = summary([st.save("s", kv).wall_s])
        for t in ctx.transports():
            with ctx.connect(f"scale-w{w}", t, w) as st:
                samples, rep = _restore_samples(ctx, f"scaling.by_window.{w}.{t}", t, st, "s", runs)
            row[t] = {**summary(samples), "reads_posted": rep.reads_posted, "chunks": rep.chunks}
        by_window.append(row)
    return {"by_size": by_size, "by_window": by_window}


def server_cpu(ctx: Ctx, restores: int) -> dict:
    kv = session(256, 3)
    out: dict = {"restores": restores, "clk_tck": os.sysconf("SC_CLK_TCK")}
    with ctx.connect("cpu", "tcp") as w:
        w.save("s", kv)
    for t in ctx.transports():
        with ctx.connect("cpu", t) as st:
            st.restore("s")
            c0 = ctx.server.cpu_ticks()
            seen = [st.restore("s", report=True)[1].transport for _ in range(restores)]
            ticks = ctx.server.cpu_ticks() - c0
            for actual in set(seen):
                ctx.record(f"server_cpu.{t}", t, actual, seen.count(actual))
        out[t] = {"ticks": ticks, "ms_per_restore": ticks / out["clk_tck"] / restores * 1e3}
    if "rdma" in out:
        out["rdma_over_tcp"] = out["rdma"]["ticks"] / max(1, out["tcp"]["ticks"])
    return out


def _concurrent_client(args: tuple) -> tuple[int, float, float, dict]:
    url, key, transport, name, reps, start_at = args
    with connect_node(url, key=key, transport=transport, window=64) as st:
        st.restore(name)
        while time.time() < start_at:
            time.sleep(0.001)
        t0 = time.time()
        total = 0
        seen: dict[str, int] = {}
        for _ in range(reps):
            kv, rep = st.restore(name, report=True)
            total += kv.nbytes
            seen[rep.transport] = seen.get(rep.transport, 0) + 1
        return total, t0, time.time(), seen


def concurrency(ctx: Ctx, clients: list[int], reps: int, tokens: int) -> dict:
    with ctx.connect("conc", "tcp") as w:
        for i in range(max(clients)):
            w.save(f"c{i}", session(tokens, 500 + i))
    out: dict = {"tokens": tokens, "reps_per_client": reps, "rows": []}
    mpctx = mp.get_context("spawn")  # fork: the children share the parent's verbs state and pinned pages
    for n in clients:
        row: dict = {"clients": n}
        for t in ctx.transports():
            with mpctx.Pool(n) as pool:
                start_at = time.time() + 3.0 + 0.5 * n  # spawned children import rdmakv first
                jobs = [(ctx.url("conc"), ctx.key, t, f"c{i}", reps, start_at) for i in range(n)]
                res = pool.map(_concurrent_client, jobs)
            total = sum(r[0] for r in res)
            wall = max(r[2] for r in res) - min(r[1] for r in res)
            for r in res:
                for actual, count in r[3].items():
                    ctx.record(f"concurrency.{n}.{t}", t, actual, count)
            row[t] = {"aggregate_MBps": total / wall / 1e6, "wall_s": wall, "bytes": total}
        out["rows"].append(row)
    return out


def limits(ctx: Ctx, restore_median_ms: float | None, size: int, runs: int) -> dict:
    from rdmakv import rdma
    from rdmakv.rdma import restore as rr

    from . import limits as lim

    out: dict = {"bytes": size}
    dev = rdma.Device.open(os.environ.get("RDMAKV_RDMA_DEVICE") or None)
    addr = lim.device_ipv4(dev.caps.gid)
    try:
        if addr is None:
            raise RuntimeError("device has no IPv4 RoCE GID for perftest")
        out["perftest"] = lim.perftest(size, max(20, runs), dev.caps.name, dev.caps.gid_index, addr)
    except Exception as e:  # noqa: BLE001 - report, do not abort the whole bench
        out["perftest"] = {"error": str(e)}
    out["raw_pyverbs"] = lim.raw_pyverbs_read(size, runs, rr.MAX_READ_BYTES)
    pt = out["perftest"]
    limit_ms = pt.get("bw_time_per_message_ms") if isinstance(pt, dict) else None
    if restore_median_ms and limit_ms:
        out["rdma_restore_over_perftest"] = restore_median_ms / limit_ms
    if restore_median_ms:
        out["rdma_restore_over_raw_pyverbs"] = restore_median_ms / out["raw_pyverbs"]["median_ms"]
    return out


def tuning(ctx: Ctx, runs: int) -> dict:
    """Knobs: READ merging, READ size, signaling interval, TCP window, HMAC/xxh3 cost, per-WR cost."""
    out: dict = {}
    kv = session(256, 11)
    with ctx.connect("tune", "tcp") as w:
        w.save("s", kv)
    for window in (16, 32, 64):
        cold: list[float] = []
        with ctx.connect(f"tune-w{window}", "tcp", pipeline_window=window) as st:
            for i in range(runs):
                cold.append(st.save(f"c{i}", session(256, 9000 + i)).wall_s)
            rest, _ = _restore_samples(ctx, f"tuning.tcp_window_{window}", "tcp", st, "c0", runs)
        out[f"tcp_window_{window}"] = {"cold_save": summary(cold), "restore": summary(rest)}
    if ctx.rdma:
        with ctx.connect("tune", "rdma") as st:
            r = st.rdma
            assert r is not None and r.requester is not None  # (connected by RDMA)
            for label, merge, max_read in (
                ("merge_1MiB", True, 1 << 20),
                ("merge_256KiB", True, 256 << 10),
                ("merge_4MiB", True, 4 << 20),
                ("no_merge", False, 1 << 20),
            ):
                r.merge, r.max_read_bytes = merge, max_read
                samples, rep = _restore_samples(ctx, f"tuning.rdma_{label}", "rdma", st, "s", runs)
                out[f"rdma_{label}"] = {**summary(samples), "reads_posted": rep.reads_posted}
            r.merge, r.max_read_bytes = True, 1 << 20
            req = r.requester
            default_sig = req.signal_every
            for sig in sorted({1, default_sig, req.depth}):
                req.signal_every = sig
                samples, rep = _restore_samples(ctx, f"tuning.rdma_signal_every_{sig}", "rdma", st, "s", runs)
                out[f"rdma_signal_every_{sig}"] = summary(samples)
            req.signal_every = default_sig
            out["per_wr_cost_us"] = _per_wr_cost(st)
    payload = np.random.default_rng(1).bytes(4 << 20)
    crypto = {}
    for size in (4 << 10, 64 << 10, 1 << 20, 4 << 20):
        view = memoryview(payload)[:size]
        reps = max(3, (64 << 20) // size)
        t0 = time.perf_counter()
        for _ in range(reps):
            hmac.new(b"k" * 32, view, hashlib.sha256).digest()
        t_h = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            xxhash.xxh3_64_intdigest(view)
        t_x = (time.perf_counter() - t0) / reps
        crypto[str(size)] = {"hmac_sha256_MBps": size / t_h / 1e6, "xxh3_MBps": size / t_x / 1e6}
    out["hash_throughput"] = crypto
    return out


def _per_wr_cost(st: rdmakv.Store) -> dict:
    """Post 1000 tiny READs in one call: the per-WR software cost dominates."""
    r = st.rdma
    assert r is not None and r.requester is not None  # (connected by RDMA)
    buf, addr, lkey = r.pool.alloc(64 * 1000)
    _, loc, _ = st.channel.get_manifest("s", want_locations=True)
    assert loc is not None  # (asked for)
    reg = loc.regions[0]
    ops = [(int(reg["addr"]) + 64 * i, int(reg["rkey"]), [(addr + 64 * i, 64, lkey)]) for i in range(1000)]
    r.requester.read(ops)
    t0 = time.perf_counter()
    r.requester.read(ops)
    dt = time.perf_counter() - t0
    return {"wrs": 1000, "us_per_wr": dt / 1000 * 1e6, "post_api": r.requester.post_api}
