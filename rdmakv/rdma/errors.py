"""Errors of the verbs layer (all RdmakvError subclasses, so callers can catch one base). The
ones a server can send live in rdmakv.errors, so the TCP client can name them from a code."""

from __future__ import annotations

from rdmakv.errors import RdmaError, RdmaUnavailable, ReadTimeout

__all__ = ["RdmaError", "RdmaUnavailable", "ReadTimeout", "WorkCompletionError"]


class WorkCompletionError(RdmaError):
    """A work completion came back with an error status.

    The RC QP is in the error state afterwards: the Requester that raised it refuses further
    reads (create a new one, or fall back to TCP for that connection).
    """

    code = 21

    def __init__(self, status: int, status_name: str, vendor_err: int, op_index: int | None, detail: str = "") -> None:
        self.status = status
        self.status_name = status_name
        self.vendor_err = vendor_err
        self.op_index = op_index
        where = f" at READ #{op_index} of the call" if op_index is not None else ""
        msg = (
            f"RDMA READ failed{where}: {status_name} (status {status}, vendor_err "
            f"{vendor_err:#x}); the QP is now in the error state and this Requester is "
            "unusable"
        )
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
