"""`rdmakv bench lifecycle`: the store as a long-running cache.

Three parts, against a real `rdmakv serve` on loopback (default `--fsync manifest`):

- **soak**: 8 client processes run a chat-like workload over 2 namespaces for ``--minutes``
  (default 10): each client keeps conversations that grow a turn at a time; every turn is
  saved and then restored, conversations end (deleted) now and then and new ones start. The
  working set is 3x ``--capacity``. Every restore is checked against a digest of what was
  saved. Recorded: memory and disk hit rates, evictions and demotions per minute, wrong
  restores, STORE_FULL and other errors, server RSS and disk use over time, and restore
  latency for memory hits vs disk hits.
- **history**: data-dir size and restart time after 500 overwrites and 500 save/delete pairs
  of one session, against a fresh store (replay scales with live data, not history);
- **group commit**: warm saves (one round trip, one fsync'd commit each) and restores with 1
  and with 8 concurrent clients.

Writes ``lifecycle.json``, ``lifecycle.md`` and ``lifecycle.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import numpy as np
import xxhash

from rdmakv.store.server.spawn import ServerProcess
from rdmakv.units import fmt_bytes, parse_size

from . import envinfo
from .stats import summary

SHAPE = ("lifecycle", 8, 128, 128)  # 4 KiB of KV per token
TURN_TOKENS = 48
MAX_TURNS = 8
NAMESPACES = ("chat-a", "chat-b")


def _shape():
    from rdmakv.kvgen import ModelShape

    return ModelShape(*SHAPE)


def _digest(kv) -> int:
    h = xxhash.xxh3_64()
    for a in kv.k + kv.v:
        h.update(np.ascontiguousarray(a).data)
    return h.intdigest()


def _client(idx: int, url_base: str, key: str, seconds: float, conversations: int, out: mp.Queue) -> None:
    """One soak client: its own conversations, saved every turn and restored right after."""
    from rdmakv import kvgen
    from rdmakv.client.store import connect as connect_node
    from rdmakv.errors import RdmakvError, StoreFullError

    rng = random.Random(idx)
    shape = _shape()
    samples: list[tuple[float, str, str, float]] = []  # (t, op, tier, seconds)
    counts: dict[str, Any] = {"saves": 0, "restores": 0, "wrong": 0, "store_full": 0, "errors": 0, "deletes": 0}
    stores = {ns: connect_node(f"{url_base}/{ns}", key=key, transport="tcp", window=64) for ns in NAMESPACES}
    convs: dict[str, tuple[str, list[int], int]] = {}  # name -> (ns, tokens, digest)
    serial = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if len(convs) < conversations or rng.random() < 0.05:
            serial += 1
            name = f"c{idx}-{serial}"
            base = [rng.randrange(32000) for _ in range(16)]  # a shared system prompt per client
            convs[name] = (NAMESPACES[serial % 2], [idx] + base, 0)
        name = rng.choice(list(convs))
        ns, tokens, _ = convs[name]
        st = stores[ns]
        try:
            saved = len(tokens) > 1 + 16
            if saved and (len(tokens) >= 1 + 16 + MAX_TURNS * TURN_TOKENS or rng.random() < 0.03):
                st.delete_manifest(name)  # the conversation ends
                counts["deletes"] += 1
                del convs[name]
                continue
            tokens = tokens + [rng.randrange(32000) for _ in range(TURN_TOKENS)]
            kv = kvgen.generate(np.array(tokens, np.uint32), shape)
            t = time.perf_counter()
            st.save(name, kv)
            samples.append((time.monotonic() - t0, "save", "", time.perf_counter() - t))
            counts["saves"] += 1
            convs[name] = (ns, tokens, _digest(kv))
            t = time.perf_counter()
            got, rep = st.restore(name, report=True)
            samples.append((time.monotonic() - t0, "restore", rep.tier, time.perf_counter() - t))
            counts["restores"] += 1
            counts["wrong"] += _digest(got) != convs[name][2]
        except StoreFullError:
            counts["store_full"] += 1
        except RdmakvError as e:
            counts["errors"] += 1
            counts.setdefault("error_examples", []).append(str(e)[:200])
            convs.pop(name, None)
    for st in stores.values():
        st.close()
    out.put((idx, counts, samples))


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _disk(path: str) -> int:
    total = 0
    for f in os.listdir(path):
        if f.startswith("seg-"):
            try:
                total += os.path.getsize(os.path.join(path, f))
            except FileNotFoundError:
                pass  # compacted away between the listing and the stat
    return total


def soak(server: ServerProcess, key: str, data_dir: str, capacity: int, seconds: float, clients: int) -> dict:
    from rdmakv.client.store import connect as connect_node

    conv_bytes = (1 + 16 + MAX_TURNS * TURN_TOKENS) * _shape().bytes_per_token
    per_client = max(1, int(3 * capacity / conv_bytes / clients))  # working set: 3x the memory tier
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(i, f"rdmakv://127.0.0.1:{server.port}", key, seconds, per_client, q))
             for i in range(clients)]  # fmt: skip
    timeline = []
    t0 = time.monotonic()
    for p in procs:
        p.start()
    results: list[dict] = []
    while len(results) < clients and (any(p.is_alive() for p in procs) or not q.empty()):
        timeline.append({"t": round(time.monotonic() - t0, 1), "rss": _rss(server.pid()), "disk": _disk(data_dir)})
        try:
            results.append(q.get(timeout=10))
        except Exception:  # noqa: BLE001 - queue.Empty: sample again
            pass
    for p in procs:
        p.join(30)
    if len(results) < clients:
        raise RuntimeError(f"{clients - len(results)} soak clients died (exit codes {[p.exitcode for p in procs]})")
    timeline.append({"t": round(time.monotonic() - t0, 1), "rss": _rss(server.pid()), "disk": _disk(data_dir)})
    wall = time.monotonic() - t0
    counts: dict = {}
    samples = []
    for _, c, s in results:
        for k, v in c.items():
            counts[k] = counts.get(k, []) + v if isinstance(v, list) else counts.get(k, 0) + v
        samples += s
    stats = {}
    for ns in NAMESPACES:
        with connect_node(f"rdmakv://127.0.0.1:{server.port}/{ns}", key=key, transport="tcp") as st:
            stats[ns] = st.stats()
    mem = [s[3] for s in samples if s[1] == "restore" and s[2] == "memory"]
    disk = [s[3] for s in samples if s[1] == "restore" and s[2] == "disk"]
    minutes = wall / 60
    return {
        "seconds": round(wall, 1),
        "clients": clients,
        "namespaces": list(NAMESPACES),
        "capacity": capacity,
        "working_set_bytes": per_client * clients * conv_bytes,
        "conversations_per_client": per_client,
        "counts": counts,
        "memory_hit_rate": len(mem) / max(1, len(mem) + len(disk)),
        "disk_hit_rate": len(disk) / max(1, len(mem) + len(disk)),
        "evictions_per_minute": sum(s["evictions"] for s in stats.values()) / minutes,
        "demotions_per_minute": sum(s["demotions"] for s in stats.values()) / minutes,
        "restore_memory_hit": summary(mem),
        "restore_disk_hit": summary(disk),
        "save": summary([s[3] for s in samples if s[1] == "save"]),
        "rss_start": timeline[0]["rss"],
        "rss_end": timeline[-1]["rss"],
        "disk_start": timeline[0]["disk"],
        "disk_end": timeline[-1]["disk"],
        "timeline": timeline,
        "server_stats": stats,
    }


def _commit_worker(idx: int, url: str, key: str, runs: int, out: mp.Queue) -> None:
    from rdmakv import kvgen
    from rdmakv.client.store import connect as connect_node

    kv = kvgen.generate(kvgen.token_stream(1000 + idx, 256), kvgen.QWEN25_05B)
    with connect_node(url, key=key, transport="tcp", window=64) as st:
        st.save(f"w{idx}", kv)  # cold once; every later save of the same state is warm
        saves, restores = [], []
        for _ in range(runs):
            t = time.perf_counter()
            rep = st.save(f"w{idx}", kv)
            saves.append(time.perf_counter() - t)
            assert rep.round_trips == 1
            t = time.perf_counter()
            st.restore(f"w{idx}")
            restores.append(time.perf_counter() - t)
    out.put((saves, restores))


def group_commit(server: ServerProcess, key: str, runs: int) -> dict:
    out = {}
    ctx = mp.get_context("spawn")
    for n in (1, 8):
        q: mp.Queue = ctx.Queue()
        url = f"rdmakv://127.0.0.1:{server.port}/gc{n}"
        procs = [ctx.Process(target=_commit_worker, args=(i, url, key, runs, q)) for i in range(n)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        got: list[dict] = []
        deadline = time.monotonic() + 600
        while len(got) < n and time.monotonic() < deadline and (any(p.is_alive() for p in procs) or not q.empty()):
            try:
                got.append(q.get(timeout=5))
            except Exception:  # noqa: BLE001 - queue.Empty
                pass
        for p in procs:
            p.join(30)
        if len(got) < n:
            assert server.proc is not None  # (started)
            server.proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            tail = "".join(server.log[-300:])
            raise RuntimeError(f"group commit: {n - len(got)} clients failed; server stacks:\n{tail}")
        wall = time.perf_counter() - t0
        saves = [x for s, _ in got for x in s]
        out[f"{n}_clients"] = {
            "warm_save": summary(saves),
            "restore": summary([x for _, r in got for x in r]),
            "commits_per_second": len(saves) / wall,
        }
    return out


def replay_history(overwrites: int = 500) -> dict:
    """The issue's history case: one 256-token session overwritten ``overwrites`` times plus as
    many save/delete pairs; data-dir size and restart time against a fresh store holding the
    same live data. Replay must scale with live data, not with history."""
    from rdmakv import kvgen
    from rdmakv.client.store import connect as connect_node

    out = {}
    key = os.urandom(32).hex()
    for label, history in (("fresh", False), ("after_history", True)):
        d = tempfile.mkdtemp(prefix="rdmakv-history-")
        srv = ServerProcess(d, "256MiB", "--fsync", "never", "--transport", "tcp", key_hex=key).start()
        try:
            with connect_node(srv.url("h"), key=key, transport="tcp", window=64) as st:
                if history:
                    for i in range(overwrites):
                        st.save("hot", kvgen.generate(kvgen.token_stream(10_000 + i, 256), kvgen.QWEN25_05B))
                        st.save("tmp", kvgen.generate(kvgen.token_stream(20_000 + i, 256), kvgen.QWEN25_05B))
                        st.delete_manifest("tmp")
                st.save("hot", kvgen.generate(kvgen.token_stream(10_000 + overwrites, 256), kvgen.QWEN25_05B))
                live = st.stats()["disk_bytes"]
            time.sleep(3)  # the background compactor runs every couple of seconds
            disk = _disk(d)
            srv.stop()
            t0 = time.perf_counter()
            srv.start()
            restart = time.perf_counter() - t0
            rss = _rss(srv.pid())
            out[label] = {"live_bytes": live, "disk_bytes": disk, "disk_over_live": disk / max(1, live),
                          "restart_s": restart, "rss_after_restart": rss}  # fmt: skip
        finally:
            srv.stop()
            shutil.rmtree(d, ignore_errors=True)
    return out


def markdown(r: dict) -> str:
    s = r["soak"]
    c = s["counts"]
    live = sum(x["disk_bytes"] for x in s["server_stats"].values())
    lines = [
        "# rdmakv lifecycle benchmark",
        "",
        f"Environment: {r['environment'].get('cpu_model', '?')}, {r['environment'].get('cpus', '?')} CPUs, "
        f"kernel {r['environment'].get('kernel', '?')}; server `--capacity {fmt_bytes(s['capacity'])}` "
        f"`--disk-capacity {r.get('disk_capacity', '?')}` `--fsync {r['fsync']}`.",
        "",
        f"## Soak: {s['clients']} clients, {len(s['namespaces'])} namespaces, {s['seconds']:.0f} s",
        "",
        f"Working set {fmt_bytes(s['working_set_bytes'])} (3x capacity).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| saves / restores | {c['saves']:,} / {c['restores']:,} |",
        f"| wrong restores | {c['wrong']} |",
        f"| STORE_FULL | {c['store_full']} |",
        f"| other errors | {c['errors']} |",
        f"| memory / disk hit rate | {s['memory_hit_rate']:.1%} / {s['disk_hit_rate']:.1%} |",
        f"| evictions / demotions per minute | {s['evictions_per_minute']:.1f} / {s['demotions_per_minute']:.1f} |",
        f"| restore p50 / p99, memory hit | {s['restore_memory_hit'].get('median_ms', 0):.2f} / "
        f"{s['restore_memory_hit'].get('p99_ms', 0):.2f} ms |",
        f"| restore p50 / p99, disk hit | {s['restore_disk_hit'].get('median_ms', 0):.2f} / "
        f"{s['restore_disk_hit'].get('p99_ms', 0):.2f} ms |",
        f"| save p50 / p99 | {s['save'].get('median_ms', 0):.2f} / {s['save'].get('p99_ms', 0):.2f} ms |",
        f"| server RSS start / end | {fmt_bytes(s['rss_start'])} / {fmt_bytes(s['rss_end'])} |",
        f"| disk use start / end | {fmt_bytes(s['disk_start'])} / {fmt_bytes(s['disk_end'])} |",
        f"| live log bytes at the end (disk use / live) | {fmt_bytes(live)} ({s['disk_end'] / max(1, live):.2f}x) |",
        "",
        "## Group commit (warm save = 1 round trip + an fsync'd commit; 256-token Qwen session)",
        "",
        "| clients | warm save p50 / p99 | restore p50 / p99 | commits/s |",
        "|---|---|---|---|",
    ]
    for n, g in r["group_commit"].items():
        lines.append(
            f"| {n.split('_')[0]} | {g['warm_save']['median_ms']:.2f} / {g['warm_save']['p99_ms']:.2f} ms | "
            f"{g['restore']['median_ms']:.2f} / {g['restore']['p99_ms']:.2f} ms | {g['commits_per_second']:.0f} |"
        )
    h = r.get("replay_history")
    if h:
        lines += ["", "## History: 500 overwrites + 500 save/delete pairs of a 256-token session", "",
                  "| store | live | data dir | data dir / live | restart | RSS after restart |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for label, x in h.items():
            lines.append(f"| {label} | {fmt_bytes(x['live_bytes'])} | {fmt_bytes(x['disk_bytes'])} | "
                         f"{x['disk_over_live']:.2f}x | {x['restart_s']:.2f} s | {fmt_bytes(x['rss_after_restart'])} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tl = r["soak"]["timeline"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([p["t"] for p in tl], [p["rss"] / 2**20 for p in tl], label="server RSS")
    a.plot([p["t"] for p in tl], [p["disk"] / 2**20 for p in tl], label="disk use (segments)")
    a.axhline(r["soak"]["capacity"] / 2**20, ls=":", c="grey", label="--capacity")
    a.set_xlabel("seconds")
    a.set_ylabel("MiB")
    a.set_title("soak: memory and disk over time")
    a.legend()
    for tier in ("memory_hit", "disk_hit"):
        s = r["soak"][f"restore_{tier}"]
        if s.get("n"):
            b.bar(tier.replace("_", " "), s["median_ms"], yerr=[[0], [s["p99_ms"] - s["median_ms"]]], capsize=6)
    b.set_ylabel("restore ms (p50, bar to p99)")
    b.set_title("restore latency by tier")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rdmakv bench lifecycle", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--capacity", default="64MiB", help="server --capacity (default 64MiB)")
    p.add_argument("--disk-capacity", default="80MiB",
                   help="server --disk-capacity (default 80MiB: less than the live working set, so the disk tier "
                   "evicts too)")
    p.add_argument("--fsync", choices=("manifest", "always", "never"), default="manifest")
    p.add_argument("--commit-runs", type=int, default=200, help="warm saves per client in the group-commit part")
    p.add_argument("--history", type=int, default=500, help="overwrites for the replay-history part (0: skip)")
    p.add_argument("--out", default="bench/out/lifecycle")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    key = os.urandom(32).hex()
    data_dir = tempfile.mkdtemp(prefix="rdmakv-lifecycle-")
    capacity = parse_size(args.capacity)
    server = ServerProcess(data_dir, args.capacity, "--fsync", args.fsync, "--transport", "tcp",
                           "--disk-capacity", args.disk_capacity, key_hex=key).start()  # fmt: skip
    try:
        print(f"bench lifecycle: soak, {args.clients} clients, {args.minutes} min ...", file=sys.stderr, flush=True)
        result = {"environment": envinfo.collect(), "fsync": args.fsync, "disk_capacity": args.disk_capacity}
        result["soak"] = soak(server, key, data_dir, capacity, args.minutes * 60, args.clients)
        print("bench lifecycle: group commit ...", file=sys.stderr, flush=True)
        result["group_commit"] = group_commit(server, key, args.commit_runs)
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    if args.history:
        print(f"bench lifecycle: replay after {args.history} overwrites ...", file=sys.stderr, flush=True)
        result["replay_history"] = replay_history(args.history)
    with open(os.path.join(args.out, "lifecycle.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    with open(os.path.join(args.out, "lifecycle.md"), "w") as f:
        f.write(markdown(result))
    plot(result, os.path.join(args.out, "lifecycle.png"))
    print(markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(sys.argv[1:] if argv is None else argv)
