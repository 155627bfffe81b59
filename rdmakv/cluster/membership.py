"""Cluster membership in etcd: each node is a key under a lease it keeps alive; a node that dies
leaves the member list when its lease runs out, one that stops cleanly revokes it at once.

Only membership lives in etcd, never data. etcd is reached through its JSON gateway with
``etcd3gw`` (pure Python over HTTP: no gRPC build, and etcd 3.4 serves the gateway by default).
An etcd outage does not stop a node: it keeps serving, retries its keepalive and registers again
when etcd is back.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import ClusterError

DEFAULT_LEASE_TTL = 5  # seconds: how long a dead node stays in the member list at most
ETCD_TIMEOUT_S = 3.0  # every etcd request gives up after this


@dataclass(frozen=True)
class ClusterURL:
    host: str
    port: int
    name: str

    @property
    def prefix(self) -> str:
        return f"/rdmakv/{self.name}/members/"


def parse_cluster_url(url: str) -> ClusterURL:
    """``etcd://HOST[:PORT]/NAME`` (port 2379 by default)."""
    parts = urlsplit(url)
    name = parts.path.strip("/")
    if parts.scheme != "etcd" or not parts.hostname or not name or "/" in name:
        raise ValueError(f"cluster URL must be etcd://HOST[:PORT]/NAME, got {url!r}")
    return ClusterURL(parts.hostname, parts.port or 2379, name)


def _client(c: ClusterURL):
    try:
        from etcd3gw.client import Etcd3Client
    except ImportError as e:
        raise ClusterError("clusters need etcd3gw: pip install 'rdmakv[cluster]'") from e
    return Etcd3Client(host=c.host, port=c.port, timeout=ETCD_TIMEOUT_S)


def members(url: str) -> dict[str, dict]:
    """The live members: advertised address -> what the node registered."""
    c = parse_cluster_url(url)
    try:
        rows = _client(c).get_prefix(c.prefix)
    except Exception as e:
        raise ClusterError(f"etcd at {c.host}:{c.port} unreachable: {e}") from e
    out = {}
    for value, meta in rows:
        key = meta["key"].decode() if isinstance(meta["key"], bytes) else meta["key"]
        try:
            out[key[len(c.prefix) :]] = json.loads(value)
        except ValueError:
            continue  # not ours
    return out


