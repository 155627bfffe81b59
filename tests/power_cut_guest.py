"""One round of the power-cut test, run inside the UML guest (tests/test_power_cut.py).

Mounts the disk image, starts `rdmakv serve` with its data dir on it, checks what the previous
rounds left (every acknowledged session present, everything visible whole), writes the
verdict, then saves in a loop until the host cuts the power. Acknowledgements are recorded on
the shared host directory, fsync'd, only after the server acknowledged them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import rdmakv
from rdmakv import kvgen
from rdmakv.errors import NotFoundError

SHAPE = kvgen.ModelShape("powercut", 4, 64, 64)
KEY = "5a" * 32
PORT = 9911


def expected(name: str) -> rdmakv.KVState:
    rnd, i = (int(x) for x in name[1:].split("-"))
    seed = rnd * 1000 + i
    return kvgen.generate(kvgen.token_stream(seed % 5, 30 + seed % 70), SHAPE)  # shared prefixes: dedup


def _append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _start_server(data: Path, fsync: str) -> subprocess.Popen:
    env = dict(os.environ, RDMAKV_AUTH_KEY=KEY, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdmakv", "serve", "--listen", f"127.0.0.1:{PORT}", "--data-dir", str(data),
         "--capacity", "32MiB", "--fsync", fsync, "--transport", "tcp"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if "listening on" in line:
            return proc
    raise SystemExit(f"server did not start (status {proc.wait()})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="shared host directory for acks and verdicts")
    ap.add_argument("--round", type=int, required=True)
    ap.add_argument("--fsync", default="manifest")
    ap.add_argument("--check-only", action="store_true", help="check everything bit-exact, then exit")
    args = ap.parse_args()
    shared = Path(args.dir)
    mnt = Path("/mnt/powercut")
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "ext4", "/dev/ubda", str(mnt)], check=True)
    server = _start_server(mnt / "data", args.fsync)
    acked, attempted = _lines(shared / "acked.log"), set(_lines(shared / "attempted.log"))
    url = f"rdmakv://127.0.0.1:{PORT}/pc"
    with rdmakv.connect(url, key=KEY, transport="tcp", window=16) as st:
        visible = {r["name"] for r in st.list()}
        lost = [n for n in acked if n not in visible]
        unknown = sorted(visible - attempted)
        # bit-exact: everything at the final check, else the previous round's sessions
        check = visible if args.check_only else {n for n in visible if n.startswith(f"r{args.round - 1}-")}
        wrong = []
        for name in sorted(check):
            try:
                if not st.restore(name).equals(expected(name)):
                    wrong.append(name)
            except NotFoundError:
                wrong.append(name)
        verdict = {"round": args.round, "acked": len(acked), "visible": len(visible), "lost": lost,
                   "wrong": wrong, "unknown": unknown, "checked": len(check)}  # fmt: skip
        out = shared / f"check-{args.round}.json"
        out.write_text(json.dumps(verdict))
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        if args.check_only:
            server.terminate()
            server.wait(30)
            return 0
        (shared / f"saving-{args.round}").touch()  # the host's power-cut clock starts now
        i = 0
        while True:
            name = f"r{args.round}-{i}"
            _append(shared / "attempted.log", name)
            st.save(name, expected(name))
            _append(shared / "acked.log", name)
            i += 1
            if i % 20 == 0:
                time.sleep(0)  # keep going until the power goes


if __name__ == "__main__":
    sys.exit(main())
