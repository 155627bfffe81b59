"""A cluster node's side: its registration, its watched view of the members, the stale-list
check on every part it is asked to commit, and the repair pass it runs when membership changes.

The repair runs in the node, with the namespace keys the node serves with, once the member
list has stopped changing for REPAIR_SETTLE_S. A node repairs the sessions whose whole manifest
it holds: first those whose name ranks it first among the live members, then (after another
settle period, when they are usually whole again and cost one round trip per node) the rest,
so a session whose first name node is new (after a join) or gone (after a loss) is still
repaired by a node that has it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..errors import CodecError, NotFoundError, RdmakvError, SessionChangedError, StaleMembersError
from ..wire import manifest as mf
from ..wire.cluster_part import UNKNOWN, dec_part_body
from .membership import DEFAULT_LEASE_TTL, ClusterError, MemberWatch, Registration
from .placement import owners

REPAIR_SETTLE_S = 2.0  # membership must be quiet this long before a repair pass starts
REPAIR_RETRY_S = 5.0  # a pass that could not finish everything runs again after this
RETRIES_KEPT = 3  # repair failures kept for STATS (each one line)


class NodeAgent:
    def __init__(self, url: str, advertise: str, listen: str, *, ttl: int = DEFAULT_LEASE_TTL, replicas: int = 2,
                 say: Callable[[str], None] = print, auto_repair: bool = True) -> None:  # fmt: skip
        self.url, self.advertise, self.replicas, self.say = url, advertise, replicas, say
        self.registration = Registration(url, advertise, {"listen": listen, "replicas": replicas}, ttl=ttl, say=say)
        self.view = MemberWatch(url, on_change=self._changed)
        self.auto_repair = auto_repair
        self.server = None
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.repairs = 0
        self.repairing = False
        self.last_repair: dict = {}
        self.stale_refused = 0
        self.changed_refused = 0
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
    def check_put(self, ns: str, name: str, data: bytes) -> None:
        """Refuse a part placed by a member list other than this node's (after re-reading it
        once, in case this node is the one behind), and a repair's part when this node holds a
        part of another version of the session (it was saved again while the repair ran: the
        newer version stands). Non-part manifests pass."""
        try:
            m = mf.decode(data)
            part = dec_part_body(m.body) if m.kind == mf.KIND_PART else None
        except CodecError:
            return  # the commit itself reports what is wrong with it
        if part is None:
            return
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

    def _check_version(self, ns: str, name: str, version: int) -> None:
        try:
            held = mf.decode(self.server.engine.peek_manifest(ns, name))
            have = dec_part_body(held.body).version if held.kind == mf.KIND_PART else None
        except (NotFoundError, CodecError):
            return  # nothing of it here (a new owner): the repair's part is the one
        if have != version:
            self.changed_refused += 1
            raise SessionChangedError(f"session {name!r} was saved again while it was being repaired; this node "
                                      "keeps the newer version's part")  # fmt: skip

    def stats(self) -> dict:
        return {"members": len(self.view.members), "etcd_reachable": self.view.etcd_ok,
                "member_changes": self.view.changes, "stale_refused": self.stale_refused,
                "repairs_of_old_versions_refused": self.changed_refused,
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
        total = {"members": len(self.view.members), "sessions": 0, "under_replicated": 0, "chunks_sent": 0,
                 "bytes_sent": 0, "parts_dropped": 0, "lost": 0, "still_under_replicated": 0,
                 "work_seconds": 0.0, "failed": []}  # fmt: skip
        try:
            engine = self.server.engine
            for ns in sorted(engine.namespaces):
                first, rest = self._sessions(ns)
                if not first and not rest:
                    continue
                key = self._key(ns)
                if key is None:
                    total["failed"].append(f"namespace {ns!r}: no tenant key in this node's keys to repair with")
                    continue
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
                            out = repair(cs, names)
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
        first, rest = [], []
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

    def _key(self, ns: str) -> bytes | None:
        ring = self.server.keyring
        if self.server.single_key:
            return ring.entries[0].key
        try:
            return ring.client_key(ns)
        except RdmakvError:
            return None
