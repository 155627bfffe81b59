"""Markdown report and plot for `rdmakv bench ttft --out-dir DIR` (plus bench.ttft_rdma's JSON
when it sits beside it as rdma.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CASES = {
    "reprefill": "1. re-prefill (nothing cached)",
    "cache_ram": "2. llama-server --cache-ram hit (same process)",
    "slot_file": "3. llama-server's own slot file (restore + turn)",
    "proxy_tcp": "4. rdmakv llama-proxy --auto-cache, store over TCP",
}


def _ms(v: float) -> str:
    return f"{v / 1e3:.1f} s" if v >= 10_000 else f"{v:.1f}"


def markdown(r: dict[str, Any], rdma: dict[str, Any] | None = None) -> str:
    env, p, tg = r["environment"], r["params"], r["targets"]
    m = p["model"]
    lines = [
        "# Time to first token of the next turn: re-prefill vs restoring the history",
        "",
        f"Model: random weights with Qwen2.5-0.5B's dimensions ({m.get('n_layer')} layers, {m.get('n_embd')} wide, "
        f"{m.get('n_head')} heads, {m.get('n_head_kv')} KV heads, FFN {m.get('n_ff')}; {m.get('weights')}, "
        f"vocab {m.get('vocab')}, KV cache {m.get('kv_type')}). llama-server `-t {p['threads']}`, "
        f"{p['slots']} slot, flash attention {m.get('flash_attn')}; slot dir on {p['slot_dir_fs']}; the next "
        f"turn adds {p['suffix_tokens']} new tokens (a new suffix every run) and TTFT is request sent to first "
        f"streamed event. Medians of {p['runs']} runs ({p['prefill_runs']} for re-prefill, the first of them "
        f"turn 1 itself); W = {p['window']}. Host: {env.get('accel')}, {env.get('cpus')} CPUs, kernel "
        f"{env.get('kernel')}; load at start/end {env.get('loadavg_1m_at_start_end')}. One run of the suite, "
        f"{r['seconds_total']:.0f} s.",
        "",
        "| TTFT (ms, median) | " + " | ".join(f"{c['context']:,} tokens" for c in r["contexts"]) + " |",
        "|---|" + "---|" * len(r["contexts"]),
    ]
    for key, label in CASES.items():
        lines.append(f"| {label} | " + " | ".join(_ms(c["ttft"][key]["median_ms"]) for c in r["contexts"]) + " |")
    if rdma:
        by = {c["context"]: c for c in rdma["contexts"]}
        lines.append("| 5. (not a TTFT) the restore's store fetch + file alone, RDMA READ, rxe guest | " + " | ".join(
            _ms(by[c["context"]]["rdma"]["median_ms"]) if c["context"] in by else "-" for c in r["contexts"]) + " |")
    lines += [
        "",
        "| per context | " + " | ".join(f"{c['context']:,}" for c in r["contexts"]) + " |",
        "|---|" + "---|" * len(r["contexts"]),
        "| slot file bytes | " + " | ".join(f"{c['file_bytes']:,}" for c in r["contexts"]) + " |",
        "| llama-server's own restore, ms (its timings) | " + " | ".join(
            f"{_median(c['detail']['slot_file_restore_ms']):.1f}" for c in r["contexts"]) + " |",
        "| proxy: prefix restore, ms (fetch + file + llama-server's load) | " + " | ".join(
            f"{_median([x.get('restore_ms', 0) for x in c['detail']['proxy_report']]):.1f}" for c in r["contexts"])
        + " |",
        "| proxy: of which the store fetch into the file, ms | " + " | ".join(
            f"{_median([x.get('fetch_ms', 0) for x in c['detail']['proxy_report']]):.1f}" for c in r["contexts"])
        + " |",
        "| proxy: before forwarding (tokenize, lookup, slots, restore), ms | " + " | ".join(
            f"{_median([x.get('prepare_ms', 0) for x in c['detail']['proxy_report']]):.1f}" for c in r["contexts"])
        + " |",
        "| proxy: tokens restored | " + " | ".join(
            str(_median([x.get("tokens_restored", 0) for x in c["detail"]["proxy_report"]])) for c in r["contexts"])
        + " |",
        "| floor: llama-server's eval of the new tokens after a hit (its prompt_ms), ms | " + " | ".join(
            f"{_median([ms for case, ms in c['detail']['turn_eval_ms'] if case != 'reprefill' and ms]):.1f}"
            for c in r["contexts"]) + " |",
        "| limit: writing the file's bytes once, ms | " + " | ".join(
            f"{c['limits_ms']['file_write_ms']:.1f}" for c in r["contexts"]) + " |",
        "| limit: the file's bytes once over loopback TCP (raw socket), ms | " + " | ".join(
            f"{c['limits_ms']['loopback_tcp_ms']:.1f}" for c in r["contexts"]) + " |",
        "",
        f"## Goals (at {tg['context']:,} tokens)",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
        f"| proxy TTFT <= 1/200 of re-prefill | 1/{1 / tg['proxy_over_reprefill']:.0f} | "
        f"{'yes' if tg['proxy_over_reprefill'] <= tg['proxy_over_reprefill_goal'] else 'no'} |",
        f"| proxy TTFT <= 1.3x llama-server's own slot file | {tg['proxy_over_slot_file']:.2f}x | "
        f"{'yes' if tg['proxy_over_slot_file'] <= tg['proxy_over_slot_file_goal'] else 'no'} |",
        "",
    ]
    floor = _median([ms for case, ms in next(c for c in r["contexts"] if c["context"] == tg["context"])["detail"][
        "turn_eval_ms"] if ms])  # fmt: skip
    lines += [
        f"The floor under every cached case is llama-server evaluating the new tokens after the hit: "
        f"{floor:.0f} ms at {tg['context']:,} tokens here, so no cache can reach below "
        f"1/{tg['reprefill_ms'] / floor:.0f} of re-prefill on this machine.",
        "",
    ] if floor else []
    if rdma:
        lines += rdma_section(rdma)
    return "\n".join(lines)


def rdma_section(rdma: dict[str, Any]) -> list[str]:
    env = rdma["environment"]
    lines = [
        "## 5. RDMA: the store fetch alone, in the rxe guest",
        "",
        "llama-server was not run in the guest (one UML vCPU, page faults ~82 us: its prefill and model load "
        "there say nothing about the host). Measured instead, in one guest run: the proxy's restore without "
        "llama-server, i.e. fetch the prefix entry of each context's slot file from a store in the guest and "
        f"write its slot file, by RDMA READ and over TCP. Guest: {env.get('accel')}, "
        f"RDMA device {env.get('rdma', {}).get('name', '?')}. Medians of {rdma['runs']} runs, ms.",
        "",
        "| context | bytes | RDMA READ fetch + file | TCP fetch + file | RDMA / TCP | transport reported |",
        "|---|---|---|---|---|---|",
    ]
    for c in rdma["contexts"]:
        lines.append(f"| {c['context']:,} | {c['bytes']:,} | {c['rdma']['median_ms']:.1f} | "
                     f"{c['tcp']['median_ms']:.1f} | {c['rdma']['median_ms'] / c['tcp']['median_ms']:.2f} | "
                     f"{', '.join(sorted(set(c['rdma']['transports'])))} |")  # fmt: skip
    return [*lines, ""]


def _median(xs: list) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def plot(r: dict[str, Any], path: Path, rdma: dict[str, Any] | None = None) -> None:
    from .plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [c["context"] for c in r["contexts"]]
    for key, label in CASES.items():
        ax.plot(xs, [c["ttft"][key]["median_ms"] for c in r["contexts"]], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("history (tokens)")
    ax.set_ylabel("time to first token (ms, median)")
    ax.set_title("Next-turn TTFT, Qwen2.5-0.5B-shaped model, 2 CPU threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(r: dict[str, Any], out: Path) -> None:
    rdma_path = out / "rdma.json"
    rdma = json.loads(rdma_path.read_text()) if rdma_path.exists() else None
    (out / "report.md").write_text(markdown(r, rdma))
    plot(r, out / "ttft.png", rdma)


def main(argv: list[str] | None = None) -> int:
    """Re-render DIR's report and plot from its results.json (default bench/results/ttft)."""
    d = Path(argv[0] if argv else "bench/results/ttft")
    write(json.loads((d / "results.json").read_text()), d)
    return 0
