"""rdmakv as LMCache's remote storage (the plugin vLLM reaches through ``LMCacheConnectorV1``).

``RdmakvConnectorAdapter`` is what LMCache's plugin settings name::

    remote_storage_plugin.rdmakv.module_path: rdmakv.lmcache
    remote_storage_plugin.rdmakv.class_name: RdmakvConnectorAdapter

Importing ``rdmakv`` never imports LMCache; this package imports it only when one of those
names is looked up (``pip install 'rdmakv[lmcache]'``). Its parts: ``values`` (how an LMCache
chunk is stored), ``settings`` (URL and key), ``lanes`` (connections that reconnect),
``batch`` (many values saved or fetched at once) and ``connector`` (LMCache's interface).
"""

from __future__ import annotations

from typing import Any

__all__ = ["RdmakvConnector", "RdmakvConnectorAdapter"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import connector

        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
