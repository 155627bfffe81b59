"""Progress for long work a person waits on at a terminal: the guest kernel build, `rdmakv
bench`, big slot files, compaction and repair passes. Drawn with ``tqdm`` (small, well kept,
no dependencies of its own, and it handles terminal width and redraw rates) on stderr, so that
stdout stays the command's output.

Quiet when stdout is not a terminal (CI logs, pipes), with ``--quiet``, or with
``RDMAKV_QUIET=1``: then every call here is a no-op.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import Any

QUIET_ENV = "RDMAKV_QUIET"


def enabled(quiet: bool = False) -> bool:
    if quiet or os.environ.get(QUIET_ENV, "") not in ("", "0"):
        return False
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Silent:
    """What a bar is when progress is off: accepts every call, draws nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_description_str(self, s: str) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int | None, desc: str, unit: str = "it", quiet: bool = False, **kw: Any):
    """A progress bar over ``total`` units (None: a counter with elapsed time)."""
    if not enabled(quiet):
        return _Silent()
    from tqdm import tqdm

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        sized = size.columns > 0 and size.lines > 0
    except OSError:
        sized = False
    # a terminal that reports no size (some consoles, a bare pty): tqdm would draw nothing
    width = {"dynamic_ncols": True} if sized else {"ncols": 100, "nrows": 24}
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, **width, **kw)


def track(items: Iterable, desc: str, total: int | None = None, unit: str = "it", quiet: bool = False) -> Iterator:
    """``items``, counted on a bar as they are consumed."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    b = bar(total, desc, unit, quiet)
    try:
        for item in items:
            yield item
            b.update(1)
    finally:
        b.close()


@contextmanager
def stages(title: str, names: list[str], quiet: bool = False, status=None):
    """Named stages of one job, with the elapsed time redrawn every second even while a stage
    runs silently (a kernel compile): yields ``enter(name)`` to call as each stage begins.
    ``status()``, if given, is a short text shown after the stage (e.g. runs done so far)."""
    b = bar(len(names), title, unit="stage", quiet=quiet,
            bar_format="{desc}: {n_fmt}/{total_fmt} stages {postfix}, {elapsed} elapsed")  # fmt: skip
    stop = threading.Event()
    t0 = time.monotonic()
    state: dict[str, Any] = {"n": 0, "name": ""}  # (the stage number, its name)

    def show() -> None:
        b.set_postfix_str(f"[{state['name']}]" + (f" {status()}" if status is not None else ""))

    def enter(name: str) -> None:
        i = names.index(name) if name in names else state["n"]
        if i > state["n"]:
            b.update(i - state["n"])
            state["n"] = i
        state["name"] = name
        show()

    def tick() -> None:
        while not stop.wait(1.0):
            show()
            b.refresh()

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield enter
        b.update(len(names) - state["n"])
    finally:
        stop.set()
        b.close()
        if enabled(quiet):
            print(f"{title}: done in {time.monotonic() - t0:.0f} s", file=sys.stderr)


READ_PIECE = 8 << 20  # bytes per read while counting a big file in


def read_file(path: str, desc: str, quiet: bool = False) -> bytearray:
    """A whole file, read into one buffer of its size, with a byte counter on the bar."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        out = bytearray(size)
        view = memoryview(out)
        b = bar(size, desc, unit="B", quiet=quiet, unit_scale=True, unit_divisor=1024)
        done = 0
        try:
            while done < size:
                n = f.readinto(view[done : done + READ_PIECE])
                if not n:
                    raise OSError(f"{path} shrank while it was read ({done} of {size} B)")
                done += n
                b.update(n)
        finally:
            b.close()
    return out


def write_all(f, data: bytes | memoryview, desc: str, quiet: bool = False) -> None:
    """Write ``data`` to an open file, with a byte counter on the bar."""
    view = memoryview(data)
    b = bar(len(view), desc, unit="B", quiet=quiet, unit_scale=True, unit_divisor=1024)
    try:
        for i in range(0, len(view), READ_PIECE):
            f.write(view[i : i + READ_PIECE])
            b.update(min(READ_PIECE, len(view) - i))
    finally:
        b.close()
