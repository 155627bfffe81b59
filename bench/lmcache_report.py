"""bench.lmcache's Markdown report, its plot and its targets (each with what was measured)."""

from __future__ import annotations

import os

REMOTE = ("lm", "redis")  # the remote tiers LMCache ships, that rdmakv is held against
RDMAKV = ("rdmakv-rdma", "rdmakv-tcp")


def _med(result: dict, tier: str, size: str, what: str) -> float | None:
    row = result["tiers"].get(tier, {}).get(size, {})
    return row.get(what, {}).get("median_ms") if isinstance(row, dict) else None


def _sizes(result: dict) -> list[str]:
    return [str(n) for n in result["params"]["sizes"]]


def _stored(result: dict, tier: str) -> dict[str, int]:
    """Bytes a tier holds for the shared-prefix pair: {label: bytes} (rdmakv: one per window)."""
    sp = result["tiers"].get(tier, {}).get("shared_prefix")
    if not sp:
        return {}
    if "windows" in sp:
        return {f"{tier} W={w}": v["bytes"] for w, v in sp["windows"].items()}
    after, before = sp["after"], sp["before"]
    key = "bytes" if "bytes" in after else "rss"
    return {tier: after.get(key, 0) - before.get(key, 0)}


def targets(result: dict) -> dict:
    out: dict = {}
    for size in _sizes(result):
        meds = {t: _med(result, t, size, "retrieve") for t in REMOTE}
        remote = {t: v for t, v in meds.items() if v is not None}
        if not remote:
            continue
        fastest = min(remote, key=remote.__getitem__)
        for t in RDMAKV:
            mine = _med(result, t, size, "retrieve")
            if mine is not None:
                out[f"{t} retrieve {size} tok / fastest remote ({fastest}) <= 1"] = round(mine / remote[fastest], 3)
    bytes_by = {}
    for tier in result["tiers"]:
        bytes_by.update(_stored(result, tier))
    others = {k: v for k, v in bytes_by.items() if not k.startswith("rdmakv")}
    if others:
        least = min(others, key=others.__getitem__)
        for k, v in bytes_by.items():
            if k.startswith("rdmakv"):
                out[f"{k} bytes for the shared prefix / least of the others ({least}) < 1"] = round(
                    v / others[least], 3)
    keeps = {}
    for tier, r in result["tiers"].items():
        rs = r.get("restart")
        if rs:
            keeps[tier] = all(v["found"] == v["tokens"] for v in rs.values())
    out["remote tiers keeping everything across a clean and a killed restart"] = sorted(t for t, k in keeps.items()
                                                                                       if k and t != "local-disk")
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    p = result["params"]
    lines = [
        "# LMCache through rdmakv and LMCache's own tiers",
        "",
        f"LMCache {env.get('lmcache')} engine (CPU torch {env.get('torch')}), {p['model']}, "
        f"{p['chunk_tokens']}-token chunks, {p['runs']} runs per cell (medians, p99 in brackets, ms). "
        f"Host: {env.get('accel')}, {env.get('cpus')} CPUs, kernel {env.get('kernel')}; load at start/end "
        f"{[round(x, 2) for x in result['load_at_start']]} / {[round(x, 2) for x in result['load_at_end']]}.",
        "Every run stores a new prompt (a store is timed until the tier holds it), then looks it up and retrieves "
        "it into a zeroed KV tensor, checked bit-exact. Each tier runs in its own process; all tiers in this run.",
    ]
    if result.get("rdma_skipped_because"):
        lines += ["", f"rdmakv over RDMA skipped: {result['rdma_skipped_because']}."]
    for size in _sizes(result):
        lim = result.get("limits", {}).get(size, {})
        lines += ["", f"## {size} tokens ({_mib(result, size)} of KV)", "",
                  "| tier | retrieve (lookup + retrieve) | of which lookup | of which LMCache's copy into the KV | "
                  "store (until held) | engine.store returns | retrieves by |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for tier, r in result["tiers"].items():
            row = r.get(size) if isinstance(r, dict) else None
            if not row:
                lines.append(f"| {tier} | {r.get('error', 'not run')[:80]} | | | | | |")
                continue
            by = ", ".join(f"{k} x{v}" for k, v in row.get("retrieves_by", {}).items()) or "-"
            lines.append(f"| {tier} | {_c(row, 'retrieve')} | {_c(row, 'lookup')} | {_c(row, 'copy')} | "
                         f"{_c(row, 'store')} | {_c(row, 'store_call')} | {by} |")  # fmt: skip
        if lim:
            limits = [f"memcpy {_c(lim, 'memcpy')}", f"raw loopback TCP {_c(lim, 'loopback_tcp')}"]
            if "raw_pyverbs_read" in lim:
                limits.append(f"raw pyverbs READ {_c(lim, 'raw_pyverbs_read')}")
            lines += ["", f"Limits for the same bytes, same run: {'; '.join(limits)} ms."]
    lines += ["", "## Bytes held for two engines sharing a 1k-token system prompt", "",
              f"Each engine stores its prompt: a {p['system_prompt_tokens']}-token system prompt (it ends inside "
              f"LMCache's fourth chunk) and its own {p['user_turn_tokens']}-token turn. Raw KV of both prompts: "
              f"{_shared_logical(result)}.", "", "| tier | bytes held | vs raw KV | how measured |",
              "|---|---|---|---|"]  # fmt: skip
    logical = _shared_logical_bytes(result)
    for tier in result["tiers"]:
        for label, b in _stored(result, tier).items():
            lines.append(f"| {label} | {b:,} | {b / logical:.3f} | {_how(tier)} |")
    lines += ["", "## After the server restarts", "", "| tier | clean restart (SIGTERM) | killed (SIGKILL) | promise |",
              "|---|---|---|---|"]  # fmt: skip
    for tier, r in result["tiers"].items():
        rs = r.get("restart") if isinstance(r, dict) else None
        if rs:
            lines.append(f"| {tier} | {rs['clean']['found']}/{rs['clean']['tokens']} tokens found | "
                         f"{rs['killed']['found']}/{rs['killed']['tokens']} | {r.get('survives', '')} |")  # fmt: skip
    lines += ["", "## Targets", "", "| target | measured |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["targets"].items()]
    lines += ["", f"Total {result['total_seconds']} s. Plot: `{os.path.basename(result.get('plots', ['-'])[0])}`.", ""]
    return "\n".join(lines)


def _c(row: dict, what: str) -> str:
    s = row.get(what, {})
    if "median_ms" not in s:
        return "-"
    return f"{s['median_ms']:.1f} [{s['p99_ms']:.1f}]"


def _mib(result: dict, size: str) -> str:
    for r in result["tiers"].values():
        if isinstance(r, dict) and size in r:
            return f"{r[size]['bytes'] / 2**20:.0f} MiB"
    return "?"


def _shared_logical_bytes(result: dict) -> int:
    for r in result["tiers"].values():
        sp = r.get("shared_prefix") if isinstance(r, dict) else None
        if sp:
            return sp["logical_bytes"]
    return 1


def _shared_logical(result: dict) -> str:
    return f"{_shared_logical_bytes(result):,} bytes"


def _how(tier: str) -> str:
    return {"redis": "sum of STRLEN of its keys", "lm": "value bytes PUT for distinct keys (its server has no LIST)",
            "local-disk": "file sizes under both engines' directories"}.get(
        tier, "chunk and manifest bytes (STATS), one namespace per window")  # fmt: skip


def plots(result: dict, out: str) -> list[str]:
    from .plots import pyplot

    plt = pyplot()
    sizes = _sizes(result)
    tiers = [t for t, r in result["tiers"].items() if isinstance(r, dict) and "error" not in r]
    fig, axes = plt.subplots(1, 2 * len(sizes), figsize=(5 * 2 * len(sizes), 4))
    for i, size in enumerate(sizes):
        for j, what in enumerate(("retrieve", "store")):
            ax = axes[2 * i + j]
            med = [result["tiers"][t][size][what]["median_ms"] for t in tiers]
            p99 = [result["tiers"][t][size][what]["p99_ms"] for t in tiers]
            ax.bar(tiers, med, yerr=[[0] * len(med), [b - a for a, b in zip(med, p99)]], capsize=3,
                   color=["tab:red" if t.startswith("rdmakv") else "tab:gray" for t in tiers])  # fmt: skip
            ax.set_title(f"{what}, {size} tokens (median, p99 whisker)")
            ax.set_ylabel("ms")
            ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path = os.path.join(out, "lmcache.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
