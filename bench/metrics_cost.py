"""What Prometheus metrics cost a server: `rdmakv bench metrics-cost [--runs 300] [--out DIR]`.

The same warm saves and TCP restores of one session against a real `rdmakv serve` without and
with `--metrics-listen` (alternating rounds, so drift hits both), and the time of one scrape
with 1, 16 and 64 namespaces. One run, on this host.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path

from rdmakv import kvgen
from rdmakv.client.store import connect as connect_node
from rdmakv.cluster.etcd_server import free_port
from rdmakv.store.server.spawn import ServerProcess

from .envinfo import collect
from .plots import pyplot
from .stats import summary

KEY = "6b" * 32


def _ops(url: str, runs: int, kv) -> tuple[list[float], list[float]]:
    saves, restores = [], []
    with connect_node(url, key=KEY, transport="tcp", window=64) as st:
        st.save("s", kv)
        for _ in range(runs):
            t0 = time.perf_counter()
            st.save("s", kv)
            t1 = time.perf_counter()
            st.restore("s")
            t2 = time.perf_counter()
            saves.append(t1 - t0)
            restores.append(t2 - t1)
    return saves, restores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rdmakv bench metrics-cost", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--out", default="bench/results/operations")
    args = p.parse_args(argv)
    kv = kvgen.generate(kvgen.token_stream(1, 256), kvgen.QWEN25_05B)
    mport = free_port()
    with tempfile.TemporaryDirectory() as d:
        plain = ServerProcess(f"{d}/a", "256MiB", "--fsync", "never", "--transport", "tcp", key_hex=KEY).start()
        metered = ServerProcess(f"{d}/b", "256MiB", "--fsync", "never", "--transport", "tcp", "--metrics-listen",
                                f"127.0.0.1:{mport}", key_hex=KEY).start()  # fmt: skip
        try:
            res: dict[str, tuple[list[float], list[float]]] = {"off": ([], []), "on": ([], [])}
            for _ in range(5):  # alternate rounds
                for label, srv in (("off", plain), ("on", metered)):
                    saves_s, restores_s = _ops(srv.url("bench"), args.runs // 5, kv)
                    res[label][0].extend(saves_s)
                    res[label][1].extend(restores_s)
            scrape = {}
            for n in (1, 16, 64):
                for i in range(n):
                    with connect_node(metered.url(f"ns{i}"), key=KEY, transport="tcp") as st:
                        st.put_blob("b", b"x")
                times = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as resp:
                        body = resp.read()
                    times.append(time.perf_counter() - t0)
                scrape[n] = {**summary(times), "bytes": len(body)}
        finally:
            plain.stop()
            metered.stop()
    r = {"env": collect(), "runs": args.runs, "tokens": 256,
         "warm_save": {k: summary(v[0]) for k, v in res.items()},
         "restore": {k: summary(v[1]) for k, v in res.items()}, "scrape": scrape}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics_cost.json").write_text(json.dumps(r, indent=2))
    lines = ["# What metrics cost a server (one run, this host, TCP loopback)", "",
             f"{args.runs} warm saves and restores of a 256-token session (3 MiB) per setting, alternating.", "",
             "| | warm save median ms | p99 | restore median ms | p99 |", "|---|---|---|---|---|"]  # fmt: skip
    for k, label in (("off", "no metrics"), ("on", "--metrics-listen")):
        ws, rs = r["warm_save"][k], r["restore"][k]
        lines.append(f"| {label} | {ws['median_ms']:.3f} | {ws['p99_ms']:.3f} | {rs['median_ms']:.3f} | "
                     f"{rs['p99_ms']:.3f} |")  # fmt: skip
    lines += ["", "| namespaces | scrape median ms | bytes |", "|---|---|---|"]
    lines += [f"| {n} | {s['median_ms']:.2f} | {s['bytes']:,} |" for n, s in scrape.items()]
    (out / "metrics_cost.md").write_text("\n".join(lines) + "\n")
    try:
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar([0, 1, 3, 4], [r["warm_save"]["off"]["median_ms"], r["warm_save"]["on"]["median_ms"],
                              r["restore"]["off"]["median_ms"], r["restore"]["on"]["median_ms"]],
               color=["C0", "C1", "C0", "C1"])  # fmt: skip
        ax.set_xticks([0, 1, 3, 4], ["save", "save+m", "restore", "restore+m"])
        ax.set_ylabel("median ms")
        fig.tight_layout()
        fig.savefig(out / "metrics_cost.png", dpi=100)
    except ImportError:
        pass
    print("\n".join(lines))
    return 0
