"""Exception types shared by the codecs, the client and the server.

Every error carries a stable ``code`` so the wire protocol can transport it and
operators can script against it.
"""

from __future__ import annotations


class RdmakvError(Exception):
    """Base class for every error rdmakv raises on purpose."""

    code = 1


class CodecError(RdmakvError, ValueError):
    """Bytes that do not decode: malformed frame, manifest or record."""

    code = 2


class ManifestError(CodecError):
    """A manifest that fails validation."""

    code = 3


class ProtocolError(RdmakvError):
    """The peer broke the protocol (bad frame, unknown opcode, oversized length)."""

    code = 4


class AuthError(RdmakvError):
    """Authentication failed: wrong key, tampered, replayed or reordered frame."""

    code = 5


class StoreFullError(RdmakvError):
    """The server has no capacity left for the chunks of this save."""

    code = 6


class NotFoundError(RdmakvError, KeyError):
    """An unknown manifest name."""

    code = 7
    deleted = False  # (a cluster's lookup: True when the session was deleted, not lost)

    def __str__(self) -> str:  # KeyError quotes its argument; we want a plain message
        return str(self.args[0]) if self.args else "not found"


class MissingChunksError(RdmakvError):
    """A manifest references chunks the server does not hold."""

    code = 8

    def __init__(self, message: str, missing: list[int] | None = None) -> None:
        super().__init__(message)
        self.missing = missing or []


class IntegrityError(RdmakvError):
    """A chunk's bytes do not hash to its key."""

    code = 9


class TooLargeError(ProtocolError):
    """A length field exceeds the configured maximum."""

    code = 10


class ConnectionLost(RdmakvError, ConnectionError):
    """The peer went away mid-exchange."""

    code = 11


class ServerError(RdmakvError):
    """The server reported an internal failure."""

    code = 12


class DiskFullError(RdmakvError):
    """The data dir has no room for this write (disk budget, or the filesystem itself)."""

    code = 13


class StorageError(RdmakvError):
    """The data dir failed (an I/O error), or holds a record that cannot be read back."""

    code = 14


class BusyError(RdmakvError):
    """The server refused the connection: a connection limit, or out of file descriptors."""

    code = 15


class StaleMembersError(RdmakvError):
    """A cluster node sees a different member list than the one the client placed a save by.

    The message ends with ``members=ADDR,ADDR,...``: the node's own list, a redirect for a
    client that cannot reach etcd."""

    code = 16

    @property
    def members(self) -> list[str]:
        _, sep, tail = str(self).rpartition("members=")
        return [a for a in tail.strip().split(",") if a] if sep else []


class SessionChangedError(RdmakvError):
    """A cluster repair's commit met a part of another version of the session: it was saved
    (or its part replaced) while the repair ran, and the newer version stands."""

    code = 17


class RdmaError(RdmakvError):
    """A verbs call failed (post, QP transition, registration...)."""

    code = 18


class RdmaUnavailable(RdmaError):
    """RDMA cannot be used here; the message says exactly why."""

    code = 19


class ReadTimeout(RdmaError, TimeoutError):
    """READs did not complete in time; the Requester is unusable (they may still land)."""

    code = 20


class ClusterError(RdmakvError):
    """etcd could not be reached or answered nonsense."""

    code = 22


# Codes of errors defined beside the code that raises them (they never cross the wire):
# 21 WorkCompletionError (rdma.errors), 23 ConfigError (cli.serve_config), 24 KeysFileError
# (wire.keyring), 25 DataDirInUse (store.engine.datadir), 26 PoolBusyError (llama.store_pool),
# 27 SlotFileError (llama.slot_format), 28 PrefixEntryError (llama.prefix_entry).
# tests/test_errors.py checks that every RdmakvError has a code of its own.

ERRORS_BY_CODE: dict[int, type[RdmakvError]] = {
    cls.code: cls
    for cls in (
        RdmakvError,
        CodecError,
        ManifestError,
        ProtocolError,
        AuthError,
        StoreFullError,
        NotFoundError,
        MissingChunksError,
        IntegrityError,
        TooLargeError,
        ConnectionLost,
        ServerError,
        DiskFullError,
        StorageError,
        BusyError,
        StaleMembersError,
        SessionChangedError,
        RdmaError,
        RdmaUnavailable,
        ReadTimeout,
        ClusterError,
    )
}
