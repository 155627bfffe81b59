"""Markdown report and plot for `python -m bench.llama --out-dir DIR`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _ms(d: dict, k: str) -> str:
    return f"{d[k]['median_ms']:.2f}"


def markdown(r: dict[str, Any]) -> str:
    w, b, t = r["walls_client_ms"], r["breakdown_ms"], r["targets"]
    env = r["environment"]
    slots, abi = r["slots_at_once"], r["kvstore_abi"]
    lines = [
        "# llama-server slot save/restore: direct, through the proxy, from the node-local copy",
        "",
        f"Slot of {r['slot']['n_saved_tokens']} tokens, {r['slot']['file_bytes']:,} bytes; {r['params']['runs']} runs, "
        f"medians; store over {r['params']['transport']}; slot dir on {r['params']['slot_dir_fs']}. "
        f"Host: {env.get('accel', '?')}, {env.get('cpus', '?')} CPUs, kernel {env.get('kernel', '?')}; "
        f"load at start/end {env.get('loadavg_1m_at_start_end')}.",
        "",
        "| | direct (llama-server's own file) | proxy (store) | proxy (local copy) |",
        "|---|---|---|---|",
        f"| restore ms | {_ms(w, 'restore_direct')} | {_ms(w, 'restore_proxy')} | {_ms(w, 'restore_local')} |",
        f"| warm save ms | {_ms(w, 'save_direct')} | {_ms(w, 'save_proxy_warm')} | {_ms(w, 'save_local')} |",
        f"| cold save ms | {_ms(w, 'save_direct')} | {_ms(w, 'save_proxy_cold')} | |",
        "",
        "## Targets",
        "",
        "| target | measured |",
        "|---|---|",
        *(f"| {k} | {v:.2f} |" for k, v in t.items()),
        f"| proxy 4 slots / 1 slot >= 3 | {slots['proxy']['four / one']:.2f} "
        f"(llama-server alone: {slots['direct']['four / one']:.2f}) |",
        "",
        "## Where the time goes (medians, ms)",
        "",
        *(f"- {k}: {v['median_ms']:.3f}" for k, v in b.items()),
        "",
        "## kv_store_v1 library from C vs the Python API",
        "",
        f"{abi['session']}, {abi['transport']}.",
        "",
        "| | C consumer via libkv_store_rdmakv.so | Python API |",
        "|---|---|---|",
        *(f"| {k.replace('_', ' ')} | {abi['c_consumer_via_library'][k]:.2f} | {abi['python_api'][k]:.2f} |"
          for k in ("cold_save_ms", "warm_save_ms", "restore_ms")),
        "",
    ]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = r["walls_client_ms"]
    groups = {"restore": ("restore_direct", "restore_proxy", "restore_local"),
              "warm save": ("save_direct", "save_proxy_warm", "save_local")}  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for gi, keys in enumerate(groups.values()):
        for i, (k, label) in enumerate(zip(keys, ("direct", "proxy (store)", "proxy (local copy)"))):
            ax.bar(gi * 4 + i, w[k]["median_ms"], color=f"C{i}", label=label if gi == 0 else None)
    ax.set_xticks([1, 5], list(groups))
    ax.set_ylabel("median ms")
    ax.set_title(f"slot file of {r['slot']['file_bytes'] / 2**20:.1f} MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(r: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(r))
    plot(r, out_dir / "walls.png")
