"""The LMCache plugin's settings: its URL (with options) and its key. Pure; no LMCache here.

``rdmakv://HOST:PORT/NAMESPACE?transport=auto&window=64&timeout=10&pin=0&ttl=0&hash_alg=xxh3``

- ``transport``: ``auto`` (RDMA READs into LMCache's buffer and WRITE saves when both ends can),
  ``rdma`` (refuse to start without it) or ``tcp``.
- ``window``: tokens per stored piece of a layer (0: a whole layer per piece). Smaller windows
  share more between LMCache chunks that hold a common prefix; larger ones cost fewer pieces.
- ``timeout``: seconds a store request may take before the connection counts as down.
- ``pin`` (0/1) and ``ttl`` (seconds): as for any rdmakv save.
- ``hash_alg``: ``xxh3`` or ``blake3`` chunk keys; ``mac``: ``poly1305`` (default), ``blake3`` or ``hmac-sha256``.

The key is ``$RDMAKV_AUTH_KEY`` (64 hex characters), else ``$RDMAKV_KEY_FILE``: 64 hex
characters, or a keys file with the namespace's ``[[key]]`` (as ``rdmakv serve --keys`` reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from ..client.url import StoreURL, parse_url
from ..errors import AuthError
from ..wire.keyring import client_key_from_env

OPTIONS = ("transport", "window", "timeout", "pin", "ttl", "hash_alg", "mac")
DEFAULT_WINDOW = 64
MAX_WINDOW = 1 << 20


class SettingsError(ValueError):
    """A setting that cannot work: says which, and what would."""


@dataclass(frozen=True)
class Settings:
    url: StoreURL
    transport: str = "auto"
    window: int = DEFAULT_WINDOW
    timeout: float = 10.0
    pin: bool = False
    ttl: float | None = None
    hash_alg: str = "xxh3"
    mac: str = "poly1305"

    @property
    def store_url(self) -> str:
        return str(self.url)


def parse_settings(text: object, setting: str = "url") -> Settings:
    """``text``: the plugin's url setting (``setting`` names it in errors)."""
    if not isinstance(text, str) or not text:
        raise SettingsError(f"{setting} is not set: give it as rdmakv://HOST:PORT/NAMESPACE")
    try:
        parts = urlsplit(text)
        url = parse_url(parts._replace(query="", fragment="").geturl())
    except ValueError as e:
        raise SettingsError(f"{setting}={text!r} is not a usable rdmakv URL: {e}") from None
    q = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(q) - set(OPTIONS))
    if unknown:
        raise SettingsError(f"{setting}={text!r}: unknown option(s) {unknown} (known: {list(OPTIONS)})")
    return Settings(
        url=url,
        transport=_choice(q, "transport", ("auto", "rdma", "tcp"), "auto", setting),
        window=_number(q, "window", DEFAULT_WINDOW, 0, MAX_WINDOW, setting, int),
        timeout=_number(q, "timeout", 10.0, 0.1, 3600, setting, float),
        pin=_choice(q, "pin", ("0", "1"), "0", setting) == "1",
        ttl=_number(q, "ttl", 0.0, 0, 10 * 365 * 86400, setting, float) or None,
        hash_alg=_choice(q, "hash_alg", ("xxh3", "blake3"), "xxh3", setting),
        mac=_choice(q, "mac", ("poly1305", "blake3", "hmac-sha256"), "poly1305", setting),
    )


def _choice(q: dict, name: str, allowed: tuple[str, ...], default: str, setting: str) -> str:
    v = q.get(name, default).lower()
    if v not in allowed:
        raise SettingsError(f"{setting}: {name} must be one of {list(allowed)}, got {v!r}")
    return v


def _number(q: dict, name: str, default, low, high, setting: str, kind):
    raw = q.get(name)
    if raw is None:
        return default
    try:
        v = kind(raw)
    except ValueError:
        raise SettingsError(f"{setting}: {name} must be a number, got {raw!r}") from None
    if not low <= v <= high:
        raise SettingsError(f"{setting}: {name} must be between {low} and {high}, got {raw!r}")
    return v


def load_key(namespace: str) -> bytes:
    """The client key for ``namespace``; SettingsError saying what is missing or wrong."""
    try:
        return client_key_from_env(namespace)
    except AuthError as e:
        raise SettingsError(str(e)) from None
