"""`rdmakv cluster status|repair --cluster etcd://HOST:PORT/NAME`: the members, their usage and
how replicated a namespace is; or a forced repair pass."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import RdmakvError
from ..units import fmt_bytes
from .client import ClusterStore
from .membership import members
from .repair import check, repair


def node_usage(addr: str, key: str | None, namespace: str | None = None) -> dict:
    """STATS of one member, asked in ``namespace`` (else ``_status``, which the node then lists,
    empty); the store-wide part needs an admin key."""
    from ..client.store import connect

    try:
        with connect(f"rdmakv://{addr}/{namespace or '_status'}", key=key, transport="tcp", timeout=3) as st:
            s = st.stats()
        return {"reachable": True, **{k: s[k] for k in ("store", "cluster") if k in s}}
    except (RdmakvError, OSError) as e:
        return {"reachable": False, "error": str(e)}


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rdmakv cluster", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="members (from etcd), whether each answers, and its usage")
    st.add_argument("--cluster", required=True, metavar="etcd://HOST:PORT/NAME")
    st.add_argument("--json", action="store_true")
    st.add_argument("--namespace", help="also count this namespace's under-replicated sessions and chunks (reads "
                    "every manifest: needs the namespace's key)")
    st.add_argument("--replicas", type=int, default=2)
    rp = sub.add_parser("repair", help="bring a namespace's sessions back to R copies on the live members")
    rp.add_argument("--cluster", required=True, metavar="etcd://HOST:PORT/NAME")
    rp.add_argument("--namespace", required=True)
    rp.add_argument("--replicas", type=int, default=2)
    rp.add_argument("--quiet", action="store_true", help="no progress line (none either when not a terminal)")
    args = p.parse_args(argv)
    import os

    key = os.environ.get("RDMAKV_AUTH_KEY") or None
    if args.cmd == "repair":
        with ClusterStore(args.cluster, args.namespace, key=key, replicas=args.replicas, watch=False) as cs:
            print(json.dumps(repair(cs, quiet=args.quiet), indent=2))
        return 0
    rows = {addr: {**info, **node_usage(addr, key, args.namespace)}
            for addr, info in sorted(members(args.cluster).items())}  # fmt: skip
    replication = None
    if args.namespace:
        with ClusterStore(args.cluster, args.namespace, key=key, replicas=args.replicas, watch=False) as cs:
            replication = check(cs)
    if args.json:
        print(json.dumps({"cluster": args.cluster, "members": rows, "replication": replication}, indent=2))
        return 0
    print(f"{args.cluster}: {len(rows)} member(s)")
    for addr, r in rows.items():
        state = "up" if r["reachable"] else f"unreachable ({r.get('error', '')})"
        store = r.get("store", {})
        used = f", memory used {fmt_bytes(store['memory_used_bytes'])}" if "memory_used_bytes" in store else ""
        last = r.get("cluster", {}).get("last_repair") or {}
        fixed = (f", last repair: {last.get('under_replicated', 0)} of {last.get('sessions', 0)} sessions were "
                 f"under-replicated, {last.get('chunks_sent', 0)} chunks sent") if last else ""  # fmt: skip
        print(f"  {addr}\t{state}{used}{fixed}")
    if replication is not None:
        print(f"namespace {args.namespace}: {replication['sessions']} sessions, "
              f"{replication['under_replicated_sessions']} under-replicated "
              f"({replication['under_replicated_chunks']} chunks short of R={args.replicas}), "
              f"{len(replication['lost'])} lost")  # fmt: skip
    return 0 if all(r["reachable"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
