"""Markdown and plot for `rdmakv bench throughput` (bench.throughput's JSON)."""

from __future__ import annotations

from typing import Any

from .plots import pyplot

# (row key, label, its limit's row key, target ratio text)
PATHS = [
    ("cold_save_tcp", "cold save, TCP", "fdatasync_limit", "write + fdatasync"),
    ("restore_tcp", "restore, TCP", "raw_socket_limit", "raw loopback socket"),
    ("cold_save_rdma", "cold save, RDMA WRITE", "write_save_floor", "ib_write_bw, then write + fdatasync"),
    ("restore_rdma", "restore, RDMA READ", "ib_read_bw_limit", "ib_read_bw"),
]


def _limit_ms(row: dict, key: str) -> float | None:
    v = row.get(key) or {}
    return v.get("bw_time_per_message_ms") if key == "ib_read_bw_limit" else v.get("median_ms")


def _mbps(nbytes: int, ms: float | None) -> str:
    return f"{nbytes / (ms / 1e3) / 1e6:,.0f}" if ms else "-"


def _target(path: str, tokens: int, rdma_guest: bool) -> str:
    if path == "cold_save_tcp":
        return "≤ 1.5×"
    if path == "restore_tcp":
        return "≤ 2×" if tokens <= 256 else "≤ 1.5×"
    if path == "restore_rdma":
        return "≤ 1.10×" if tokens <= 256 else "≤ 1.05×"
    return "(WRITE ≥ 2× TCP)"


