"""Cluster figures on this host, TCP: `rdmakv bench cluster [--runs 20] [--out DIR]`.

A real etcd and real `rdmakv serve` processes on loopback. Measures, in one run:
- save (cold and warm) and restore latency of one session on a single server against a
  cluster of 3 nodes with R = 2 (the cluster client talks to each node in parallel);
- how long a killed node (kill -9) stays in the member list (the lease TTL bounds it), and how
  long until a client's watch drops it;
- repair after the loss: the automatic pass in the nodes (kill to every session back at R), and
  a forced pass (`rdmakv cluster repair`) on nodes with automatic repair off, as bytes per second.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import rdmakv
from rdmakv import kvgen
from rdmakv.client.store import connect as connect_node
from rdmakv.cluster.client import ClusterStore
from rdmakv.cluster.etcd_server import Etcd, free_port
from rdmakv.cluster.membership import members
from rdmakv.cluster.repair import check, repair
from rdmakv.store.server.spawn import ServerProcess

from .envinfo import collect
from .plots import pyplot
from .stats import summary

KEY = "5a" * 32
TOKENS = 256


def session(seed: int, tokens: int = TOKENS) -> rdmakv.KVState:
    return kvgen.generate(kvgen.token_stream(seed, tokens), kvgen.QWEN25_05B)


def start_nodes(tmp: Path, etcd: Etcd, n: int, *extra: str, ttl: int = 5) -> list[ServerProcess]:
    out = []
    for i in range(n):
        port = free_port()
        out.append(ServerProcess(str(tmp / f"n{i}-{port}"), "512MiB", "--fsync", "never", "--transport", "tcp",
                                 "--cluster", f"etcd://{etcd.url}/b", "--advertise", f"127.0.0.1:{port}",
                                 "--lease-ttl", str(ttl), *extra, key_hex=KEY, port=port).start())  # fmt: skip
    deadline = time.monotonic() + 15
    while len(members(f"etcd://{etcd.url}/b")) < n:
        if time.monotonic() > deadline:
            raise RuntimeError("nodes did not register")
        time.sleep(0.05)
    return out


def timed_ops(save, restore, runs: int, seed0: int) -> dict:
    cold, warm, rest = [], [], []
    for i in range(runs):
        kv = session(seed0 + i)
        t0 = time.perf_counter()
        save(f"b{i}", kv)
        t1 = time.perf_counter()
        save(f"b{i}", kv)
        t2 = time.perf_counter()
        back = restore(f"b{i}")
        t3 = time.perf_counter()
        assert back.equals(kv)
        cold.append(t1 - t0)
        warm.append(t2 - t1)
        rest.append(t3 - t2)
    return {"cold_save": summary(cold), "warm_save": summary(warm), "restore": summary(rest)}


def latency(tmp: Path, runs: int) -> dict:
    single = ServerProcess(str(tmp / "single"), "512MiB", "--fsync", "never", "--transport", "tcp",
                           key_hex=KEY).start()  # fmt: skip
    try:
        with connect_node(single.url("bench"), key=KEY, transport="tcp", window=64) as st:
            one = timed_ops(st.save, st.restore, runs, 1000)
    finally:
        single.stop()
    etcd = Etcd(tmp / "etcd-lat").start()
    nodes = start_nodes(tmp, etcd, 3)
    try:
        with ClusterStore(f"etcd://{etcd.url}/b", "bench", key=KEY, replicas=2) as cs:
            three = timed_ops(cs.save, cs.restore, runs, 1000)
    finally:
        for n in nodes:
            n.stop()
        etcd.stop()
    return {"single_server": one, "cluster_3_nodes_r2": three}


def loss_and_repair(tmp: Path, sessions: int, ttl: int) -> dict:
    """kill -9 one of 3 nodes: detection, then automatic repair; then a forced repair pass."""
    out: dict = {"lease_ttl_s": ttl, "sessions": sessions, "tokens": TOKENS}
    etcd = Etcd(tmp / "etcd-loss").start()
    url = f"etcd://{etcd.url}/b"
    nodes = start_nodes(tmp, etcd, 3, ttl=ttl)
    try:
        with ClusterStore(url, "bench", key=KEY, replicas=2) as cs:
            for i in range(sessions):
                cs.save(f"r{i}", session(2000 + i))
            victim = nodes[1]
            t_kill = time.monotonic()
            os.kill(victim.pid(), signal.SIGKILL)
            gone = f"127.0.0.1:{victim.port}"
            watch_s = etcd_s = None
            while watch_s is None or etcd_s is None:
                now = time.monotonic() - t_kill
                if etcd_s is None and gone not in members(url):
                    etcd_s = now
                if watch_s is None and gone not in cs.members:
                    watch_s = now
                if now > ttl + 10:
                    raise RuntimeError("the dead node never left the member list")
                time.sleep(0.01)
            out["detect_etcd_s"], out["detect_client_watch_s"] = round(etcd_s, 3), round(watch_s, 3)
            while True:
                c = check(cs)
                if c["under_replicated_sessions"] == 0 and c["sessions"] == sessions:
                    break
                if time.monotonic() - t_kill > 120:
                    raise RuntimeError(f"automatic repair did not finish: {c}")
                time.sleep(0.2)
            out["auto_repair_done_after_kill_s"] = round(time.monotonic() - t_kill, 3)
            def node_stats() -> list[dict]:
                return [connect_node(n.url("bench"), key=KEY, transport="tcp").stats().get("cluster", {})
                        for n in nodes if n is not victim]  # fmt: skip

            stats = node_stats()
            while any(s.get("repairing") for s in stats):  # a pass adds to the totals when it ends
                time.sleep(0.2)
                stats = node_stats()
            moved = sum(s.get("repaired_total", {}).get("bytes_sent", 0) for s in stats)
            secs = max(s.get("repaired_total", {}).get("work_seconds", 0) for s in stats)  # nodes work in parallel
            out["auto_repair"] = {"bytes_sent": moved, "pass_seconds": secs,
                                  "bytes_per_s": round(moved / secs) if secs else None}  # fmt: skip
    finally:
        for n in nodes:
            n.stop()
        etcd.stop()

    etcd = Etcd(tmp / "etcd-forced").start()  # the same loss, repaired by one forced pass
    url = f"etcd://{etcd.url}/b"
    nodes = start_nodes(tmp, etcd, 3, "--no-auto-repair", ttl=ttl)
    try:
        with ClusterStore(url, "bench", key=KEY, replicas=2) as cs:
            for i in range(sessions):
                cs.save(f"r{i}", session(2000 + i))
            nodes[1].stop()
            deadline = time.monotonic() + 10
            while len(members(url)) != 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            r = repair(cs)
            out["forced_repair"] = {k: r[k] for k in ("sessions", "under_replicated", "chunks_sent", "bytes_sent",
                                                      "parts_dropped", "seconds", "bytes_per_s")}  # fmt: skip
            out["forced_repair"]["lost"] = len(r["lost"])
    finally:
        for n in nodes:
            n.stop()
        etcd.stop()
    return out


def report(r: dict) -> str:
    lat = r["latency"]
    rows = ["# Cluster on one host (TCP, loopback)", "",
            f"One run; session of {TOKENS} tokens, Qwen2.5-0.5B shape; {r['runs']} sessions per cell; medians "
            "(p99) in ms. The 3 nodes and the client share the host's 2 cores.", "",
            "| | cold save | warm save | restore |", "|---|---|---|---|"]  # fmt: skip
    for label, key in (("single server", "single_server"), ("cluster, 3 nodes, R = 2", "cluster_3_nodes_r2")):
        c = lat[key]
        rows.append(f"| {label} | " + " | ".join(f"{c[op]['median_ms']:.1f} ({c[op]['p99_ms']:.1f})"
                                                 for op in ("cold_save", "warm_save", "restore")) + " |")  # fmt: skip
    lr = r["loss"]
    rows += ["", "## A node killed (kill -9), 1 of 3", "",
             f"- lease TTL {lr['lease_ttl_s']} s: gone from etcd after {lr['detect_etcd_s']} s, from the client's "
             f"watch after {lr['detect_client_watch_s']} s;",
             f"- automatic repair: every one of {lr['sessions']} sessions back at R = 2 "
             f"{lr['auto_repair_done_after_kill_s']} s after the kill; the nodes' passes sent "
             f"{lr['auto_repair']['bytes_sent']:,} B ({lr['auto_repair']['bytes_per_s'] or 0:,} B/s while repairing, "
             "the "
             "2 s settle waits left out);",
             f"- forced repair (`rdmakv cluster repair`, automatic repair off): {lr['forced_repair']['sessions']} "
             f"sessions, {lr['forced_repair']['chunks_sent']} chunks = {lr['forced_repair']['bytes_sent']:,} B in "
             f"{lr['forced_repair']['seconds']} s = {lr['forced_repair']['bytes_per_s']:,} B/s, "
             f"{lr['forced_repair']['lost']} lost."]  # fmt: skip
    return "\n".join(rows) + "\n"


def plot(r: dict, path: Path) -> None:
    plt = pyplot()

    ops = ("cold_save", "warm_save", "restore")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, (label, key) in enumerate((("single server", "single_server"), ("3 nodes, R=2", "cluster_3_nodes_r2"))):
        ax.bar([i + 0.4 * k for i in range(3)], [r["latency"][key][op]["median_ms"] for op in ops], 0.4, label=label)
    ax.set_xticks([i + 0.2 for i in range(3)], ops)
    ax.set_ylabel("median ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rdmakv bench cluster", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--sessions", type=int, default=30, help="sessions saved before the kill")
    p.add_argument("--lease-ttl", type=int, default=5)
    p.add_argument("--out", default="bench/results/cluster")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rdmakv-bench-cluster-") as d:
        tmp = Path(d)
        r = {"env": collect(), "runs": args.runs, "latency": latency(tmp, args.runs),
             "loss": loss_and_repair(tmp, args.sessions, args.lease_ttl)}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=2))
    (out / "report.md").write_text(report(r))
    try:
        plot(r, out / "latency.png")
    except ImportError:
        pass
    print(report(r))
    return 0
