"""Saves, TCP against RDMA WRITE: cold-save walls by size, server CPU per cold save, and restore
tails while other clients cold-save. Plain dicts, no judging; every timed operation's reported
transport goes to ``ctx.record``."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np

import rdmakv
from rdmakv.client.store import connect as connect_node

from .stats import summary
from .suites import Ctx, session


def saves(ctx: Ctx, sizes: list[int], runs: int, cpu_saves: int, load_restores: int) -> dict:
    return {
        "by_size": _by_size(ctx, sizes, runs),
        "server_cpu": _server_cpu(ctx, cpu_saves),
        "restore_under_save_load": _under_load(ctx, load_restores),
    }


def _by_size(ctx: Ctx, sizes: list[int], runs: int) -> list[dict]:
    rows = []
    for n in sizes:
        reps = max(2, runs if n <= 1024 else runs // 3 if n <= 4096 else 2)
        row: dict = {"tokens": n, "runs": reps}
        for ti, t in enumerate(ctx.transports()):
            walls = []
            with ctx.connect("saves", t) as st:
                for i in range(reps):
                    kv = session(n, 100_000 + 1000 * ti + i)  # every save is cold: new chunks
                    row["bytes"] = kv.nbytes
                    rep = st.save(f"s{n}-{i}", kv)
                    del kv
                    walls.append(rep.wall_s)
                    ctx.record(f"saves.by_size.{n}.{t}", t, rep.transport)
                for i in range(reps):
                    st.delete_manifest(f"s{n}-{i}")  # free the slab (and the guest's RAM)
            row[t] = summary(walls)
        if "rdma" in row:
            row["tcp_over_rdma"] = row["tcp"]["median_ms"] / row["rdma"]["median_ms"]
        rows.append(row)
    return rows


def _server_cpu(ctx: Ctx, saves_n: int) -> dict:
    out: dict = {"saves": saves_n, "tokens": 256, "clk_tck": os.sysconf("SC_CLK_TCK")}
    for ti, t in enumerate(ctx.transports()):
        kvs = [session(256, 200_000 + 1000 * ti + i) for i in range(saves_n)]
        with ctx.connect("save-cpu", t) as st:
            c0 = ctx.server.cpu_ticks()
            for i, kv in enumerate(kvs):
                ctx.record(f"saves.server_cpu.{t}", t, st.save(f"c{i}", kv).transport)
            ticks = ctx.server.cpu_ticks() - c0
            for i in range(saves_n):
                st.delete_manifest(f"c{i}")
        out[t] = {"ticks": ticks, "ms_per_save": ticks / out["clk_tck"] / saves_n * 1e3}
    if "rdma" in out:
        out["rdma_over_tcp"] = out["rdma"]["ticks"] / max(1, out["tcp"]["ticks"])
    return out


def _saver(url: str, key: str, transport: str, idx: int, stop, count) -> None:
    n = 0
    with connect_node(url, key=key, transport=transport, window=64) as st:
        while not stop.is_set():
            st.save(f"load{idx}", session(256, 300_000 + 100 * idx + n))  # a new session: cold
            n += 1
            count[idx] = n


def _restores(ctx: Ctx, st: rdmakv.Store, label: str, t: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        _, rep = st.restore("probe", report=True)
        out.append(time.perf_counter() - t0)
        ctx.record(label, t, rep.transport)
    return out


def _under_load(ctx: Ctx, n: int) -> dict:
    """Restore p99 idle, then while 4 clients cold-save in a loop (as processes)."""
    out: dict = {"restores": n, "savers": 4, "tokens": 256}
    with ctx.connect("load", "tcp") as w:
        w.save("probe", session(256, 5))
    variants = [("tcp", "tcp", True)]
    if ctx.rdma:  # the one-sided lookup, and the RDMA restore whose lookup goes over TCP
        variants += [("rdma", "rdma", True), ("rdma_tcp_lookup", "rdma", False)]
    for label, t, one_sided in variants:
        with ctx.connect("load", t) as st:
            if st.rdma is not None:
                st.rdma.one_sided = one_sided
            st.restore("probe")
            idle = _restores(ctx, st, f"saves.restore_idle.{label}", t, n)
            mpc = mp.get_context("spawn")  # a forked child shares the parent's registered pages (COW breaks READs)
            stop, count = mpc.Event(), mpc.Array("l", 4)
            savers = [mpc.Process(target=_saver, args=(ctx.url("load"), ctx.key, t, i, stop, count))
                      for i in range(4)]  # fmt: skip
            for p in savers:
                p.start()
            try:
                deadline = time.monotonic() + 120
                while min(count[:]) < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)  # spawned savers import rdmakv first: measure once all are saving
                started = sum(count[:])
                loaded = _restores(ctx, st, f"saves.restore_loaded.{label}", t, n)
            finally:
                stop.set()
                for p in savers:
                    p.join(60)
            saves_done = sum(count[:]) - started
        p99 = [float(np.percentile(x, 99)) for x in (idle, loaded)]
        out[label] = {"idle": summary(idle), "loaded": summary(loaded), "saves_meanwhile": saves_done,
                  "p99_loaded_over_idle": p99[1] / p99[0]}  # fmt: skip
    return out
