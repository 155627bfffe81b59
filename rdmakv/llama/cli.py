"""`rdmakv slotfile inspect|put|get`: operator commands for llama.cpp slot files."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from ..progress import read_file, stages, write_all
from ..wire.auth import KEY_ENV
from . import slotfile


def _inspect(args: argparse.Namespace) -> int:
    data = Path(args.file).read_bytes()
    try:
        info = slotfile.inspect(slotfile.parse(data))
    except slotfile.SlotFileError as e:
        if args.json:
            print(json.dumps({"file": args.file, "size": len(data), "error": str(e)}))
        else:
            print(f"{args.file}: not a slot file this build can chunk: {e}", file=sys.stderr)
        return 1
    info = {"file": args.file, "size": len(data), **info}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for k, v in info.items():
            print(f"{k:18} {v}")
    return 0


def _connect(args: argparse.Namespace):
    from ..client.store import connect

    return connect(args.url, transport=args.transport, window=args.window)


def _put(args: argparse.Namespace) -> int:
    from .slotstore import put_slotfile

    with stages(f"rdmakv slotfile put {args.name}", ["read", "save"], quiet=args.quiet) as enter:
        enter("read")
        data = read_file(args.file, f"reading {args.file}", quiet=args.quiet)
        enter("save")
        with _connect(args) as store:
            report, error = put_slotfile(store, args.name, data)
    if error:
        print(f"rdmakv slotfile put: stored {args.file} whole (opaque): {error}", file=sys.stderr)
    print(json.dumps({"name": args.name, "file_bytes": len(data), "chunked": not error, **asdict(report)}, indent=2))
    return 0


def _get(args: argparse.Namespace) -> int:
    from ..client.reports import RestoreReport
    from .slotstore import get_slotfile

    rep = RestoreReport()
    with stages(f"rdmakv slotfile get {args.name}", ["restore", "write"], quiet=args.quiet) as enter:
        enter("restore")
        with _connect(args) as store:
            data = get_slotfile(store, args.name, rep)
        enter("write")
        _write_aside(args, data)
    # "file_bytes", as in `put`: the RestoreReport's own "bytes" (bytes on the wire) must not hide it
    print(json.dumps({"name": args.name, "out": args.out, "file_bytes": len(data), **asdict(rep)}, indent=2))
    return 0


def _write_aside(args: argparse.Namespace, data: bytes) -> None:
    tmp = f"{args.out}.rdmakv-tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # write aside, then rename: never a half-written slot file
            write_all(f, data, f"writing {args.out}", quiet=args.quiet)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.out)
    except BaseException:
        if os.path.exists(tmp):  # e.g. disk full: leave no partial file behind
            os.unlink(tmp)
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rdmakv slotfile",
        description="llama.cpp slot files (llama-server --slot-save-path): inspect them, import them into a "
        f"store chunked and deduplicated, export them back byte-identical. The key comes from ${KEY_ENV}.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="show version, layout, streams, cells, layers, types, v_trans, tokens")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_inspect)
    for name, func, helptext in (
        ("put", _put, "import FILE as NAME (prints the SaveReport)"),
        ("get", _get, "export NAME to OUT, byte-identical"),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("url", help="rdmakv://HOST:PORT/NAMESPACE")
        c.add_argument("name", help="name in the store (llama-server's filename)")
        if name == "put":
            c.add_argument("file", help="slot file to read")
        else:
            c.add_argument("out", help="file to write (written aside, then renamed)")
        c.add_argument("--window", type=int, default=256, help="W: positions per chunk (default 256)")
        c.add_argument("--quiet", action="store_true", help="no progress line (none either when stdout is no terminal)")
        c.add_argument("--transport", choices=("auto", "rdma", "tcp"), default="auto",
                       help="how to fetch chunks (saves always use TCP)")
        c.set_defaults(func=func)
    return p


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
