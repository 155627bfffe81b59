"""The ``rdmakv`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import RdmakvError
from ..units import fmt_bytes, parse_size
from ..wire.auth import KEY_ENV, key_from_env, parse_key

KEY_HELP = f"auth key: 64 hex characters, read from ${KEY_ENV} (generate one with: openssl rand -hex 32)"


def _key_for_serve(args: argparse.Namespace):
    from ..wire.keyring import KeyRing

    if args.keys:
        if args.key_file:
            raise ValueError("--keys and --key-file exclude each other")
        return KeyRing.load(args.keys)
    if args.key_file:
        with open(args.key_file) as f:
            return parse_key(f.read())
    return key_from_env()


def cmd_serve(args: argparse.Namespace) -> int:
    from ..store import logs
    from ..store.server.eventloop import ServerLimits
    from ..store.server.process import run_server

    logs.configure(args.log_format, args.log_level)

    agent = None
    if args.cluster:
        from ..cluster.node import NodeAgent

        if not args.advertise:
            raise SystemExit("rdmakv serve: --cluster needs --advertise HOST:PORT (where clients reach this node)")
        agent = NodeAgent(args.cluster, args.advertise, args.listen, ttl=args.lease_ttl, replicas=args.replicas,
                          auto_repair=not args.no_auto_repair,
                          say=logs.say)  # fmt: skip
    limits = ServerLimits(
        max_connections=args.max_connections, max_per_source=args.max_connections_per_source,
        handshake_timeout=args.handshake_timeout, idle_timeout=args.idle_timeout,
        max_frame=parse_size(args.max_frame), workers=args.workers,
        reservation_timeout=args.reservation_timeout, index_entries=args.index_entries,
        max_reserved_bytes=parse_size(args.max_write_reservation), admission_wait=args.admission_wait,
        max_inflight=parse_size(args.max_inflight) if args.max_inflight else None,
        min_frame_rate=args.min_frame_rate,
    )  # fmt: skip
    run_server(
        args.listen,
        args.data_dir,
        parse_size(args.capacity),
        _key_for_serve(args),
        fsync=args.fsync,
        transport=args.transport,
        region_bytes=parse_size(args.region_size),
        limits=limits,
        disk_capacity=parse_size(args.disk_capacity) if args.disk_capacity else None,
        high_watermark=args.high_watermark,
        quotas=dict(_parse_quota(q) for q in args.quota),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        ready=agent.start if agent is not None else None,
        metrics_listen=args.metrics_listen,
        max_namespaces=args.max_namespaces,
    )
    if agent is not None:
        agent.close()  # leave the member list now, not when the lease runs out
    return 0


def _parse_quota(text: str) -> tuple[str, int]:
    ns, sep, size = text.rpartition("=")
    if not sep or not ns:
        raise ValueError(f"--quota wants NAMESPACE=SIZE (e.g. tenant-a=512MiB), got {text!r}")
    return ns, parse_size(size)


def _rate(text: str) -> int:
    """Bytes per second: a size (1MiB), or 0 for none."""
    return 0 if text.strip() == "0" else parse_size(text)


def _watermark(text: str) -> float:
    v = float(text)
    if not 0.1 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0.1 and 1.0, got {v}")
    return v


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(args.transport, args.json, args.runs)


def _open(args: argparse.Namespace):
    from ..client.store import connect

    return connect(args.url, transport="tcp", timeout=args.timeout)


def cmd_ls(args: argparse.Namespace) -> int:
    with _open(args) as store:
        rows = store.list(args.prefix)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("(no manifests)")
    for r in rows:
        flags = ",".join(f for f, on in (("pinned", r.get("pinned")), ("on-disk", not r.get("resident", True))) if on)
        ttl = f"\texpires in {r['expires_in']:.0f} s" if r.get("expires_in") is not None else ""
        print(f"{r['name']}\t{r['chunks']} chunks\t{fmt_bytes(r['kv_bytes'])}\tmanifest {r['manifest_bytes']} B"
              f"{chr(9) + flags if flags else ''}{ttl}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _open(args) as store:
        st = store.stats()
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        for k in sorted(st):
            v = st[k]
            extra = f"  ({fmt_bytes(v)})" if k.endswith("bytes") and isinstance(v, int) else ""
            print(f"{k:28} {v}{extra}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    with _open(args) as store:
        (store.pin if args.command == "pin" else store.unpin)(args.name)
    print(f"{args.name}: {'pinned' if args.command == 'pin' else 'unpinned'}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from ..progress import stages

    with _open(args) as store, stages("rdmakv compact", ["compacting"], quiet=args.quiet) as enter:
        enter("compacting")  # one request: the line shows the time it has taken so far
        out = store.compact()
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(
            f"compacted {out['segments_compacted']} segments in {out['seconds']} s: "
            f"{fmt_bytes(out['disk_bytes_before'])} -> {fmt_bytes(out['disk_bytes_after'])} on disk "
            f"({fmt_bytes(out['live_bytes'])} live)"
        )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from ..wire.keyring import new_entry

    if sum(map(bool, (args.namespace, args.admin, args.node))) != 1:
        raise SystemExit("rdmakv keys new: give a NAMESPACE, or --admin, or --node (exactly one)")
    print(new_entry(args.namespace, admin=args.admin, not_after=args.not_after, node=args.node), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rdmakv",
        description="KV-cache store for LLM inference servers: content-addressed chunks, "
        "RDMA-direct restore, authenticated TCP fallback.",
        epilog=f"URLs look like rdmakv://HOST:PORT/NAMESPACE (default port 9900). {KEY_HELP}.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run a store server", description="Run a store server. " + KEY_HELP + ".")
    p.serve_parser = s  # type: ignore[attr-defined]  # main() loads --config into it
    s.add_argument("--listen", default="127.0.0.1:9900", help="HOST:PORT to listen on (default 127.0.0.1:9900)")
    s.add_argument("--config", metavar="FILE",
                   help="read serve options from a TOML file (long option names with _ for -); flags override it")
    s.add_argument("--print-config", action="store_true", help="print the effective settings as TOML and exit")
    s.add_argument("--data-dir", help="directory of the durable segment log (created if missing); required")
    s.add_argument(
        "--capacity", default="2GiB",
        help="memory tier: registered slab memory plus resident manifests across all namespaces, e.g. 2GiB",
    )
    s.add_argument(
        "--disk-capacity",
        help="disk tier: live log bytes across all namespaces (default: 4x --capacity); past it the least "
        "recently used sessions are evicted, and so they are before the filesystem itself fills",
    )
    s.add_argument(
        "--high-watermark", type=_watermark, default=0.9, metavar="FRACTION",
        help="past this fraction of --capacity the least recently used sessions are demoted to disk (default 0.9)",
    )
    s.add_argument(
        "--quota", action="append", default=[], metavar="NS=SIZE",
        help="memory quota of one namespace (repeatable): its churn demotes its own sessions, and other "
        "tenants' pressure never pushes it below its quota",
    )
    s.add_argument(
        "--fsync",
        choices=("manifest", "always", "never"),
        default="manifest",
        help="when to fsync the log: before acknowledging each manifest commit (default), "
        "after every record, or never (fast, not crash-safe)",
    )
    s.add_argument(
        "--transport",
        choices=("auto", "rdma", "tcp"),
        default="auto",
        help="auto: export the slab over RDMA when a device is present; rdma: fail if none; tcp: never",
    )
    s.add_argument("--region-size", default="64MiB", help="size of each registered slab region (default 64MiB)")
    s.add_argument("--max-frame", default="64MiB", help="largest frame payload accepted (default 64MiB)")
    s.add_argument("--key-file", help=f"read the one shared key from this file instead of ${KEY_ENV}")
    s.add_argument(
        "--keys", metavar="FILE",
        help="per-tenant keys: a TOML file of [[key]] tables (namespace, key, not_after, admin); a key opens "
        "only its namespace. Make entries with `rdmakv keys new NAMESPACE`",
    )
    s.add_argument("--max-connections", type=int, default=10_000, help="connections at once (default 10000)")
    s.add_argument("--max-connections-per-source", type=int, default=None, metavar="N",
                   help="connections at once from one address (default: a quarter of the connection cap in force, "
                   "which RLIMIT_NOFILE may lower)")
    s.add_argument("--max-namespaces", type=int, default=65_536, metavar="N",
                   help="namespaces that hold data at once (a namespace is made by its first write; reading one "
                   "makes nothing; namespaces left empty are forgotten when the limit is reached; default 65536)")
    s.add_argument("--max-inflight", metavar="SIZE",
                   help="bytes of requests in flight over all connections (continued messages included); a request "
                   "that does not fit is answered BUSY (default: 96MiB, or 1.5x --max-frame if larger)")
    s.add_argument("--min-frame-rate", type=_rate, default=1 << 20, metavar="SIZE",
                   help="bytes per second a request must arrive at once it has taken 2 s; a slower one closes its "
                   "connection (default 1MiB; 0 turns the floor off)")
    s.add_argument("--handshake-timeout", type=float, default=5.0, metavar="S",
                   help="a connection must authenticate within S seconds (default 5)")
    s.add_argument("--idle-timeout", type=float, default=300.0, metavar="S",
                   help="close connections idle for S seconds (default 300)")
    s.add_argument("--workers", type=int, default=8, help="threads that run requests (default 8)")
    s.add_argument("--admission-wait", type=float, default=30.0, metavar="S",
                   help="a save that finds the memory tier held by other saves in flight waits up to S seconds for "
                        "room, then gets BUSY with the reason (default 30)")
    s.add_argument("--reservation-timeout", type=float, default=10.0, metavar="S",
                   help="a save by RDMA WRITE must commit within S seconds, else its slots are freed (default 10)")
    s.add_argument("--max-write-reservation", default="1GiB", metavar="SIZE",
                   help="saves with more missing bytes than this send them over TCP, not by RDMA WRITE "
                   "(default 1GiB; on rxe in UML WRITE stops paying off above ~12 MiB, see bench/results)")
    s.add_argument("--cluster", metavar="etcd://HOST:PORT/NAME",
                   help="join this cluster: register in etcd under a lease kept alive while serving")
    s.add_argument("--advertise", metavar="HOST:PORT", help="with --cluster: the address clients use for this node")
    s.add_argument("--lease-ttl", type=int, default=5, metavar="S",
                   help="with --cluster: a node that dies leaves the member list within S seconds (default 5)")
    s.add_argument("--replicas", type=int, default=2, metavar="R",
                   help="with --cluster: copies of each chunk and manifest that repair restores (default 2)")
    s.add_argument("--no-auto-repair", action="store_true",
                   help="with --cluster: do not repair when membership changes (rdmakv cluster repair still does)")
    s.add_argument("--index-entries", type=int, default=4096, metavar="N",
                   help="sessions per namespace that RDMA clients look up with no request to the server "
                   "(default 4096; others are looked up over TCP)")
    s.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (names in docs/operations.md)")
    s.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="one line per event on stderr: text (default) or one JSON object per line")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="events below this level are not logged (default info)")
    s.add_argument("--tls-cert", metavar="PEM", help="serve TLS (clients use rdmakvs://) with this certificate chain")
    s.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser(
        "demo",
        help="run the seed scenarios on an embedded loopback server",
        description="Start an embedded server on a free loopback port with a temporary data dir and "
        "reproduce the seed document's scenarios (Qwen2.5-0.5B KV shape) next to its reference figures.",
    )
    d.add_argument("--json", action="store_true", help="print the results as JSON")
    d.add_argument("--transport", choices=("auto", "rdma", "tcp"), default="auto", help="restore transport")
    d.add_argument("--runs", type=int, default=20, help="timed repetitions for the wall-time table (default 20)")
    d.set_defaults(func=cmd_demo)

    for name, func, helptext in (
        ("ls", cmd_ls, "list the manifests of a namespace"),
        ("stats", cmd_stats, "show a namespace's storage and traffic counters"),
        ("pin", cmd_pin, "pin a session: never demoted to disk or evicted"),
        ("unpin", cmd_pin, "unpin a session: it ages out like any other again"),
        ("compact", cmd_compact, "compact the server's log now (every segment with garbage, the open one too)"),
    ):
        c = sub.add_parser(name, help=helptext, description=helptext.capitalize() + ". " + KEY_HELP + ".")
        c.add_argument("url", help="rdmakv://HOST:PORT/NAMESPACE")
        if name in ("pin", "unpin"):
            c.add_argument("name", help="the session (manifest) name")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server (default 10)")
        if name == "compact":
            c.add_argument("--quiet", action="store_true", help="no progress line (none either when not a terminal)")
        if name == "ls":
            c.add_argument("--prefix", default="", help="only names starting with this prefix")
        c.set_defaults(func=func)

    k = sub.add_parser("keys", help="make per-tenant keys for `rdmakv serve --keys`",
                       description="Print a new [[key]] table for a keys file (a fresh random key).")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="new")
    kn = ksub.add_parser("new", help="print a new [[key]] entry")
    kn.add_argument("namespace", nargs="?", help="the namespace the key opens (omit with --admin for any)")
    kn.add_argument("--admin", action="store_true", help="an operator key: STATS, LIST, COMPACT, PIN anywhere")
    kn.add_argument("--node", action="store_true", help="a cluster's node key (the same in every node's keys file): "
                    "repair between nodes in every namespace, never reading or writing sessions")
    kn.add_argument("--not-after", metavar="YYYY-MM-DD", help="the last day the key is accepted (UTC)")
    kn.set_defaults(func=cmd_keys)

    for name, helptext in (
        ("rxe-vm", "run a command inside a guest with real soft-RoCE (rxe0); see rdmakv rxe-vm --help"),
        ("doctor", "report RDMA readiness: pyverbs, devices, memlock, transport choice"),
        ("bench", "benchmarks: RDMA vs TCP vs v1 single blob; see rdmakv bench --help"),
        ("slotfile", "inspect, import and export llama.cpp slot files; see rdmakv slotfile --help"),
        ("llama-proxy", "proxy in front of llama-server that keeps slot saves in rdmakv"),
        ("kvstore-lib", "build or locate libkv_store_rdmakv.so, the kv_store_v1 backend for llama-server"),
        ("cluster", "a cluster of nodes (etcd): rdmakv cluster status|repair --cluster etcd://HOST:PORT/NAME"),
        ("top", "a live view of one store: rdmakv top rdmakv://HOST:PORT/NAMESPACE"),
    ):
        sub.add_parser(name, help=helptext, add_help=False)
    return p


DELEGATED = {
    "rxe-vm": "rdmakv.guest.rxe_vm",
    "doctor": "rdmakv.cli.doctor",
    "bench": "bench.cli",
    "slotfile": "rdmakv.llama.cli",
    "llama-proxy": "rdmakv.llama.proxy",
    "kvstore-lib": "rdmakv.llama.kvstore_lib",
    "cluster": "rdmakv.cluster.cli",
    "top": "rdmakv.cli.top",
}


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, with `serve --config FILE` applied under the command-line flags."""
    if argv and argv[0] == "serve":
        from . import serve_config

        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        known, _ = pre.parse_known_args(argv[1:])
        serve = parser.serve_parser  # type: ignore[attr-defined]  # (kept on the parser where it is built)
        if known.config:
            serve.set_defaults(**serve_config.load(known.config, serve))
        args = parser.parse_args(argv)
        if args.print_config:
            print(serve_config.render(args, serve), end="")
            raise SystemExit(0)
        if not args.data_dir:
            serve.error("--data-dir (or data_dir in --config) is required")
        return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:  # these parse their own flags (argparse REMAINDER would not)
        import importlib

        try:
            return importlib.import_module(DELEGATED[argv[0]]).cli(argv[1:])
        except KeyboardInterrupt:
            return 130
        except (RdmakvError, OSError) as e:
            print(f"rdmakv {argv[0]}: error: {e}", file=sys.stderr)
            return 1
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except RdmakvError as e:
        print(f"rdmakv: error: {e}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (RdmakvError, ValueError, OSError) as e:
        print(f"rdmakv {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "build_parser", "os"]
