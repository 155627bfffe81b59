"""systemd's notify protocol (``Type=notify``), with the stdlib: one datagram per state change
to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). READY=1 once the store has replayed and listens, STOPPING=1 when it begins to shut
down, and WATCHDOG=1 every half of ``$WATCHDOG_USEC`` while the event loop is alive. Outside
systemd (no ``$NOTIFY_SOCKET``) every call does nothing."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

MAX_MESSAGE = 4096  # a state message larger than this is a bug, not something to send


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET", "")
        if self.address.startswith("@"):
            self.address = "\0" + self.address[1:]
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields as one datagram; False when there is no socket or it failed."""
        if not self.address:
            return False
        data = "\n".join(fields).encode()
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"notify message of {len(data)} B exceeds {MAX_MESSAGE}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall(data)
            return True
        except OSError:
            return False  # systemd went away: nothing to tell

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def start_watchdog(self, alive: Callable[[], bool]) -> None:
        """Ping the watchdog every half period while ``alive()`` says the server still works;
        when it stops saying so the pings stop and systemd restarts the service."""
        period = self.watchdog_s
        if period is None or not self.address:
            return

        def run() -> None:
            while not self._stop.wait(period / 2):
                if alive():
                    self.notify("WATCHDOG=1")

        self._thread = threading.Thread(target=run, daemon=True, name="rdmakv-watchdog")
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
