"""The server's log: one line per event on stderr, as text (the default, for a terminal and
journald) or JSON (``--log-format json``, one object per line for a log pipeline), filtered by
``--log-level``.

Every event is a message the server wrote for a person; its level comes from what it says
(LEVEL_WORDS), so the call sites stay one-argument ``say(line)``. Messages name namespaces,
peers, sizes and errors, never chunk bytes, token ids or key material
(tests/test_operations_logs.py checks a whole session's log for them).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading


def log_safe(text: str) -> str:
    """A client-supplied string as it may appear in a log line: escaped, bounded."""
    return repr(text[:300])


LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# words that make an event a warning or an error (checked in this order)
LEVEL_WORDS = (
    ("error", ("internal error", "compaction failed", "maintenance failed")),
    ("warning", ("warning", "disk full", "damage", "unreadable", "does not match", "out of file descriptors",
                 "unreachable", "refusing", "paused", "does not fit", "handshake failed", "TLS failed", "RDMA off",
                 "RLIMIT_NOFILE")),
)  # fmt: skip


def level_of(line: str) -> str:
    low = line.lower()
    for level, words in LEVEL_WORDS:
        if any(w.lower() in low for w in words):
            return level
    return "info"


class Log:
    def __init__(self, fmt: str = "text", level: str = "info", stream=None) -> None:
        if fmt not in ("text", "json"):
            raise ValueError(f"--log-format must be text or json, got {fmt!r}")
        if level not in LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LEVELS)}, got {level!r}")
        self.fmt, self.min = fmt, LEVELS[level]
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def __call__(self, line: str, level: str | None = None) -> None:
        level = level or level_of(line)
        if LEVELS[level] < self.min:
            return
        line = line.replace("\n", " ").replace("\r", " ")  # one event, one line
        if self.fmt == "json":
            component, sep, msg = line.partition(": ")
            if not sep or not component.startswith("rdmakv"):
                component, msg = "rdmakv", line
            out = json.dumps({"ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "level": level,
                              "component": component, "pid": os.getpid(), "msg": msg})  # fmt: skip
        else:
            out = line
        with self._lock:
            try:
                self.stream.write(out + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed: nothing to tell


_current = Log()


def configure(fmt: str = "text", level: str = "info") -> Log:
    """Set the process's log (``rdmakv serve`` does, from its flags) and return it."""
    global _current
    _current = Log(fmt, level)
    return _current


def say(line: str, level: str | None = None) -> None:
    """Log one event through the configured log."""
    _current(line, level)
