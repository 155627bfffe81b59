"""Placement at scale, on paper: `rdmakv bench placement [--chunks 10000000] [--nodes 100 1000]`.

Runs the client's own rendezvous placement (rdmakv.cluster.placement: the same score function,
vectorised) over N simulated members and C random chunk keys with R copies, and reports:
- load per node (chunk copies): max/mean and the spread;
- chunks moved when one node joins and when one leaves, against the ideal (R/N of the chunks
  gain or lose a copy on that node; nothing moves between the other nodes);
- the member list's size in etcd and the watch traffic a membership change causes.

Join and leave are computed from the scores, not by placing everything twice: with rendezvous
hashing a chunk moves on a join exactly when the new node's score beats the chunk's R-th best,
and on a leave exactly when the node was one of its R. ``--verify`` also places everything a
second time for the smallest N and checks that shortcut against it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rdmakv.cluster.placement import mix64, place, seeds

from .envinfo import collect
from .plots import pyplot

BLOCK = 1 << 16  # chunks per pass: the score matrix of a step is BLOCK x NODE_STEP x 8 B (32 MiB)
NODE_STEP = 64  # members per step of the running top-R


def member_names(n: int) -> list[str]:
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:7070" for i in range(n)]


def top_r(keys: np.ndarray, s: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(member index, score) of each key's R best members (any order), by a running top-R over
    steps of NODE_STEP members (the full keys x members matrix would not fit for 10M x 1,000).
    Each step takes its own R best by R argmax passes and merges them with the running R."""
    n = len(keys)
    rows = np.arange(n)
    best_i = np.full((n, r), -1, dtype=np.int64)
    best_s = np.zeros((n, r), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j0 in range(0, len(s), NODE_STEP):
            sc = mix64(keys[:, None] ^ s[None, j0 : j0 + NODE_STEP])
            for _ in range(min(r, sc.shape[1])):
                j = sc.argmax(axis=1)
                v = sc[rows, j]
                sc[rows, j] = 0
                worst = best_s.argmin(axis=1)
                better = v > best_s[rows, worst]
                best_s[rows[better], worst[better]] = v[better]
                best_i[rows[better], worst[better]] = j[better] + j0
    return best_i, best_s


def simulate(n_nodes: int, n_chunks: int, r: int, rng: np.random.Generator) -> dict:
    names = member_names(n_nodes)
    s = seeds(names)
    joiner = seeds(["10.255.255.254:7070"])[0]
    load = np.zeros(n_nodes, dtype=np.int64)
    moved_join = 0
    t0 = time.perf_counter()
    for c0 in range(0, n_chunks, BLOCK):
        keys = rng.integers(0, 2**64, size=min(BLOCK, n_chunks - c0), dtype=np.uint64)
        idx, sc = top_r(keys, s, r)
        load += np.bincount(idx.ravel(), minlength=n_nodes)
        with np.errstate(over="ignore"):
            moved_join += int((mix64(keys ^ joiner) > sc.min(axis=1)).sum())
    took = time.perf_counter() - t0
    leaver = int(load.argmax())  # the worst case: the fullest node leaves
    mean = load.mean()
    return {
        "nodes": n_nodes, "chunks": n_chunks, "replicas": r, "seconds": round(took, 1),
        "load_mean": round(float(mean), 1), "load_max": int(load.max()), "load_min": int(load.min()),
        "max_over_mean": round(float(load.max() / mean), 4), "min_over_mean": round(float(load.min() / mean), 4),
        "load_cv": round(float(load.std() / mean), 4),
        "join": {"moved": moved_join, "ideal": round(n_chunks * r / (n_nodes + 1)),
                 "fraction_of_chunks": round(moved_join / n_chunks, 5), "ideal_fraction": round(r / (n_nodes + 1), 5)},
        "leave": {"moved": int(load[leaver]), "ideal": round(n_chunks * r / n_nodes),
                  "fraction_of_chunks": round(float(load[leaver]) / n_chunks, 5),
                  "ideal_fraction": round(r / n_nodes, 5), "node": "the fullest"},
    }  # fmt: skip


def verify(n_nodes: int, n_chunks: int, r: int, seed: int) -> dict:
    """Place everything before and after a join and a leave with the client's place(), and count
    what actually moved, to check the shortcut in simulate()."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**64, size=n_chunks, dtype=np.uint64)
    names = member_names(n_nodes)
    before = np.sort(np.array(names, dtype=object)[place(keys, names, r)], axis=1)
    joined = [*names, "10.255.255.254:7070"]
    after = np.sort(np.array(joined, dtype=object)[place(keys, joined, r)], axis=1)
    moved_join = int((before != after).any(axis=1).sum())
    between_old = int(((before != after).any(axis=1) & ~(after == joined[-1]).any(axis=1)).sum())
    left = names[1:]
    after_l = np.sort(np.array(left, dtype=object)[place(keys, left, r)], axis=1)
    moved_leave = int((before != after_l).any(axis=1).sum())
    lost_copy = int((before == names[0]).any(axis=1).sum())
    return {"nodes": n_nodes, "chunks": n_chunks, "join_moved": moved_join, "join_moved_between_old_nodes": between_old,
            "leave_moved": moved_leave, "leave_chunks_that_had_a_copy_there": lost_copy}  # fmt: skip


def etcd_figures(n_nodes: int, watchers: int) -> dict:
    """Bytes etcd holds and sends for membership, from the encodings rdmakv uses: one key per
    member, ``/rdmakv/NAME/members/ADDR`` -> JSON; the JSON gateway base64-encodes both."""
    addr = "10.0.0.1:7070"
    key = f"/rdmakv/prod/members/{addr}"
    value = json.dumps({"addr": addr, "listen": "0.0.0.0:7070", "replicas": 2})
    b64 = lambda n: 4 * ((n + 2) // 3)  # noqa: E731
    entry_gw = b64(len(key)) + b64(len(value)) + 120  # + revision fields and JSON punctuation
    event = entry_gw + 60  # a watch event: the kv plus its type and the response header
    # a check every lease TTL (5 s): count and newest revision (a keys-only range of one key, ~260 B)
    resync_s, count_reply, keepalive_s = 5.0, 260, 5 / 3
    return {
        "members": n_nodes, "watchers": watchers, "entry_bytes": len(key) + len(value),
        "member_list_bytes": n_nodes * (len(key) + len(value)), "member_list_gateway_bytes": n_nodes * entry_gw,
        "watch_bytes_per_change": watchers * event,
        "resync_bytes_per_s": round(watchers * count_reply / resync_s),  # (a re-read only when a check finds a change)
        "keepalives_per_s": round(n_nodes / keepalive_s),
    }  # fmt: skip


def report(r: dict) -> str:
    lines = ["# Placement at scale (simulated, the client's own rendezvous function)", "",
             f"{r['chunks']:,} random chunk keys, R = {r['replicas']}; one run on {r['env']['cpus']} CPUs.", "",
             "| members | load max/mean | min/mean | CV | join: moved (ideal R/(N+1)) | leave: moved (ideal R/N) | s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in r["sims"]:
        j, le = s["join"], s["leave"]
        lines.append(f"| {s['nodes']} | {s['max_over_mean']:.3f} | {s['min_over_mean']:.3f} | {s['load_cv']:.4f} | "
                     f"{j['fraction_of_chunks']:.4%} ({j['ideal_fraction']:.4%}) | "
                     f"{le['fraction_of_chunks']:.4%} ({le['ideal_fraction']:.4%}) | {s['seconds']} |")  # fmt: skip
    if r.get("verify"):
        v = r["verify"]
        lines += ["", f"Check of the shortcut by placing everything twice ({v['nodes']} members, {v['chunks']:,} "
                  f"chunks): a join moved {v['join_moved']:,} chunks, {v['join_moved_between_old_nodes']} of them "
                  f"between old nodes; a leave moved {v['leave_moved']:,}, and "
                  f"{v['leave_chunks_that_had_a_copy_there']:,} had a copy on the node that left."]  # fmt: skip
    lines += ["", "## Membership in etcd", "",
              "| members | watchers | list in etcd | via the gateway | watch bytes per change | resync B/s | "
              "keepalives/s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in r["etcd"]:
        lines.append(f"| {e['members']} | {e['watchers']} | {e['member_list_bytes']:,} B | "
                     f"{e['member_list_gateway_bytes']:,} B | {e['watch_bytes_per_change']:,} | "
                     f"{e['resync_bytes_per_s']:,} | {e['keepalives_per_s']} |")  # fmt: skip
    lines += ["", "Watchers: every node plus as many clients. A change is one event per watcher (the watch "
              "applies events; it does not re-read the list). Every lease TTL (5 s) each watcher checks the "
              "member count and the newest member revision (a keys-only range of one key, ~260 B; every change "
              "moves one of the two) and re-reads the whole list only when either differs from what its watch "
              "applied (a stalled stream, replaced then). A stream that ended is replaced at once. Keepalives: one "
              "lease refresh per node every TTL/3."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [s["nodes"] for s in r["sims"]]
    ax.plot(xs, [s["join"]["fraction_of_chunks"] for s in r["sims"]], "o-", label="join: moved")
    ax.plot(xs, [s["join"]["ideal_fraction"] for s in r["sims"]], "k--", label="ideal R/(N+1)")
    ax.plot(xs, [s["leave"]["fraction_of_chunks"] for s in r["sims"]], "s-", label="leave (fullest node): moved")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("members")
    ax.set_ylabel("fraction of chunks moved")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rdmakv bench placement", description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=10_000_000)
    p.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--verify", type=int, default=1_000_000, metavar="CHUNKS",
                   help="chunks for the place-everything-twice check (0: skip)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="bench/results/placement")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    r = {"env": collect(), "chunks": args.chunks, "replicas": args.replicas, "sims": [], "etcd": []}
    for n in args.nodes:
        s = simulate(n, args.chunks, args.replicas, rng)
        print(f"[placement] {n} members: load max/mean {s['max_over_mean']}, join moved "
              f"{s['join']['fraction_of_chunks']:.4%} (ideal {s['join']['ideal_fraction']:.4%}), {s['seconds']} s")
        r["sims"].append(s)
        r["etcd"].append(etcd_figures(n, 2 * n))
    if args.verify:
        r["verify"] = verify(min(args.nodes), args.verify, args.replicas, args.seed + 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=2))
    (out / "report.md").write_text(report(r))
    try:
        plot(r, out / "moved.png")
    except ImportError:
        print("[placement] matplotlib missing: no plot")
    print(f"[placement] wrote {out}/results.json, report.md, moved.png")
    return 0
