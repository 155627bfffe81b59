"""The proxy's node-local hot copy: recently saved and restored slot files, an LRU bounded in bytes.

Files live in the proxy's work directory inside the slot dir (clients' names cannot contain
"/", so cannot reach it), so a save's file moves in by rename and a
restore hands llama-server a hard link: no byte is copied either way. The store stays the durable,
shared tier: each entry remembers which committed manifest it is (its xxh3), and the proxy checks
that against the store before it serves the copy, so a save of the same name on another node is
never answered with the old bytes.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Entry:
    path: Path
    size: int
    manifest_xxh3: int


class LocalCache:
    def __init__(self, directory: Path, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"--local-cache must be a positive size, got {capacity}")
        self.dir = Path(directory)
        self.capacity = capacity
        self.used = 0
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.lock = threading.Lock()
        self._ids = itertools.count()
        shutil.rmtree(self.dir, ignore_errors=True)  # a copy nobody checked is not served: start empty
        self.dir.mkdir(parents=True)

    def adopt(self, name: str, src: Path, manifest_xxh3: int) -> bool:
        """Move ``src`` (a complete slot file) in as ``name``'s copy; False when it cannot fit."""
        size = src.stat().st_size
        if size > self.capacity:
            return False
        dst = self.dir / f"{next(self._ids)}.slot"
        try:
            os.rename(src, dst)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.copyfile(src, dst)  # another filesystem: copy_file_range/sendfile, then drop src
            src.unlink()
        gone: list[Path] = []
        with self.lock:
            old = self.entries.pop(name, None)
            if old is not None:
                self.used -= old.size
                gone.append(old.path)
            self.entries[name] = Entry(dst, size, manifest_xxh3)
            self.used += size
            while self.used > self.capacity:
                _, evicted = self.entries.popitem(last=False)
                self.used -= evicted.size
                gone.append(evicted.path)
        for p in gone:
            p.unlink(missing_ok=True)
        return True

    def get(self, name: str) -> Entry | None:
        with self.lock:
            e = self.entries.get(name)
            if e is not None:
                self.entries.move_to_end(name)
            return e

    def link(self, entry: Entry, dst: Path) -> bool:
        """Put the copy at ``dst`` (a hard link); False when it was evicted meanwhile."""
        try:
            os.link(entry.path, dst)
        except FileNotFoundError:
            return False
        return True

    def drop(self, name: str) -> None:
        with self.lock:
            e = self.entries.pop(name, None)
            if e is not None:
                self.used -= e.size
        if e is not None:
            e.path.unlink(missing_ok=True)

    def stats(self) -> dict:
        with self.lock:
            return {"files": len(self.entries), "bytes": self.used, "capacity": self.capacity}