def markdown(r: dict[str, Any]) -> str:
    env = r.get("environment", {})
    p = r.get("params", {})
    lines = [
        "# rdmakv bench throughput: large sessions against the limits of the same run",
        "",
        f"Host: {env.get('accel')}, {env.get('cpus')} CPUs, kernel {env.get('kernel')}, Python {env.get('python')}. "
        f"Server `--fsync {p.get('fsync')}`, W = {p.get('window')}, Qwen2.5-0.5B shape (12,288 bytes per token). "
        f"RDMA: {'used' if r.get('rdma_used') else 'not used: ' + str(r.get('rdma_skipped_because'))}. "
        f"One run, {r.get('total_seconds')} s. Medians; ratio = rdmakv time / limit time (lower is better).",
        "",
    ]
    rows = (r.get("sizes") or {}).get("rows") or []
    if "error" in (r.get("sizes") or {}):
        lines += [f"Sizes part failed: {r['sizes']['error']}", ""]
    if rows:
        lines += ["| tokens | bytes | path | rdmakv ms | MB/s | limit | limit ms | limit MB/s | ratio | target | "
                  "server CPU s/GB | transports |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in rows:
            for key, label, lim_key, lim_label in PATHS:
                v = row.get(key)
                if not v:
                    continue
                lm = _limit_ms(row, lim_key)
                ratio = _ratio(v["median_ms"], lm)
                lines.append(
                    f"| {row['tokens']:,} | {row['bytes']:,} | {label} | {v['median_ms']:.1f} | "
                    f"{_mbps(row['bytes'], v['median_ms'])} | {lim_label} | {lm and f'{lm:.1f}' or '-'} | "
                    f"{_mbps(row['bytes'], lm)} | {ratio} | {_target(key, row['tokens'], bool(r.get('rdma_used')))} | "
                    f"{v.get('server_cpu_s_per_GB', 0):.2f} | {v.get('transports')} |"
                )
        lines += _floor_lines(rows)
        if any("cold_save_rdma" in row for row in rows):
            lines += ["", "Cold save by RDMA WRITE vs TCP (target ≥ 2× and never slower): " + ", ".join(
                f"{row['tokens']:,} tokens {row['cold_save_write_speedup_over_tcp']:.2f}×" for row in rows
                if "cold_save_write_speedup_over_tcp" in row)]  # fmt: skip
            lines += _write_floor_lines(rows)
        lines.append("")
    conc = r.get("concurrency") or {}
    if "error" in conc:
        lines += [f"Concurrency part failed: {conc['error']}", ""]
    elif conc:
        lines += ["## Two clients at once vs one (different sessions; target ≥ 1.6×)", "",
                  "| transport | op | tokens | 1 client MB/s | 2 clients MB/s | ratio | server CPU s (1 / 2) | "
                  "clients' CPU s (1 / 2) | cores busy (1 / 2) | CPU cap: cores ÷ cores busy with 1 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for t, ops in conc.items():
            for op, s in ops.items():
                one, two = s["one"], s["two"]
                lines.append(f"| {t} | {op} | {s['tokens']:,} | {one['aggregate_MBps']:,.0f} | "
                             f"{two['aggregate_MBps']:,.0f} | {s['ratio']:.2f}× | "
                             f"{one['server_cpu_s_total']:.2f} / {two['server_cpu_s_total']:.2f} | "
                             f"{_pair(one, two, 'client_cpu_s_total')} | {_pair(one, two, 'cores_busy')} | "
                             f"{_ratio(s.get('cpu_cap'), 1.0)} |")  # fmt: skip
        lines += ["", "Cores busy: the server's and the clients' CPU seconds over the wall, while the clients "
                  "ran. One client that keeps B of the machine's C cores busy leaves two at most C ÷ B times "
                  "its speed.", ""]  # fmt: skip
    ceiling = r.get("concurrency_limits") or {}
    if ceiling and "error" not in ceiling:
        lines += ["The same machine's ceiling, measured in this run with no rdmakv in it (two streams at once vs "
                  "one, each in its own process, same bytes per transfer):", "",
                  "| limit | 1 stream MB/s | 2 streams MB/s | ratio |", "|---|---|---|---|"]  # fmt: skip
        for name, label in (("raw_socket", "raw loopback socket"), ("raw_socket_mac", "raw socket + frame MAC"),
                            ("fdatasync", "write + fdatasync")):  # fmt: skip
            c = ceiling.get(name)
            if c is None:  # (a run from before this limit was measured)
                continue
            lines.append(f"| {label} | {c['one_MBps']:,.0f} | {c['two_MBps']:,.0f} | {c['ratio']:.2f}× |")
        lines.append("")
    peer = r.get("infinistore")
    if peer:
        lines += _peer_lines(peer, rows)
    prof = r.get("profile")
    if prof:
        lines += _profile_lines(prof)
    return "\n".join(lines) + "\n"


def _floor_lines(rows: list[dict]) -> list[str]:
    """What the limits are made of: the raw transfer again with the frame MAC (Poly1305, in 1 MiB
    pieces, hashed by the sender and checked by the receiver), with each piece also written to a
    file, fdatasync'd at the end, and with the bytes work a save's design asks for (keys, the slab
    copy, the key check and the record checksum, in native calls); rdmakv's walls against them."""
    have = [row for row in rows if "raw_socket_mac_floor" in row]
    if not have:
        return []
    lines = ["", "What the limits are made of (same run): the raw socket again with the frame MAC on both "
             "ends; with the bytes also written to disk as they land (write + fdatasync); and with the bytes "
             "work of a save's design added (the sender's xxh3 keys; the receiver's copy into a second buffer, "
             "two xxh3 passes per 16 KiB chunk, the write from that copy), each in one native call, with no "
             "other per-chunk work. rdmakv's walls against these floors.", "",
             "| tokens | raw socket ms | + MAC ms | + MAC + disk ms | + design work ms | write + fdatasync ms | "
             "design floor / (write + fdatasync) | restore / (+ MAC) | cold save / (+ MAC + disk) | "
             "cold save / design floor |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in have:
        mac, durable = row["raw_socket_mac_floor"]["median_ms"], row["raw_durable_save_floor"]["median_ms"]
        design = row.get("raw_design_save_floor", {}).get("median_ms")
        sync = row["fdatasync_limit"]["median_ms"]
        restore, save = row.get("restore_tcp", {}).get("median_ms"), row.get("cold_save_tcp", {}).get("median_ms")
        lines.append(
            f"| {row['tokens']:,} | {row['raw_socket_limit']['median_ms']:.1f} | {mac:.1f} | {durable:.1f} | "
            f"{_ms(design)} | {sync:.1f} | {_ratio(design, sync)} | {_ratio(restore, mac)} | "
            f"{_ratio(save, durable)} | {_ratio(save, design)} |"
        )
    return lines


def _write_floor_lines(rows: list[dict]) -> list[str]:
    """The save by WRITE against its own floor: ib_write_bw for the bytes, then their write +
    fdatasync (the server logs them once they are there). A WRITE save near its floor cannot get
    faster; its ratio to TCP then only says how far TCP is from it."""
    have = [row for row in rows if "cold_save_rdma" in row and "write_save_floor" in row]
    if not have:
        return []
    lines = ["", "| tokens | cold save by WRITE ms | ib_write_bw ms | + write + fdatasync ms (WRITE floor) | "
             "WRITE save / floor | cold save by TCP ms | TCP save / WRITE floor |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in have:
        w, floor = row["cold_save_rdma"]["median_ms"], row["write_save_floor"]["median_ms"]
        tcp = row.get("cold_save_tcp", {}).get("median_ms")
        lines.append(f"| {row['tokens']:,} | {w:.1f} | {row['ib_write_bw_limit']['bw_time_per_message_ms']:.1f} | "
                     f"{floor:.1f} | {_ratio(w, floor)} | {_ms(tcp)} | {_ratio(tcp, floor)} |")  # fmt: skip
    return lines


def _pair(one: dict, two: dict, key: str) -> str:
    if key not in one or key not in two:  # (a run from before this was measured)
        return "-"
    return f"{one[key]:.2f} / {two[key]:.2f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(top: float | None, bottom: float | None) -> str:
    return "-" if not top or not bottom else f"{top / bottom:.2f}×"


def _peer_lines(peer: dict, rows: list[dict]) -> list[str]:
    lines = ["## InfiniStore 0.2.35 side by side (same guest, same bytes)", ""]
    if "skipped" in peer or "error" in peer:
        return lines + [f"Not run: {peer.get('skipped') or peer.get('error')}", ""]
    lines += [peer.get("note", ""), "",
              "| tokens | bytes | path | rdmakv ms | server CPU s/GB | InfiniStore ms | server CPU s/GB | "
              "InfiniStore / rdmakv |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by_tokens = {row["tokens"]: row for row in rows}
    for pr in peer.get("rows", []):
        row = by_tokens.get(pr["tokens"], {})
        for ours, theirs, label in (
            ("restore_rdma", "rdma_read", "RDMA read"),
            ("restore_tcp", "tcp_read", "TCP read"),
        ):
            o, t = row.get(ours), pr.get(theirs)
            if not t:
                continue
            if "error" in t:
                lines.append(f"| {pr['tokens']:,} | {pr['bytes']:,} | {label} | - | - | {t['error']} | - | - |")
                continue
            ratio = f"{t['median_ms'] / o['median_ms']:.2f}×" if o else "-"
            ours_ms = f"{o['median_ms']:.1f}" if o else "-"
            ours_cpu = f"{o['server_cpu_s_per_GB']:.2f}" if o else "-"
            lines.append(
                f"| {pr['tokens']:,} | {pr['bytes']:,} | {label} | {ours_ms} | {ours_cpu} | {t['median_ms']:.1f} | "
                f"{t['server_cpu_s_per_GB']:.2f} | {ratio} |"
            )
    return lines + [""]


def _profile_lines(prof: dict) -> list[str]:
    lines = ["## Server profile (py-spy, busy samples)", ""]
    if "skipped" in prof:
        return lines + [prof["skipped"], ""]
    for phase, v in prof.items():
        if "error" in v:
            lines += [f"### {phase}: {v['error']}", ""]
            continue
        lines += [f"### {phase}: {v.get('op')}, walls {v.get('walls_ms')} ms; {v['samples']} samples at "
                  f"{v['rate_hz']} Hz, busy ones only ({v.get('waiting_samples', 0)} of idle workers left out; "
                  f"raw stacks: {v['raw']})", "", "| own % | function | | inclusive % | function |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for a, b in zip(v["own"][:12], v["inclusive"][:12]):
            lines.append(f"| {a['pct']} | `{a['frame']}` | | {b['pct']} | `{b['frame']}` |")
        lines.append("")
    return lines


def plot(r: dict, path: str) -> str | None:
    rows = (r.get("sizes") or {}).get("rows") or []
    if not rows:
        return None
    try:
        plt = pyplot()
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    tokens = [row["tokens"] for row in rows]
    colors = {"cold_save_tcp": "C0", "restore_tcp": "C1", "cold_save_rdma": "C2", "restore_rdma": "C3"}
    for key, label, lim_key, lim_label in PATHS:
        if not any(key in row for row in rows):
            continue
        ys = [row["bytes"] / (row[key]["median_ms"] / 1e3) / 1e6 if key in row else None for row in rows]
        ax.plot(tokens, ys, "o-", color=colors[key], label=label)
        lim = [_limit_ms(row, lim_key) for row in rows]
        ly = [row["bytes"] / (m / 1e3) / 1e6 if m else None for row, m in zip(rows, lim)]
        if any(ly):
            ax.plot(tokens, ly, "--", color=colors[key], alpha=0.6, label=f"limit: {lim_label}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("session size (tokens, Qwen2.5-0.5B shape)")
    ax.set_ylabel("MB/s (median)")
    where = "rxe guest" if r.get("rdma_used") else "host, TCP loopback"
    ax.set_title(f"rdmakv throughput vs its limits ({where}, fsync {r.get('params', {}).get('fsync')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(before: dict, after: dict, label_before: str = "before", label_after: str = "after") -> str:
    """Before/after table of two runs' medians (each ratio is against its own run's limit)."""
    rows_b = {r["tokens"]: r for r in (before.get("sizes") or {}).get("rows", [])}
    lines = [f"| tokens | path | {label_before} ms | ratio to limit | {label_after} ms | ratio to limit | speed-up | "
             "server CPU s/GB (before / after) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for ra in (after.get("sizes") or {}).get("rows", []):
        rb = rows_b.get(ra["tokens"])
        if rb is None:
            continue
        for key, label, lim_key, _ in PATHS:
            if key not in ra or key not in rb:
                continue
            b, a = rb[key]["median_ms"], ra[key]["median_ms"]
            lb, la = _limit_ms(rb, lim_key), _limit_ms(ra, lim_key)
            lines.append(
                f"| {ra['tokens']:,} | {label} | {b:.1f} | {_ratio(b, lb)} | {a:.1f} | "
                f"{_ratio(a, la)} | {b / a:.2f}× | {rb[key].get('server_cpu_s_per_GB', 0):.2f} / "
                f"{ra[key].get('server_cpu_s_per_GB', 0):.2f} |"
            )
    cb, ca = before.get("concurrency") or {}, after.get("concurrency") or {}
    for t in ca:
        for op in ca[t]:
            if t in cb and op in cb[t] and "ratio" in cb[t][op]:
                x, y = cb[t][op], ca[t][op]
                lines.append(f"| {y['tokens']:,} | 2 clients vs 1, {op} ({t}) | | {x['ratio']:.2f}× | | "
                             f"{y['ratio']:.2f}× | | |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``rdmakv bench throughput-compare BEFORE.json AFTER.json``: the before/after table."""
    import json

    with open(argv[0]) as fb, open(argv[1]) as fa:
        print(compare(json.load(fb), json.load(fa)))
    return 0
