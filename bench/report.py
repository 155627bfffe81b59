"""Markdown report, target check and PNG plots from a results dict."""

from __future__ import annotations

import os
import sys


def _get(d: dict, *path, default=None):
    for p in path:
        if isinstance(p, int) and isinstance(d, list) and -len(d) <= p < len(d):
            d = d[p]
        elif isinstance(d, dict) and p in d:
            d = d[p]
        else:
            return default
    return d


def targets(r: dict) -> dict:
    out = {}
    over_limit = _get(r, "limits", "rdma_restore_over_perftest")
    out["rdma_restore_over_perftest"] = {"value": over_limit, "target": "<= 1.25",
                                         "met": None if over_limit is None else over_limit <= 1.25}
    tcp = _get(r, "walls", "restore_tcp", "median_ms")
    rd = _get(r, "walls", "restore_rdma", "median_ms")
    speedup = tcp / rd if tcp and rd else None
    out["tcp_over_rdma_restore"] = {"value": speedup, "target": ">= 2",
                                    "met": None if speedup is None else speedup >= 2}
    raw = _get(r, "tcp_limit", "restore_default_over_raw")
    out["tcp_restore_over_raw_socket"] = {"value": raw, "target": "<= 2", "met": None if raw is None else raw <= 2}
    for key, path, goal, ok in (
        ("cold_save_tcp_over_write", ("saves", "by_size", 0, "tcp_over_rdma"), ">= 2", lambda v: v >= 2),
        ("write_save_server_cpu_over_tcp", ("saves", "server_cpu", "rdma_over_tcp"), "<= 0.3", lambda v: v <= 0.3),
        ("rdma_restore_p99_under_save_load", ("saves", "restore_under_save_load", "rdma", "p99_loaded_over_idle"),
         "<= 1.3", lambda v: v <= 1.3),
    ):  # fmt: skip
        v = _get(r, *path)
        out[key] = {"value": v, "target": goal, "met": None if v is None else ok(v)}
    cpu = _get(r, "server_cpu", "rdma_over_tcp")
    out["rdma_server_cpu_over_tcp"] = {"value": cpu, "target": "<= 0.05", "met": None if cpu is None else cpu <= 0.05}
    return out


def _fmt(x, nd=2) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _section_ok(r: dict, name: str, w) -> bool:
    """False (after saying why) when a suite is absent or failed, so the report still renders."""
    sec = r.get(name)
    if isinstance(sec, dict) and "error" in sec:
        w(f"## {name}: FAILED — {sec['error']}")
        w("")
        return False
    return sec is not None


