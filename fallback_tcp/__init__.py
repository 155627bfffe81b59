"""The TCP transport (the client's socket edge): authenticated frames, pipelined puts, batched gets."""

from .framed import FramedSocket, client_handshake
from .transport import TcpChannel

__all__ = ["FramedSocket", "TcpChannel", "client_handshake"]
