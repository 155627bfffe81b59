"""The shared auth key and per-connection key derivation (docs/protocol.md, Auth keys)."""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import AuthError

KEY_ENV = "RDMAKV_AUTH_KEY"
KEY_BYTES = 32
NONCE_BYTES = 32


def parse_key(text: str | bytes) -> bytes:
    """A 32-byte key from 64 hex characters (or the raw 32 bytes)."""
    if isinstance(text, bytes) and len(text) == KEY_BYTES:
        return text
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise AuthError(
            f"auth key must be {2 * KEY_BYTES} hex characters ({KEY_BYTES} bytes); "
            f"got {len(text)} characters"
        )
    return key


def key_from_env(explicit: str | bytes | None = None) -> bytes:
    """The explicit key if given, else ``$RDMAKV_AUTH_KEY``; a clear error when neither is set."""
    if explicit is not None:
        return parse_key(explicit)
    value = os.environ.get(KEY_ENV)
    if not value:
        raise AuthError(
            f"no auth key: set {KEY_ENV} to 64 hex characters "
            f"(e.g. export {KEY_ENV}=$(openssl rand -hex 32)) or pass key="
        )
    return parse_key(value)


FINGERPRINT_BYTES = 16


def fingerprint(key: bytes) -> bytes:
    """What HELLO says about the client's key: enough for the server to pick the matching entry
    of its keys file, nothing that helps recover the key."""
    return hmac.new(key, b"rdmakv/2 key fingerprint", hashlib.sha256).digest()[:FINGERPRINT_BYTES]


def derive_session_keys(
    key: bytes, client_nonce: bytes, server_nonce: bytes, namespace: str, mac_alg: int = 1
) -> tuple[bytes, bytes]:
    """(client->server key, server->client key); the namespace and the MAC algorithm are bound
    into both, so a HELLO altered on the way yields keys that fail the first authenticated frame."""
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * KEY_BYTES,
        salt=client_nonce + server_nonce,
        info=b"rdmakv/2 session " + bytes((mac_alg,)) + namespace.encode("utf-8"),
    ).derive(key)
    return okm[:KEY_BYTES], okm[KEY_BYTES:]
