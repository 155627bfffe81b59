"""`rdmakv top URL [--interval 1] [--once]`: a live terminal view of one store.

Every interval it asks the store for STATS and shows, per namespace: memory and disk used,
sessions (resident and pinned), the memory hit rate of lookups, saves and lookups per second by
transport, and evictions and demotions per second. With an admin key (or the single shared key)
it shows every namespace (the 64 largest) and the store's totals; a tenant key shows its own.
Rates are differences between two STATS replies, so the first frame shows totals only.
``--once`` takes two samples an interval apart, prints one frame and exits (scripts, tests).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..units import fmt_bytes

CLEAR = "\x1b[H\x1b[2J"
MAX_ROWS = 64
RATES = ("saves_tcp", "saves_rdma", "lookups_tcp", "lookups_rdma", "evictions", "demotions")


def _b(n: int) -> str:
    return fmt_bytes(n).replace(" ", "")  # one column


def _lookups(ns: dict, transport: str) -> int:
    return int(ns.get(f"lookups_{transport}_memory", 0)) + int(ns.get(f"lookups_{transport}_disk", 0))


def _counts(ns: dict) -> dict[str, int]:
    return {"saves_tcp": int(ns.get("saves_tcp", 0)), "saves_rdma": int(ns.get("saves_rdma", 0)),
            "lookups_tcp": _lookups(ns, "tcp"), "lookups_rdma": _lookups(ns, "rdma"),
            "evictions": int(ns.get("evictions", 0)), "demotions": int(ns.get("demotions", 0))}  # fmt: skip


def namespaces(stats: dict) -> list[dict]:
    return stats.get("namespaces") or [stats]


def frame(url: str, stats: dict, prev: dict | None, dt: float) -> str:
    """One screen of text from a STATS reply (and the one before it, for rates)."""
    old = {ns["namespace"]: _counts(ns) for ns in namespaces(prev)} if prev else {}
    lines = [f"rdmakv top  {url}  {time.strftime('%H:%M:%S')}"]
    store = stats.get("store")
    if store:
        lines.append(f"memory {fmt_bytes(store['memory_used_bytes'])} of {fmt_bytes(store['capacity_bytes'])}   "
                     f"disk {fmt_bytes(store['disk_bytes'])} of {fmt_bytes(store['disk_capacity_bytes'] or 0)}   "
                     f"connections {store.get('connections', 0)}   auth failures {store.get('auth_failures', 0)}   "
                     f"refused {store.get('refused', 0)}")  # fmt: skip
    lines.append("")
    head = (f"{'namespace':<20} {'memory':>10} {'disk':>10} {'sessions':>9} {'resident':>9} {'pinned':>7} "
            f"{'hit %':>6} {'save/s tcp':>10} {'rdma':>6} {'lookup/s tcp':>12} {'rdma':>6} {'evict/s':>8} "
            f"{'demote/s':>8}")  # fmt: skip
    lines.append(head)
    for ns in namespaces(stats)[:MAX_ROWS]:
        name = str(ns.get("namespace", "?"))
        lookups = int(ns.get("memory_hits", 0)) + int(ns.get("disk_hits", 0))
        hit = f"{100 * int(ns.get('memory_hits', 0)) / lookups:.0f}" if lookups else "-"
        now, before = _counts(ns), old.get(name)
        if before is not None and dt > 0:
            r = {k: f"{(now[k] - before[k]) / dt:.1f}" for k in RATES}
        else:
            r = dict.fromkeys(RATES, "-")
        lines.append(f"{name[:20]:<20} {_b(int(ns.get('used_bytes', 0))):>10} "
                     f"{_b(int(ns.get('disk_bytes', 0))):>10} {int(ns.get('manifests', 0)):>9} "
                     f"{int(ns.get('resident_sessions', 0)):>9} {int(ns.get('pinned_sessions', 0)):>7} {hit:>6} "
                     f"{r['saves_tcp']:>10} {r['saves_rdma']:>6} {r['lookups_tcp']:>12} {r['lookups_rdma']:>6} "
                     f"{r['evictions']:>8} {r['demotions']:>8}")  # fmt: skip
    lines.append("")
    lines.append("lookups: restores whose manifest came from the server; one-sided RDMA lookups are not seen")
    return "\n".join(lines) + "\n"


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rdmakv top", description=__doc__.splitlines()[0])
    p.add_argument("url", help="rdmakv://HOST:PORT/NAMESPACE (an admin key shows every namespace)")
    p.add_argument("--interval", type=float, default=1.0, metavar="S")
    p.add_argument("--once", action="store_true", help="sample twice, print one frame and exit")
    args = p.parse_args(argv)
    if args.interval < 0.1:
        p.error("--interval must be at least 0.1 s")
    from ..client.store import connect

    with connect(args.url, key=os.environ.get("RDMAKV_AUTH_KEY") or None, transport="tcp", timeout=10) as st:
        prev, t_prev = None, 0.0
        try:
            while True:
                stats, t = st.stats(), time.monotonic()
                text = frame(args.url, stats, prev, t - t_prev)
                if args.once and prev is not None:
                    sys.stdout.write(text)
                    return 0
                if not args.once:
                    sys.stdout.write((CLEAR if sys.stdout.isatty() else "") + text)
                    sys.stdout.flush()
                prev, t_prev = stats, t
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
