"""A cluster node's side: its registration, its watched view of the members, the checks on every
part it is asked to commit (stale member lists, repairs of another version or of a deleted one,
each check and its commit one step under the name's guard), and the repair pass it runs when
membership changes.

The repair runs in the node, with the cluster's node key (a ``[[key]]`` with ``node = true``; in
single-key mode the shared key), once the member list has stopped changing for REPAIR_SETTLE_S.
A node key moves chunks and repair parts between nodes and drops parts; it never saves, restores
or lists sessions through the client API, so no tenant's key is needed to repair its namespace.
A node repairs the sessions whose whole manifest it holds: first those whose name ranks it first
among the live members, then (after another settle period, when they are usually whole again and
cost one round trip per node) the rest, so a session whose first name node is new (after a join)
or gone (after a loss) is still repaired by a node that has it.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable
from functools import partial
from typing import Any

from ..errors import AuthError, CodecError, NotFoundError, RdmakvError, SessionChangedError, StaleMembersError
from ..wire import manifest as mf
from ..wire.cluster_part import UNKNOWN, dec_part_body
from .membership import DEFAULT_LEASE_TTL, ClusterError, MemberWatch, Registration
from .placement import owners

REPAIR_SETTLE_S = 2.0  # membership must be quiet this long before a repair pass starts
REPAIR_RETRY_S = 5.0  # a pass that could not finish everything runs again after this
RETRIES_KEPT = 3  # repair failures kept for STATS (each one line)
GUARDS = 1024  # locks that make a name's checks and its commit (or delete) one step, striped by name


class NodeAgent:
    def __init__(self, url: str, advertise: str, listen: str, *, ttl: int = DEFAULT_LEASE_TTL, replicas: int = 2,
                 say: Callable[[str], None] = print, auto_repair: bool = True) -> None:  # fmt: skip
        self.url, self.advertise, self.replicas, self.say = url, advertise, replicas, say
        self.registration = Registration(url, advertise, {"listen": listen, "replicas": replicas}, ttl=ttl, say=say)
        self.view = MemberWatch(url, on_change=self._changed)
        self.auto_repair = auto_repair
        self.server: Any = None  # the store's Server, from start() (the cluster sits below the store)
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.repairs = 0
        self.repairing = False
        self.last_repair: dict[str, Any] = {}
        self.stale_refused = 0
        self.changed_refused = 0
        self.deleted_refused = 0
        self._guards = [threading.Lock() for _ in range(GUARDS)]
        self.repaired = {"under_replicated": 0, "chunks_sent": 0, "bytes_sent": 0, "parts_dropped": 0,
                         "work_seconds": 0.0}  # over all passes  # fmt: skip

    def start(self, server) -> None:
        """Called once the store has replayed and listens: join, watch, and repair on changes."""
        self.server = server
        server.cluster = self
        self.registration.start()
        self.view.start()
        if self.auto_repair:
            self._thread = threading.Thread(target=self._repair_loop, daemon=True, name="rdmakv-repair")
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._kick.set()
        self.registration.close()
        self.view.close()
        if self._thread is not None:
            self._thread.join(10)

    # --- checks on every part this node is asked to commit --------------------------------
    def guard(self, ns: str, name: str) -> threading.Lock:
        """Held around a part's checks and its commit, and around a delete, so that what a check
        saw is still so when the commit lands (a delete cannot slip in between)."""
        return self._guards[zlib.crc32(f"{ns}/{name}".encode()) % GUARDS]

    def check_put(self, ns: str, name: str, data: bytes, node_key: bool = False) -> None:
        """Refuse a part placed by a member list other than this node's (after re-reading it
        once, in case this node is the one behind), and a repair's part when this node holds a
        part of another version of the session (it was saved again while the repair ran: the
        newer version stands) or a deletion marker of this version (deleted while the repair
        ran). Non-part manifests pass, but not from a node key, which commits repair parts only.
        Call under ``guard(ns, name)``, with the commit."""
        try:
            m = mf.decode(data)
            part = dec_part_body(m.body) if m.kind == mf.KIND_PART else None
        except CodecError:
            if node_key:
                raise AuthError("a node key commits cluster repair parts only") from None
            return  # the commit itself reports what is wrong with it
        if node_key and (part is None or not part.repair):
            raise AuthError("a node key commits cluster repair parts only; it does not save sessions")
        if part is None or part.deleted:
            return  # a deletion marker replaces whatever is here, whatever list it was placed by
        if part.repair:
            self._check_version(ns, name, part.version)
        if not self.view.known or part.members in (UNKNOWN, self.view.digest):
            return
        try:
            self.view.reload()
        except ClusterError:
            pass  # etcd is down: the last list read stands
        if part.members != self.view.digest:
            self.stale_refused += 1
            raise StaleMembersError(f"stale member list: the save was placed by another member list than this "
                                    f"node's ({len(self.view.members)} members); re-read it from etcd and save "
                                    f"again. members={','.join(self.view.members)}")  # fmt: skip

    def check_delete(self, ns: str, name: str, node_key: bool = False) -> None:
        """A node key drops parts (a repair's parts placement no longer gives this node), never a
        session. Call under ``guard(ns, name)``, with the delete."""
        if not node_key:
            return
        try:
            held = mf.decode(self.server.engine.peek_manifest(ns, name))
        except CodecError:
            held = None
        if held is None or held.kind != mf.KIND_PART:
            raise AuthError("a node key drops cluster parts only")

    def _check_version(self, ns: str, name: str, version: int) -> None:
        try:
            held = mf.decode(self.server.engine.peek_manifest(ns, name))
            body = dec_part_body(held.body) if held.kind == mf.KIND_PART else None
        except (NotFoundError, CodecError):
            return  # nothing of it here (a new owner): the repair's part is the one
        if body is not None and body.stops_repair_of(version):
            self.deleted_refused += 1
            raise SessionChangedError(f"session {name!r} was deleted while it was being repaired; it stays deleted")
        if body is not None and body.deleted:
            return  # a marker of another version: this repair's version was saved after that delete
        if (body.version if body is not None else None) != version:
            self.changed_refused += 1
            raise SessionChangedError(f"session {name!r} was saved again while it was being repaired; this node "
                                      "keeps the newer version's part")  # fmt: skip

    def stats(self) -> dict:
        return {"members": len(self.view.members), "etcd_reachable": self.view.etcd_ok,
                "member_changes": self.view.changes, "stale_refused": self.stale_refused,
                "repairs_of_old_versions_refused": self.changed_refused,
                "repairs_of_deleted_sessions_refused": self.deleted_refused,
                "repairs": self.repairs, "repairing": self.repairing, "last_repair": self.last_repair,
                "repaired_total": dict(self.repaired)}  # fmt: skip

    # --- repair ---------------------------------------------------------------------------
    def _changed(self, _members: list[str]) -> None:
        self._kick.set()

    def _repair_loop(self) -> None:
        while not self._stop.is_set():
            self._kick.wait()
            while self._kick.is_set() and not self._stop.is_set():  # until membership is quiet
                self._kick.clear()
                self._stop.wait(REPAIR_SETTLE_S)
            if self._stop.is_set():
                return
            try:
                out = self.repair_now()
            except Exception as e:  # noqa: BLE001 - a repair bug must not take the node down
                out = {"failed": [f"{type(e).__name__}: {e}"]}
            if out.get("failed") and not self._stop.is_set():
                threading.Timer(REPAIR_RETRY_S, self._kick.set).start()

    def repair_now(self) -> dict:
        """One pass over every namespace this node holds sessions of (see the module docstring)."""
        from .client import ClusterStore
        from .repair import repair

        self.repairing = True
        t0 = time.monotonic()
        total: dict[str, Any] = {"members": len(self.view.members), "sessions": 0, "under_replicated": 0,
                 "chunks_sent": 0, "bytes_sent": 0, "parts_dropped": 0, "lost": 0, "still_under_replicated": 0,
                 "work_seconds": 0.0, "failed": []}  # fmt: skip
        try:
            engine = self.server.engine
            for ns in sorted(engine.namespaces):
                first, rest = self._sessions(ns)
                if not first and not rest:
                    continue
                key = self._key()
                if key is None:
                    total["failed"].append("no node key ([[key]] with node = true) in this node's keys file to repair "
                                           "with (rdmakv keys new --node)")  # fmt: skip
                    break
                try:
                    cs = ClusterStore(self.url, ns, key=key, replicas=self.replicas, watch=False)
                except (RdmakvError, OSError) as e:
                    total["failed"].append(f"namespace {ns!r}: {e}")
                    continue
                try:
                    for i, names in enumerate((first, rest)):
                        if i and self._stop.wait(REPAIR_SETTLE_S):
                            break
                        if names:
                            out = repair(cs, names, whole_of=partial(self._local_whole, ns))
                            for k in ("sessions", "under_replicated", "chunks_sent", "bytes_sent", "parts_dropped",
                                      "still_under_replicated"):  # fmt: skip
                                total[k] += out[k]
                            total["lost"] += len(out["lost"])
                            total["work_seconds"] += out["seconds"]  # without the settle waits
                            total["failed"] += out["failed"]
                finally:
                    cs.close()
        finally:
            self.repairing = False
        total["seconds"] = round(time.monotonic() - t0, 3)
        total["failed"] = total["failed"][:RETRIES_KEPT]
        total["finished_at"] = time.time()
        self.repairs += 1
        self.last_repair = total
        for k in self.repaired:
            self.repaired[k] += total[k]
        if total["chunks_sent"] or total["parts_dropped"] or total["failed"]:
            self.say(f"rdmakv: repair over {total['members']} members: {total['sessions']} sessions, "
                     f"{total['under_replicated']} were under-replicated, {total['chunks_sent']} chunks "
                     f"({total['bytes_sent']} B) sent, {total['parts_dropped']} parts dropped, "
                     f"{len(total['failed'])} failures, {total['seconds']} s")  # fmt: skip
        return total

    def _sessions(self, ns: str) -> tuple[list[str], list[str]]:
        """(sessions whose whole manifest this node holds and whose name ranks it first, the rest
        of those it holds the whole manifest of)."""
        engine = self.server.engine
        live = self.view.members
        first: list[str] = []
        rest: list[str] = []
        for row in engine.list(ns):
            try:
                data = engine.peek_manifest(ns, row["name"])
                m = mf.decode(data)
                if m.kind != mf.KIND_PART or not dec_part_body(m.body).whole:
                    continue
            except RdmakvError:
                continue  # deleted or evicted since the listing
            top = owners(row["name"], live, self.replicas) if live else []
            (first if top and top[0] == self.advertise else rest).append(row["name"])
        return first, rest

    def _local_whole(self, ns: str, name: str) -> bytes:
        """The whole manifest of a session whose name part this node holds (read here, not asked
        of a node through the client API); NotFoundError (``deleted`` set) when it is gone."""
        m = mf.decode(self.server.engine.peek_manifest(ns, name))
        body = dec_part_body(m.body) if m.kind == mf.KIND_PART else None
        if body is None or not body.whole:
            e = NotFoundError(f"this node holds no whole manifest of {name!r}")
            e.deleted = body is not None and body.deleted
            raise e
        return body.whole

    def _key(self) -> bytes | None:
        """The key repair connects to the other nodes with: the node key (the shared one in
        single-key mode); never a tenant's."""
        ring = self.server.keyring
        if self.server.single_key:
            return ring.entries[0].key
        try:
            return ring.node_key()
        except RdmakvError:
            return None
