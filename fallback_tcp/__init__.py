"""The TCP transport: authenticated frames, pipelined puts, batched gets."""

from .framed import FramedSocket, client_handshake, server_handshake
from .transport import TcpChannel

__all__ = ["FramedSocket", "TcpChannel", "client_handshake", "server_handshake"]
