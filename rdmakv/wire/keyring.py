"""Per-tenant keys (``rdmakv serve --keys FILE``): which key opens which namespace (parsing
and selection only; the server checks HELLO against it, a client picks its own key from it).

The file is TOML, a list of ``[[key]]`` tables::

    [[key]]
    namespace = "tenant-a"
    key = "<64 hex characters>"
    not_after = 2027-06-30        # optional: refused after this date (UTC)

    [[key]]
    key = "<64 hex characters>"
    admin = true                  # an operator key: STATS, LIST, COMPACT and PIN on any namespace

    [[key]]
    key = "<64 hex characters>"
    node = true                   # a cluster's node key: repair between nodes, in every namespace

A client's HELLO carries a fingerprint of its key; the server derives the session keys only
from an entry listed for that namespace (or an admin entry), so a tenant-A key can never open
tenant B, and so can never reach B's protection domain or rkeys. Two entries may be valid for
one namespace at once (rotation). A node key (the same on every node of a cluster) opens every
namespace for repair only: it moves chunks and repair parts, and never reads, writes or lists
sessions, so no node needs a tenant's key to repair that tenant's sessions. Without a keys file
the server runs in single-key mode (``RDMAKV_AUTH_KEY``): that one key opens every namespace,
admin and node included (development).
"""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import AuthError, RdmakvError
from .auth import KEY_BYTES, KEY_ENV, fingerprint, parse_key
from .messages import validate_namespace


class KeysFileError(RdmakvError):
    """The keys file cannot be used; the message names the file, the entry and the field."""

    code = 24


@dataclass(frozen=True)
class KeyEntry:
    key: bytes
    namespace: str | None  # None for an admin or node key valid everywhere
    admin: bool
    not_after: dt.date | None
    index: int  # position in the file, for messages
    node: bool = False  # a cluster's node key (repair between nodes)

    def valid_on(self, today: dt.date) -> bool:
        return self.not_after is None or today <= self.not_after


class KeyRing:
    def __init__(self, entries: list[KeyEntry], source: str) -> None:
        self.entries = entries
        self.source = source
        self._by_fp: dict[bytes, list[KeyEntry]] = {}
        for e in entries:
            self._by_fp.setdefault(fingerprint(e.key), []).append(e)

    @classmethod
    def single(cls, key: bytes) -> KeyRing:
        return cls([KeyEntry(key, None, True, None, 0)], "the shared key (single-key mode)")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyRing:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise KeysFileError(f"{p}: cannot read the keys file: {e.strerror}") from e
        return cls.parse(text, p)

    @classmethod
    def parse(cls, text: str, p: Path) -> KeyRing:
        """The entries of a keys file's text (``p`` names it in messages)."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise KeysFileError(f"{p}: not valid TOML: {e}") from e
        tables = doc.get("key")
        unknown = set(doc) - {"key"}
        if unknown:
            raise KeysFileError(f"{p}: unknown top-level key(s) {sorted(unknown)}; the file holds [[key]] tables")
        if not isinstance(tables, list) or not tables:
            raise KeysFileError(f"{p}: no [[key]] tables")
        entries = [_entry(p, i, t) for i, t in enumerate(tables, 1)]
        seen: dict[bytes, int] = {}
        for entry in entries:
            if entry.key in seen:
                raise KeysFileError(f"{p}: [[key]] #{entry.index} repeats the key of #{seen[entry.key]}")
            seen[entry.key] = entry.index
        return cls(entries, str(p))

    def select(self, fp: bytes, namespace: str, today: dt.date | None = None) -> KeyEntry:
        """The entry whose key may open ``namespace`` for a client with fingerprint ``fp``."""
        today = today or dt.datetime.now(dt.UTC).date()
        cands = self._by_fp.get(bytes(fp), [])
        if not cands:
            raise AuthError("authentication failed: the client's key is not one this server knows")
        fits = [e for e in cands if (e.admin or e.node) and e.namespace is None or e.namespace == namespace]
        if not fits:
            raise AuthError(f"authentication failed: this key does not open namespace {namespace!r}")
        valid = [e for e in fits if e.valid_on(today)]
        if not valid:
            raise AuthError(f"authentication failed: this key expired on {fits[0].not_after}")
        return valid[0]

    def client_key(self, namespace: str, today: dt.date | None = None) -> bytes:
        """The key a client should present for ``namespace``: its tenant entry valid today that
        lasts longest (during a rotation, the successor)."""
        today = today or dt.datetime.now(dt.UTC).date()
        fits = [e for e in self.entries if e.namespace == namespace and e.valid_on(today)]
        if not fits:
            raise KeysFileError(f"{self.source}: no valid [[key]] for namespace {namespace!r}")
        return max(fits, key=lambda e: e.not_after or dt.date.max).key

    def node_key(self, today: dt.date | None = None) -> bytes:
        """The cluster's node key: the node entry valid today that lasts longest."""
        today = today or dt.datetime.now(dt.UTC).date()
        fits = [e for e in self.entries if e.node and e.valid_on(today)]
        if not fits:
            raise KeysFileError(f"{self.source}: no valid [[key]] with node = true")
        return max(fits, key=lambda e: e.not_after or dt.date.max).key

    def namespaces(self) -> list[str]:
        return sorted({e.namespace for e in self.entries if e.namespace})


