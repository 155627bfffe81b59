"""A cluster across two rxe guests: `rdmakv bench two-node [--runs 20] [--out DIR]`.

Boots the two-node UML harness (``rxe_vm.run(..., nodes=2)``: one guest per host core, a real
link between them) and runs this module's guest side in both:
- node 0 (192.0.2.1) runs etcd, an rdmakv node and the client;
- node 1 (192.0.2.2) runs an rdmakv node that registers in node 0's etcd.
The client saves sessions with R = 1, so each session's chunks are split between the nodes,
then restores them by RDMA (each node's share READ over that node's QP: node 1's share crosses
the link) and over TCP, alternately, and checks every restore bit-exact. It writes one JSON
result; the host side adds the environment and writes the report. tests/test_two_node_cluster.py
runs it with a few sessions and checks what it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEY = "3c" * 32
ETCD_PORT, NODE_PORT = 2379, 7070
TOKENS = 256


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"two-node: {what} not within {timeout:g} s")
        time.sleep(0.2)  # block, never spin: one CPU per guest, HZ=100


def _serve(me: str, etcd: str, tmp: Path) -> subprocess.Popen:
    env = dict(os.environ, RDMAKV_AUTH_KEY=KEY)
    return subprocess.Popen(
        [sys.executable, "-m", "rdmakv", "serve", "--listen", f"{me}:{NODE_PORT}", "--data-dir", str(tmp / "data"),
         "--capacity", "256MiB", "--fsync", "never", "--cluster", f"etcd://{etcd}/two", "--advertise",
         f"{me}:{NODE_PORT}", "--lease-ttl", "5", "--replicas", "1", "--no-auto-repair"], env=env,
    )  # fmt: skip


def node1(me: str, first: str, tmp: Path) -> int:
    import urllib.request

    def etcd_up() -> bool:
        try:
            with urllib.request.urlopen(f"http://{first}:{ETCD_PORT}/health", timeout=1) as r:
                return b"true" in r.read()
        except OSError:
            return False

    _wait(etcd_up, 60, "etcd on node 0")
    return _serve(me, f"{first}:{ETCD_PORT}", tmp).wait()  # until the harness stops this guest


def node0(me: str, peer: str, tmp: Path, runs: int, out: Path) -> int:
    from rdmakv import kvgen
    from rdmakv.cluster.client import ClusterStore
    from rdmakv.cluster.etcd_server import Etcd
    from rdmakv.cluster.membership import members

    etcd = Etcd(tmp / "etcd", host=me)
    etcd.port = ETCD_PORT
    etcd.start()
    url = f"etcd://{me}:{ETCD_PORT}/two"
    srv = _serve(me, etcd.url, tmp)
    try:
        _wait(lambda: len(members(url)) == 2, 90, "both nodes in the member list")
        kvs = [kvgen.generate(kvgen.token_stream(seed, TOKENS), kvgen.QWEN25_05B) for seed in range(runs)]
        res: dict = {"runs": runs, "tokens": TOKENS, "members": sorted(members(url)), "restores": []}
        with ClusterStore(url, "tenant", key=KEY, replicas=1, transport="rdma") as rd, \
                ClusterStore(url, "tenant", key=KEY, replicas=1, transport="tcp") as tc:  # fmt: skip
            for i, kv in enumerate(kvs):
                rd.save(f"s{i}", kv)
            for i, kv in enumerate(kvs):
                for label, st in (("rdma", rd), ("tcp", tc)):
                    t0 = time.perf_counter()
                    back, rep = st.restore(f"s{i}", report=True)
                    took = time.perf_counter() - t0
                    if not back.equals(kv):
                        raise SystemExit(f"two-node: {label} restore of s{i} is not bit-exact")
                    res["restores"].append({"client": label, "s": took, "transport": rep.transport,
                                            "per_node": rep.per_node, "failovers": rep.failovers})  # fmt: skip
        out.write_text(json.dumps(res))
        print(f"two-node: {runs} sessions restored by rdma and tcp across {res['members']}", flush=True)
        return 0
    finally:
        srv.terminate()
        srv.wait(10)
        etcd.stop()


def guest_main(runs: int, out: Path) -> int:
    node = int(os.environ["RDMAKV_NODE"])
    addrs = os.environ["RDMAKV_NODE_ADDRS"].split(",")
    with tempfile.TemporaryDirectory(prefix="two-node-") as d:
        tmp = Path(d)
        return node1(addrs[1], addrs[0], tmp) if node == 1 else node0(addrs[0], addrs[1], tmp, runs, out)


def run(runs: int, out_json: Path, timeout: float = 600) -> dict:
    """Host side: boot the pair, run the guest side, return its result."""
    from rdmakv.guest import rxe_vm

    repo = Path(__file__).resolve().parents[1]
    out_json.parent.mkdir(parents=True, exist_ok=True)  # bench/out/ is not in a fresh clone
    out_json.unlink(missing_ok=True)
    rc = rxe_vm.run([sys.executable, "-m", "bench", "two-node", "--guest-side", "--runs", str(runs), "--json",
                     str(out_json)], nodes=2, cwd=str(repo), timeout=timeout, mem="2G",
                    env={"PYTHONPATH": str(repo)})  # fmt: skip
    if rc != 0 or not out_json.exists():
        raise RuntimeError(f"two-node run failed (status {rc})")
    return json.loads(out_json.read_text())


def summarise(res: dict) -> dict:
    from .stats import summary

    out = {}
    for label in ("rdma", "tcp"):
        rows = [r for r in res["restores"] if r["client"] == label]
        out[label] = summary([r["s"] for r in rows])
        out[label]["transports"] = sorted({r["transport"] for r in rows})
    out["rdma_over_tcp"] = round(out["rdma"]["median_ms"] / out["tcp"]["median_ms"], 3)
    return out


def report(r: dict) -> str:
    s = r["summary"]
    return "\n".join([
        "# A cluster across two rxe guests (UML, one per core, a real link)", "",
        f"One run; {r['result']['runs']} sessions of {TOKENS} tokens (Qwen2.5-0.5B shape), R = 1 so each session's "
        f"chunks are split between {', '.join(r['result']['members'])}; the client runs on node 0. Each "
        "restore is timed whole, in the guest (UML: compare the two rows, not with the host).", "",
        "| restore by | median ms | p99 ms | transports reported |", "|---|---|---|---|",
        *(f"| {k} | {s[k]['median_ms']:.1f} | {s[k]['p99_ms']:.1f} | {', '.join(s[k]['transports'])} |"
          for k in ("rdma", "tcp")),
        "", f"RDMA / TCP median: {s['rdma_over_tcp']}. Link limits in the same harness: "
        "bench/results/two-node/perftest.md.", ""])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rdmakv bench two-node", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", default="bench/results/two-node")
    p.add_argument("--guest-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.guest_side:
        return guest_main(args.runs, Path(args.json))
    from .envinfo import collect

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(args.runs, out / "cluster-raw.json")
    r = {"env": collect(), "result": res, "summary": summarise(res)}
    for row in res["restores"]:  # a row labelled rdma must have come by RDMA from every node
        if row["client"] == "rdma" and row["transport"] != "rdma":
            raise SystemExit(f"an RDMA restore reported {row['transport']}: {row}")
    (out / "cluster.json").write_text(json.dumps(r, indent=2))
    (out / "cluster.md").write_text(report(r))
    print(report(r))
    return 0
