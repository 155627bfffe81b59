"""`rdmakv cluster status --cluster etcd://HOST:PORT/NAME [--json]`: the members and their usage."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import RdmakvError
from ..units import fmt_bytes
from .membership import members


def node_usage(addr: str, key: str | None) -> dict:
    """STATS of one member (any namespace: the store-wide part needs an admin key)."""
    from ..client import connect

    try:
        with connect(f"rdmakv://{addr}/_status", key=key, transport="tcp", timeout=3) as st:
            s = st.stats()
        return {"reachable": True, **({"store": s["store"]} if "store" in s else {})}
    except (RdmakvError, OSError) as e:
        return {"reachable": False, "error": str(e)}


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rdmakv cluster", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="members (from etcd), whether each answers, and its usage")
    st.add_argument("--cluster", required=True, metavar="etcd://HOST:PORT/NAME")
    st.add_argument("--json", action="store_true")
    rp = sub.add_parser("repair", help="bring a namespace's sessions back to R copies on the live members")
    rp.add_argument("--cluster", required=True, metavar="etcd://HOST:PORT/NAME")
    rp.add_argument("--namespace", required=True)
    rp.add_argument("--replicas", type=int, default=2)
    args = p.parse_args(argv)
    import os

    key = os.environ.get("RDMAKV_AUTH_KEY") or None
    if args.cmd == "repair":
        from .client import ClusterStore

        st = ClusterStore(args.cluster, args.namespace, key=key, replicas=args.replicas)
        try:
            print(json.dumps(st.repair(), indent=2))
        finally:
            st.close()
        return 0
    rows = {addr: {**info, **node_usage(addr, key)} for addr, info in sorted(members(args.cluster).items())}
    if args.json:
        print(json.dumps({"cluster": args.cluster, "members": rows}, indent=2))
        return 0
    print(f"{args.cluster}: {len(rows)} member(s)")
    for addr, r in rows.items():
        state = "up" if r["reachable"] else f"unreachable ({r.get('error', '')})"
        store = r.get("store", {})
        used = f", memory used {fmt_bytes(store['memory_used_bytes'])}" if "memory_used_bytes" in store else ""
        print(f"  {addr}\t{state}{used}")
    return 0 if all(r["reachable"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