def _entry(path: Path, i: int, t: object) -> KeyEntry:
    where = f"{path}: [[key]] #{i}"
    if not isinstance(t, dict):
        raise KeysFileError(f"{where}: not a table")
    unknown = set(t) - {"namespace", "key", "not_after", "admin", "node"}
    if unknown:
        raise KeysFileError(f"{where}: unknown field(s) {sorted(unknown)} (fields: namespace, key, not_after, admin, "
                            "node)")  # fmt: skip
    if "key" not in t:
        raise KeysFileError(f"{where}: no key")
    try:
        key = parse_key(str(t["key"]))
    except AuthError as e:
        raise KeysFileError(f"{where}: key: {e}") from None
    admin = t.get("admin", False)
    if not isinstance(admin, bool):
        raise KeysFileError(f"{where}: admin must be true or false")
    node = t.get("node", False)
    if not isinstance(node, bool):
        raise KeysFileError(f"{where}: node must be true or false")
    ns = t.get("namespace")
    if node and (admin or ns is not None):
        raise KeysFileError(f"{where}: a node key (node = true) has no namespace and is not an admin key")
    if ns is None and not admin and not node:
        raise KeysFileError(f"{where}: a tenant key needs a namespace (or admin = true, or node = true)")
    if ns is not None:
        if not isinstance(ns, str):
            raise KeysFileError(f"{where}: namespace must be a string")
        try:
            validate_namespace(ns)
        except RdmakvError as e:
            raise KeysFileError(f"{where}: namespace: {e}") from None
    na = t.get("not_after")
    if na is not None and not isinstance(na, dt.date):
        raise KeysFileError(f"{where}: not_after must be a TOML date such as 2027-06-30")
    if isinstance(na, dt.datetime):
        na = na.date()
    return KeyEntry(key, ns, admin, na, i, node)


def new_entry(namespace: str | None, *, admin: bool = False, not_after: str | None = None, node: bool = False) -> str:
    """A fresh ``[[key]]`` table to paste into a keys file (``rdmakv keys new``)."""
    lines = ["[[key]]"]
    if namespace:
        validate_namespace(namespace)
        lines.append(f'namespace = "{namespace}"')
    lines.append(f'key = "{os.urandom(KEY_BYTES).hex()}"')
    if not_after:
        dt.date.fromisoformat(not_after)
        lines.append(f"not_after = {not_after}")
    if admin:
        lines.append("admin = true")
    if node:
        lines.append("node = true")
    return "\n".join(lines) + "\n"


KEY_FILE_ENV = "RDMAKV_KEY_FILE"  # a file with the client's key: 64 hex characters, or a keys file


def client_key_from_env(namespace: str, envs: tuple[str, ...] = (KEY_ENV,)) -> bytes:
    """A client's key for ``namespace``, as the integrations find it: the first of ``envs`` that is
    set (64 hex characters), else the file ``$RDMAKV_KEY_FILE`` names (64 hex characters, or a
    keys file as ``rdmakv serve --keys`` reads: the namespace's entry). AuthError saying which
    variable or file is missing or wrong."""
    for env in envs:
        if os.environ.get(env):
            try:
                return parse_key(os.environ[env])
            except (ValueError, RdmakvError) as e:
                raise AuthError(f"{env} is not a usable key: {e}") from None
    path = os.environ.get(KEY_FILE_ENV)
    if not path:
        raise AuthError(f"no key: set {' or '.join(envs)} (64 hex characters) or {KEY_FILE_ENV} (a keys file)")
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise AuthError(f"{KEY_FILE_ENV}={path}: {e.strerror}") from None
    try:
        if "[[key]]" in text:
            return KeyRing.parse(text, Path(path)).client_key(namespace)
        return parse_key(text.strip())
    except (ValueError, RdmakvError) as e:
        raise AuthError(f"{KEY_FILE_ENV}={path}: {e}") from None