class Registration:
    """This node's membership: registered under a lease, kept alive from a thread."""

    def __init__(self, url: str, advertise: str, info: dict, ttl: int = DEFAULT_LEASE_TTL, say=print) -> None:
        if ttl < 2:
            raise ValueError("the lease TTL must be at least 2 seconds")
        self.c = parse_cluster_url(url)
        self.key = self.c.prefix + advertise
        self.value = json.dumps({"addr": advertise, "ttl": ttl, **info})  # watchers check as often as the TTL
        self.ttl = ttl
        self.say = say
        self.lease: Any = None  # an etcd3gw Lease (untyped) while registered
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.client = _client(self.c)
        self.registered = False

    def start(self) -> None:
        """Register (or say why not and keep trying), then keep the lease alive."""
        try:
            self._register()
        except ClusterError as e:
            self.say(f"rdmakv: {e}; serving anyway, and registering once etcd answers")
        self._thread = threading.Thread(target=self._keepalive, daemon=True, name="rdmakv-membership")
        self._thread.start()

    def _register(self) -> None:
        try:
            self.lease = self.client.lease(self.ttl)
            self.client.put(self.key, self.value, lease=self.lease)
        except Exception as e:
            self.registered = False
            raise ClusterError(f"registering {self.key} in etcd at {self.c.host}:{self.c.port} failed: {e}") from e
        self.registered = True

    def _keepalive(self) -> None:
        period = self.ttl / 3
        down_since = None if self.registered else time.monotonic()
        while not self._stop.wait(period):
            try:
                if not self.registered or self.lease.refresh() <= 0:  # an expired lease refreshes to -1
                    self._register()
                if down_since is not None:
                    self.say(f"rdmakv: etcd is back after {time.monotonic() - down_since:.0f} s; registered again")
                    down_since = None
            except Exception as e:  # noqa: BLE001 - keep serving; membership waits for etcd
                self.registered = False
                if down_since is None:
                    down_since = time.monotonic()
                    self.say(f"rdmakv: etcd unreachable ({type(e).__name__}: {e}); still serving, retrying every "
                             f"{period:.1f} s")

    def close(self) -> None:
        """Leave the cluster now (revoke the lease) rather than when it runs out."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.lease is not None and self.registered:
            try:
                self.lease.revoke()
            except Exception:  # noqa: BLE001 - etcd down: the lease runs out by itself
                pass


WATCH_CHECK_S = 10.0  # the longest between two checks of the watch against etcd (the lease TTL if shorter)
REWATCH_PAUSE_S = 0.2  # at least this between two watches replaced because their stream ended


def _hang_up(stream) -> None:
    """End a watch's HTTP stream now, from another thread than the one reading it: the socket is
    shut down first (closing it alone does not wake a blocked read), as etcd3gw's own watcher does."""
    try:
        s = socket.fromfd(stream.raw._fp.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        s.shutdown(socket.SHUT_RDWR)
        s.close()
    except Exception:  # noqa: BLE001 - closed already, or not a plain socket
        pass
    try:
        stream.close()
    except Exception:  # noqa: BLE001
        pass


class MemberWatch:
    """The live member list, kept current by an etcd watch on the members prefix (changes arrive
    in milliseconds, each applied as it comes: a change costs one event per watcher, not a
    re-read of the list), checked against etcd every lease TTL (the members register theirs) or
    WATCH_CHECK_S: etcd's member count and newest member revision must be what the watch has
    applied (a few bytes, whatever the cluster's size: every change moves one of the two). A
    watch whose stream ended (etcd restarted) is replaced at once; one that is stuck (open,
    silent) is found by the check, within one check period of the change it missed; either way
    the list is re-read first. During an etcd outage the last list read stays in force:
    saves and restores go on against it, and membership simply stops changing."""

    def __init__(self, url: str, on_change=None, resync_s: float = WATCH_CHECK_S) -> None:
        self.url = url
        self.c = parse_cluster_url(url)
        self.on_change = on_change
        self.resync_s = resync_s
        self.members: list[str] = []
        self.info: dict[str, dict] = {}
        self.revisions: dict[str, int] = {}  # member -> the etcd revision its key was last written at
        self.known = False  # a list has been read at least once
        self.etcd_ok = False
        self.changes = 0
        self.rewatches = 0  # watches replaced: their stream ended, or a check found them behind
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._stream = None  # the watch's HTTP response (closing it ends the stream)
        self._thread: threading.Thread | None = None

    @property
    def digest(self) -> int:
        from ..wire.cluster_part import UNKNOWN, members_digest

        return members_digest(self.members) if self.known else UNKNOWN

    @property
    def check_s(self) -> float:
        """Seconds between checks: the shortest lease TTL the members registered, at most resync_s."""
        ttls = [i["ttl"] for i in self.info.values() if isinstance(i.get("ttl"), int | float) and i["ttl"] > 0]
        return min([self.resync_s, *ttls])

    def start(self, required: bool = False) -> MemberWatch:
        """Read the list now (``required``: fail if etcd cannot be read), then keep it current."""
        try:
            self.reload()
        except ClusterError:
            if required:
                raise
        self._thread = threading.Thread(target=self._run, daemon=True, name="rdmakv-member-watch")
        self._thread.start()
        return self

    def reload(self) -> bool:
        """Read the list from etcd; True when it changed."""
        c = self.c
        try:
            rows = _client(c).get_prefix(c.prefix)
        except Exception as e:
            self.etcd_ok = False
            raise ClusterError(f"etcd at {c.host}:{c.port} unreachable: {e}") from e
        self.etcd_ok = True
        info, revs = {}, {}
        for value, meta in rows:
            key = meta["key"].decode() if isinstance(meta["key"], bytes) else meta["key"]
            try:
                info[key[len(c.prefix) :]] = json.loads(value)
            except ValueError:
                continue  # not ours
            revs[key[len(c.prefix) :]] = int(meta.get("mod_revision", 0))
        return self._install(info, revs)

    def _install(self, info: dict[str, dict], revs: dict[str, int]) -> bool:
        with self._lock:
            new = sorted(info)
            changed = not self.known or new != self.members
            self.members, self.info, self.revisions, self.known = new, info, revs, True
            if changed:
                self.changes += 1
        if changed and self.on_change is not None:
            self.on_change(new)
        return changed

    def apply(self, event: dict) -> bool:
        """One watch event (a member registered or left); True when the list changed."""
        kv = event.get("kv", {})
        key = kv.get("key", b"")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if not key.startswith(self.c.prefix):
            return False
        addr = key[len(self.c.prefix) :]
        info, revs = dict(self.info), dict(self.revisions)
        if event.get("type") == "DELETE":
            info.pop(addr, None)
            revs.pop(addr, None)
        else:
            try:
                info[addr] = json.loads(kv.get("value", b""))
            except ValueError:
                return False
            revs[addr] = int(kv.get("mod_revision", 0))
        return self._install(info, revs)

    def behind(self) -> bool:
        """Whether etcd's member list moved past what this view holds: its member count and the
        newest revision among them (one small range request, whatever the cluster's size)."""
        from etcd3gw.utils import _encode, _increment_last_byte

        try:
            client = _client(self.c)
            reply = client.post(client.get_url("/kv/range"), json={
                "key": _encode(self.c.prefix), "range_end": _encode(_increment_last_byte(self.c.prefix)),
                "sort_order": "DESCEND", "sort_target": "MOD", "limit": 1, "keys_only": True})  # fmt: skip
        except Exception as e:
            self.etcd_ok = False
            raise ClusterError(f"etcd at {self.c.host}:{self.c.port} unreachable: {e}") from e
        newest = max((int(kv.get("mod_revision", 0)) for kv in reply.get("kvs", [])), default=0)
        with self._lock:
            ours = max(self.revisions.values(), default=0)
            return int(reply.get("count", 0)) != len(self.members) or newest != ours

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._stream is None:  # none yet, or its stream ended: re-read, then watch again
                    self.reload()
                    self._watch()
                elif self.behind():  # it missed a change (any join or re-registration raises the newest
                    self.reload()  # revision, any leave lowers the count): a stalled stream, replaced
                    self.rewatches += 1
                    self._end_watch()
                    self._watch()
                self.etcd_ok = True
            except ClusterError:
                self._end_watch()  # etcd is gone: the stream with it; start a new one when it is back
            except Exception:  # noqa: BLE001 - etcd3gw raises many kinds; the next check retries
                self._end_watch()
            woke = self._wake.wait(self.check_s)
            self._wake.clear()
            if woke:  # a stream ended: replaced now, but never in a tight loop
                self._stop.wait(REWATCH_PAUSE_S)

    def _watch(self) -> None:
        """A watch on the members prefix, its events applied by a thread that, when the stream
        ends, wakes the checker to replace it. (A change between the re-read before it and the
        watch's start shows at the next check.)"""
        from etcd3gw.utils import _decode, _encode, _increment_last_byte

        client = _client(self.c)
        create = {"key": _encode(self.c.prefix), "range_end": _encode(_increment_last_byte(self.c.prefix))}
        try:
            stream = client.session.post(client.get_url("/watch"), json={"create_request": create}, stream=True,
                                         timeout=(ETCD_TIMEOUT_S, None))  # fmt: skip
        except Exception as e:
            raise ClusterError(f"etcd at {self.c.host}:{self.c.port}: cannot watch: {e}") from e
        self._stream = stream

        def consume() -> None:
            try:
                for line in stream.iter_lines(chunk_size=None):  # (as it arrives: a fixed size would wait)
                    if self._stop.is_set() or self._stream is not stream:
                        return
                    if not line.strip():
                        continue
                    for event in json.loads(line).get("result", {}).get("events", []):
                        kv = event.get("kv", {})
                        kv["key"] = _decode(kv.get("key", ""))
                        if "value" in kv:
                            kv["value"] = _decode(kv["value"])
                        self.apply(event)
            except Exception:  # noqa: BLE001 - the stream broke: replaced below
                pass
            if self._stream is stream and not self._stop.is_set():
                self._stream = None  # ended: the checker re-reads and watches again now
                self.rewatches += 1
                self._wake.set()

        threading.Thread(target=consume, daemon=True, name="rdmakv-member-events").start()

    def _end_watch(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            _hang_up(stream)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._end_watch()
        if self._thread is not None:
            self._thread.join(self.resync_s + ETCD_TIMEOUT_S + 1)
