"""What the auto-cache needs of the proxy in front of llama-server, as a Protocol (so the
auto-cache never imports the proxy that owns it), and the error reply both of them send."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    from aiohttp import web

    from .scratch import ScratchFiles
    from .store_pool import StorePool


class Upstream(Protocol):
    upstream: str  # llama-server's base URL
    store: StorePool
    session: Any  # the aiohttp.ClientSession to llama-server, once the proxy has started
    scratch: ScratchFiles
    slot_dir: Path  # llama-server's --slot-save-path

    def clean_headers(self, headers: Any) -> dict: ...

    async def forward_body(self, request: web.Request, body: bytes) -> Any: ...

    def upstream_down(self, e: Exception) -> web.Response: ...

    async def passthrough(self, request: web.Request, body: bytes) -> web.StreamResponse: ...


def llama_error(status: int, message: str, etype: str) -> web.Response:
    """An error reply shaped as llama-server's own (``{"error": {code, message, type}}``)."""
    from aiohttp import web

    return web.json_response({"error": {"code": status, "message": message, "type": etype}}, status=status)
