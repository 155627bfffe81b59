"""The LMCache suite: LMCache's own engine (CPU torch) against real rdmakv server processes.

It runs where LMCache is installed (``./dev test`` makes ``.venv-lmcache`` for it, since
LMCache pins numpy and prometheus_client below the main venv's); elsewhere it is not collected,
and with RDMAKV_REQUIRE_LMCACHE=1 a missing LMCache is an error instead.
"""

from __future__ import annotations

import os

try:
    import lmcache  # noqa: F401
except ImportError:
    if os.environ.get("RDMAKV_REQUIRE_LMCACHE"):
        raise
    collect_ignore_glob = ["test_*.py"]
else:
    import pytest

    from ..conftest import KEY_HEX

    os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")  # no usage reports from tests
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

    @pytest.fixture(autouse=True)
    def _auth_key(monkeypatch):
        monkeypatch.setenv("RDMAKV_AUTH_KEY", KEY_HEX)
        monkeypatch.delenv("RDMAKV_KEY_FILE", raising=False)

    @pytest.fixture
    def engines():
        """make(url, model, **config) -> an LMCache engine whose remote tier is rdmakv at url."""
        from rdmakv.lmcache.cpu_engine import Model, close_engine, make_engine, rdmakv_config

        made = []

        def make(url: str, model: Model | None = None, **config):
            e = make_engine(rdmakv_config(url, **config), model or Model())
            made.append(e)
            return e

        yield make
        for e in made:
            close_engine(e)
