"""py-spy on the store server while it takes cold saves and serves a restore of large sessions.

py-spy (the bench extra) samples the running server from outside; nothing in the server
changes. The raw (collapsed) stacks are kept beside the report; the report gets each phase's
top functions by own samples and by inclusive samples, and the share of samples holding the
GIL (a second py-spy pass with --gil would be a second run, so ``--idle`` is off and the
percentages are of busy samples)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

from .suites import Ctx, session

RATE = 250  # samples per second


def py_spy() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.access(here, os.X_OK) else shutil.which("py-spy")


def _record(pid: int, out: str) -> subprocess.Popen:
    exe = py_spy()
    assert exe is not None
    p = subprocess.Popen([exe, "record", "-p", str(pid), "-f", "raw", "-r", str(RATE), "-o", out],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(1.0)  # attach
    return p


def _stop(p: subprocess.Popen) -> str:
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return err or ""


def _frame(f: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)"
    if " (" in f and f.endswith(")"):
        name, loc = f.split(" (", 1)
        return f"{name} ({os.path.basename(loc[:-1])})"
    return f


# Leaf frames of threads that wait for work (py-spy's idle detection misses these): left out
WAITING = ("_worker (thread.py:81)", "Condition.wait (threading.py", "EpollSelector.select (selectors.py",
           "Event.wait (threading.py", "_PollLikeSelector.select (selectors.py")  # fmt: skip


def top_entries(raw_path: str, n: int = 15) -> dict:
    own: Counter = Counter()
    incl: Counter = Counter()
    total = waiting = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            c = int(count)
            frames = [_frame(x) for x in stack.split(";")]
            if frames and frames[0].startswith(("process ", "thread ")):
                frames = [x for x in frames if not x.startswith(("process ", "thread "))]
            if not frames:
                continue
            if frames[-1].startswith(WAITING):
                waiting += c
                continue
            total += c
            own[frames[-1]] += c
            for fr in set(frames):
                incl[fr] += c
    pct = lambda c: round(100 * c / total, 1) if total else 0.0  # noqa: E731
    return {"samples": total, "waiting_samples": waiting, "rate_hz": RATE,
            "own": [{"frame": k, "pct": pct(v)} for k, v in own.most_common(n)],
            "inclusive": [{"frame": k, "pct": pct(v)} for k, v in incl.most_common(n + 10)
                          if not k.startswith(("_bootstrap", "run (threading", "_worker (thread"))][:n]}  # fmt: skip


def _phase(ctx: Ctx, out_dir: str, label: str, fn) -> dict:
    raw = os.path.join(out_dir, f"profile-{label}.txt")
    p = _record(ctx.server.pid(), raw)
    t0 = time.perf_counter()
    try:
        detail = fn()
    finally:
        err = _stop(p)
    wall = time.perf_counter() - t0
    if not os.path.exists(raw):
        return {"error": f"py-spy wrote nothing: {err.strip()[-300:]}"}
    return {"wall_s": wall, **detail, **top_entries(raw), "raw": os.path.basename(raw)}


def profile(ctx: Ctx, out_dir: str, sizes_csv: str) -> dict:
    if py_spy() is None:
        return {"skipped": "py-spy is not installed (pip install 'rdmakv[bench]')"}
    out: dict = {}
    for n in [int(x) for x in sizes_csv.split(",") if x]:
        runs = 3 if n <= 4096 else 2
        kvs = [session(n, 40_000 + 100 * n + i) for i in range(runs)]
        for t in ctx.transports():
            def saves(t=t, kvs=kvs, n=n, runs=runs) -> dict:
                walls = []
                with ctx.connect("prof", t) as st:
                    for i, kv in enumerate(kvs):
                        rep = st.save(f"p{n}-{t}-{i}", kv)
                        walls.append(round(rep.wall_s * 1e3, 1))
                        ctx.record(f"profile.save.{n}.{t}", t, rep.transport)
                return {"op": f"{runs} cold saves", "walls_ms": walls, "tokens": n, "transport": t}

            out[f"cold_save_{n}_{t}"] = _phase(ctx, out_dir, f"save-{n}-{t}", saves)

            def restores(t=t, n=n) -> dict:
                walls = []
                with ctx.connect("prof", t) as st:
                    st.restore(f"p{n}-{t}-0")
                    for _ in range(5):
                        t0 = time.perf_counter()
                        _, rep = st.restore(f"p{n}-{t}-0", report=True)
                        walls.append(round((time.perf_counter() - t0) * 1e3, 1))
                        ctx.record(f"profile.restore.{n}.{t}", t, rep.transport)
                return {"op": "5 restores", "walls_ms": walls, "tokens": n, "transport": t}

            out[f"restore_{n}_{t}"] = _phase(ctx, out_dir, f"restore-{n}-{t}", restores)
            with ctx.connect("prof", "tcp") as st:
                for i in range(runs):
                    st.delete_manifest(f"p{n}-{t}-{i}")
        del kvs
    return out


def main(argv: list[str]) -> int:
    """``rdmakv bench throughput-profile RAW...``: the top entries of py-spy's raw stacks."""
    import json

    for raw in argv:
        print(raw, json.dumps(top_entries(raw), indent=1))
    return 0
