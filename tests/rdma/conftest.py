"""RDMA tests need a device: inside the rxe guest they must run (never skip), elsewhere they skip."""

from __future__ import annotations

import glob
import os

import pytest


def pytest_collection_modifyitems(config, items):
    if glob.glob("/sys/class/infiniband/*") or os.environ.get("RDMAKV_IN_GUEST"):
        return  # a device is (supposed to be) here: a missing one must fail, not skip
    skip = pytest.mark.skip(reason="no RDMA device: run with `rdmakv rxe-vm -- pytest -m rdma tests/rdma`")
    for item in items:
        if "rdma" in item.keywords:
            item.add_marker(skip)