def markdown(r: dict) -> str:
    env = r["environment"]
    lines: list[str] = []
    w = lines.append
    w(f"# rdmakv benchmark ({r['mode']} run, {r['started_at']})")
    w("")
    w("## Environment")
    w(f"- kernel {env['kernel']} ({env['machine']}), {env['accel']}, {env['cpus']} CPU(s), Python {env['python']}")
    dev = env["rdma"]
    if dev.get("available"):
        w(f"- RDMA device {dev['name']}: active MTU {dev['active_mtu_bytes']} B, max_sge {dev['max_sge']}, "
          f"max_qp_rd_atom {dev['max_qp_rd_atom']}, max_msg_sz {dev['max_msg_sz']:,}")
    else:
        w(f"- RDMA: not available ({dev.get('reason')})")
    w("- packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()))
    w(f"- server log fsync policy: {r['params']['fsync']}; all figures from one run, so ratios compare like with like")
    if not r["rdma_used"]:
        w(f"- **RDMA parts skipped**: {r['rdma_skipped_because']}")
    w("")
    w("## Targets (ratios within this run)")
    w("| target | value | goal | met |")
    w("|---|---|---|---|")
    for k, t in r["targets"].items():
        w(f"| {k} | {_fmt(t['value'], 3)} | {t['target']} | {_fmt(t['met'])} |")
    w("")
    ops = r.get("op_transports", {})
    if ops:
        by: dict[str, list[int]] = {}
        for e in ops.values():
            n = by.setdefault(e["expected"], [0, 0])
            n[0] += sum(e["seen"].values())
            n[1] += e["seen"].get(e["expected"], 0)
        w("Each timed operation's own report: " + "; ".join(
            f"{total} labelled {t}, {ok} reported {t}" for t, (total, ok) in sorted(by.items())) + ".")
        w("")
    if _section_ok(r, "seed_scenarios", w):
        s = r["seed_scenarios"]
        ref = s["reference"]
        w("## 1. Seed scenarios (Qwen2.5-0.5B KV shape; bytes counted by the server)")
        b = s["bytes_on_wire"]
        w("| bytes on the wire | ours | reference |")
        w("|---|---|---|")
        w(f"| v1 blob save, turn 3 | {_fmt(b['v1_blob_turn3'])} | {_fmt(ref['v1_turn3_wire'])} |")
        w(f"| chunked save, turn 3 (W=64; new chunks + manifest) | {_fmt(b['chunked_turn3_W64'])} | — |")
        w(f"| manifest, turn 3 (W=64) | {_fmt(b['manifest_turn3_W64'])} | {_fmt(ref['manifest_turn3'])} |")
        w(f"| shared-prefix save, 5th session (W=8) | {_fmt(b['shared_prefix_last_save_W8'])} | "
          f"{_fmt(ref['shared_prefix_save_wire'])} |")
        w("")
        w(f"Chat turns (KV tokens after each turn): {s['chat_turns']}; the reference does not give its turn lengths.")
        if s.get("remeasured"):
            w(f"This section was {s['remeasured']}.")
        w("")
        w("| storage (bytes stored) | ours | reference |")
        w("|---|---|---|")
        for label in ("v1", "W=64", "W=8"):
            w(f"| 4-turn chat, {label} | {_fmt(s['chat_storage'][label])} | {_fmt(ref['chat_storage'][label])} |")
        for label in ("v1", "W=64", "W=8"):
            w(f"| 5 sessions sharing a 25-token prompt, {label} | {_fmt(s['shared_prompt_storage'][label])} | "
              f"{_fmt(ref['shared_storage'][label])} |")
        w("")
    if _section_ok(r, "walls", w):
        wl = r["walls"]
        w(f"## 2. Save/restore wall, 256-token session at W=64 ({_fmt(wl['kv_bytes'])} B of KV), interleaved runs")
        w("| operation | n | median ms | p99 ms | min ms | max ms | IQR ms |")
        w("|---|---|---|---|---|---|---|")
        for k in ("cold_save", "warm_save", "restore_tcp", "restore_rdma", "restore_rdma_tcp_lookup", "v1_save",
                  "v1_restore"):
            if k in wl:
                v = wl[k]
                w(f"| {k} | {v['n']} | {_fmt(v['median_ms'], 3)} | {_fmt(v['p99_ms'], 3)} | {_fmt(v['min_ms'], 3)} | "
                  f"{_fmt(v['max_ms'], 3)} | {_fmt(v['iqr_ms'], 3)} |")
        w(f"\nReference (seed, Mac mini M4, loopback TCP): cold save {ref['cold_save_ms']} ms, warm save "
          f"{ref['warm_save_ms']} ms, restore {ref['restore_ms']} ms. RDMA READs per restore: "
          f"{wl.get('rdma_reads_per_restore')}.")
        w("")
    if _section_ok(r, "scaling", w):
        sc = r["scaling"]
        w("## 3. Scaling")
        w("| tokens | bytes | TCP median ms | RDMA median ms | RDMA READs / chunks |")
        w("|---|---|---|---|---|")
        for row in sc["by_size"]:
            rd = row.get("rdma", {})
            w(f"| {row['tokens']:,} | {_fmt(row['bytes'])} | {_fmt(row['tcp']['median_ms'], 3)} | "
              f"{_fmt(rd.get('median_ms'), 3)} | {rd.get('reads_posted', '—')} / {row['tcp'].get('chunks')} |")
        w("")
        w("| W | tokens | chunks | TCP median ms | RDMA median ms | RDMA READs |")
        w("|---|---|---|---|---|---|")
        for row in sc["by_window"]:
            rd = row.get("rdma", {})
            w(f"| {row['window']} | {row['tokens']:,} | {row['tcp']['chunks']} | {_fmt(row['tcp']['median_ms'], 3)} | "
              f"{_fmt(rd.get('median_ms'), 3)} | {rd.get('reads_posted', '—')} |")
        w("")
    if _section_ok(r, "limits", w):
        if "limits" in r:
            lm = r["limits"]
            pt = lm.get("perftest", {})
            w(f"## 4. The physical limit ({_fmt(lm['bytes'])} bytes)")
            if "error" in pt:
                w(f"- perftest failed: {pt['error']}")
            else:
                w(f"- perftest ib_read_bw: {_fmt(pt['bw_avg_MBps'])} MB/s average → "
                  f"{_fmt(pt['bw_time_per_message_ms'], 3)} ms per {_fmt(lm['bytes'])} B message")
                w(f"- perftest ib_read_lat: typical {_fmt(pt.get('lat_typical_ms'), 3)} ms")
            raw = lm["raw_pyverbs"]
            w(f"- raw pyverbs READ chain ({raw['reads_per_op']} READs): median {_fmt(raw['median_ms'], 3)} ms")
            w(f"- RDMA restore / perftest: {_fmt(lm.get('rdma_restore_over_perftest'), 3)}; "
              f"RDMA restore / raw pyverbs: {_fmt(lm.get('rdma_restore_over_raw_pyverbs'), 3)}")
            w("")
    if _section_ok(r, "server_cpu", w):
        cpu = r["server_cpu"]
        w(f"## 5. Server CPU per restore ({cpu['restores']} restores each, /proc user+sys)")
        for t in ("tcp", "rdma"):
            if t in cpu:
                w(f"- {t}: {cpu[t]['ticks']} ticks → {_fmt(cpu[t]['ms_per_restore'], 3)} ms CPU per restore")
        if "rdma_over_tcp" in cpu:
            w(f"- RDMA / TCP: {_fmt(cpu['rdma_over_tcp'], 3)}")
        w("")
    if _section_ok(r, "concurrency", w):
        cc = r["concurrency"]
        w(f"## 6. Concurrency ({cc['tokens']}-token sessions, {cc['reps_per_client']} restores per client)")
        w("| clients | TCP aggregate MB/s | RDMA aggregate MB/s |")
        w("|---|---|---|")
        for row in cc["rows"]:
            w(f"| {row['clients']} | {_fmt(row['tcp']['aggregate_MBps'])} | "
              f"{_fmt(_get(row, 'rdma', 'aggregate_MBps'))} |")
        w("")
    if _section_ok(r, "tuning", w):
        tu = r["tuning"]
        w("## 7. Tuning knobs (256-token session)")
        w("| knob | median ms | note |")
        w("|---|---|---|")
        for k, v in tu.items():
            if k.startswith("tcp_window"):
                w(f"| {k} | restore {_fmt(v['restore']['median_ms'], 3)} / cold save "
                  f"{_fmt(v['cold_save']['median_ms'], 3)} | pipelined frames in flight |")
            elif k.startswith("rdma_") and "median_ms" in v:
                note = f"{v['reads_posted']} READs" if "reads_posted" in v else ""
                w(f"| {k} | {_fmt(v['median_ms'], 3)} | {note} |")
        if "per_wr_cost_us" in tu:
            p = tu["per_wr_cost_us"]
            w(f"| per-WR software cost | {_fmt(p['us_per_wr'], 2)} µs/WR | {p['wrs']} tiny READs, "
              f"{p['post_api']} post API |")
        for size, v in tu["hash_throughput"].items():
            w(f"| HMAC-SHA256 / xxh3 at {int(size) // 1024} KiB | {_fmt(v['hmac_sha256_MBps'], 0)} / "
              f"{_fmt(v['xxh3_MBps'], 0)} MB/s | per-frame MAC and per-chunk key check |")
        w("")
    if _section_ok(r, "tcp_limit", w):
        tl = r["tcp_limit"]
        raw = tl["raw_socket"]
        w(f"## 8. The TCP path against its own limit ({_fmt(raw['bytes'])} bytes)")
        w(f"- raw loopback socket, another process sending from memory: median {_fmt(raw['median_ms'], 3)} ms")
        w("")
        w("| frame MAC + chunk key | TCP restore median / p99 ms | cold save median ms |")
        w("|---|---|---|")
        for k, v in tl["variants"].items():
            if isinstance(v, dict) and "restore" in v:
                w(f"| {k} | {_fmt(v['restore']['median_ms'], 3)} / {_fmt(v['restore']['p99_ms'], 3)} | "
                  f"{_fmt(v['cold_save']['median_ms'], 3)} |")
        w("")
        w(f"- TCP restore (keyed BLAKE3 frames, xxh3 keys: the default) / raw socket: "
          f"{_fmt(tl['restore_default_over_raw'], 2)}; best variant / raw: {_fmt(tl['restore_best_over_raw'], 2)}")
        w("")
    w(f"Suite wall times (s): {r.get('suite_seconds')}; total {r.get('total_seconds')} s.")
    if _section_ok(r, "saves", w):
        _saves_section(r["saves"], w)
    return "\n".join(lines) + "\n"


def _saves_section(sv: dict, w) -> None:
    w("## Saves: chunk bytes over TCP vs by RDMA WRITE (cold: every chunk new)")
    w("| tokens | bytes | TCP median ms | WRITE median ms | TCP / WRITE |")
    w("|---|---|---|---|---|")
    for row in sv["by_size"]:
        rd = row.get("rdma", {})
        w(f"| {row['tokens']:,} | {row.get('bytes', 0):,} | {_fmt(row['tcp'].get('median_ms'))} | "
          f"{_fmt(rd.get('median_ms'))} | {_fmt(row.get('tcp_over_rdma'))} |")
    cpu = sv["server_cpu"]
    w("")
    w(f"Server CPU per cold save ({cpu['saves']} saves of {cpu['tokens']} tokens): "
      + ", ".join(f"{t} {cpu[t]['ms_per_save']:.2f} ms" for t in ("tcp", "rdma") if t in cpu)
      + (f"; WRITE / TCP = {cpu['rdma_over_tcp']:.2f}" if "rdma_over_tcp" in cpu else ""))
    ld = sv["restore_under_save_load"]
    w("")
    w(f"Restore while {ld['savers']} clients cold-save in a loop ({ld['restores']} restores each way):")
    w("| restore path | idle p99 ms | loaded p99 ms | loaded / idle | saves meanwhile |")
    w("|---|---|---|---|---|")
    for t in ("tcp", "rdma", "rdma_tcp_lookup"):
        if t in ld:
            x = ld[t]
            w(f"| {t} | {_fmt(x['idle'].get('p99_ms'))} | {_fmt(x['loaded'].get('p99_ms'))} | "
              f"{_fmt(x['p99_loaded_over_idle'])} | {x['saves_meanwhile']} |")
    w("")


def plots(r: dict, out_dir: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    for name, fn in (("restore_vs_size.png", _plot_scaling), ("walls.png", _plot_walls)):
        try:
            made.append(fn(r, os.path.join(out_dir, name), plt))
        except (KeyError, TypeError, ValueError) as e:  # a failed suite: no plot, say so
            print(f"bench: no {name}: {e!r}", file=sys.stderr)
    return made


def _plot_scaling(r: dict, path: str, plt) -> str:
    sc = r["scaling"]["by_size"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [row["tokens"] for row in sc]
    for t, style in (("tcp", "o-"), ("rdma", "s-")):
        ys = [_get(row, t, "median_ms") for row in sc]
        if any(y is not None for y in ys):
            ax.plot(xs, ys, style, label=f"{t.upper()} restore (median)")
    pt = _get(r, "limits", "perftest", "bw_avg_MBps")
    if pt:
        ax.plot(xs, [row["bytes"] / (pt * 1e6) * 1e3 for row in sc], "k--", label="perftest ib_read_bw limit")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("session tokens (Qwen2.5-0.5B shape, 12 KiB/token)")
    ax.set_ylabel("restore latency, ms")
    ax.set_title(f"Restore latency vs session size — {r['environment']['accel'].split(' (')[0]}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_walls(r: dict, path: str, plt) -> str:
    wl = r["walls"]
    labels = [k for k in ("cold_save", "warm_save", "restore_tcp", "restore_rdma", "v1_save", "v1_restore") if k in wl]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    med = [wl[k]["median_ms"] for k in labels]
    p99 = [wl[k]["p99_ms"] - wl[k]["median_ms"] for k in labels]
    ax.bar(labels, med, yerr=[[0] * len(p99), p99], capsize=4, color="#4c72b0")
    ax.set_ylabel("wall time, ms (bar: median, whisker: p99)")
    where = r["environment"]["accel"].split(" (")[0]
    ax.set_title(f"256-token session, W=64 ({wl['kv_bytes']:,} B of KV) — {where}", fontsize=9)
    for i, v in enumerate(med):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
